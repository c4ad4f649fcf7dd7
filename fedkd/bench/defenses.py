"""The defence benchmark: every defence against the same attacks, with utility and cost, over several seeds.

    fedkd bench defenses                                   # the full grid (digits, MNIST, synthetic subjects; 3 seeds)
    fedkd bench defenses --quick                           # WEAKENED attacks and tiny budgets: checks the machinery
    fedkd bench defenses --datasets digits --defences none dp-sgd-eps8 --seeds 0 1 2
    python benchmarks/defenses.py ...                      # the same command

A cell is (dataset, defence, seed). Each cell runs real fedkd federations (the ServerApp logic, strategies,
privacy wrappers, ClientApp and mods of ``fedkd run``, on the in-process grid) in stages:

1. ``utility``: ``--rounds`` rounds; summary.json's ``accuracy`` and ``personal_accuracy`` (one meaning for
   every strategy: README "Metrics"), the claimed ``epsilon`` with its unit, ``bytes_up``/``bytes_down``,
   ``wall_s``. On the synthetic-subjects dataset the global models the server sent in every round feed the
   subject-level membership attacks of Suri et al. (loss threshold on the final model, loss across rounds;
   the adversary calibrates on ``KNOWN_PER_SIDE`` subjects of known membership per side and is scored on the
   others): ``subject_auc``, ``subject_tpr_at_1pct_fpr`` (the stronger attack by AUC is reported, both are
   in the CSV as ``subject_<attack>_*``).
2. ``inversion`` (image datasets, defences whose clients send a model or a hypernetwork gradient): one
   round in which client 0 trains on ``--attack-batch`` images in the ``gradient`` setting (one local step);
   the row's attacks (IG for model uploads; HyperFL's three attacks for HyperFL) run on the server's
   observation at their papers' step counts (``--quick``: 100 steps, 2 restarts, labelled WEAKENED).
   ``psnr``/``ssim`` are the best attack's (by PSNR: a worst case over the attacks we have), next to the
   mean-image and class-conditional mean-image baselines.
3. ``record_mia`` (defences where the server holds a global model): ``--candidates`` records from the server's
   test split, each put on a random client, each included in the target federation with probability 1/2 (OS
   entropy); ``--references`` reference federations trained by the adversary with the same recipe;
   LOSS, LiRA (online/offline) and RMIA (online) on the final global model (attacks/shadow_federations.py).
   ``record_auc``/``record_tpr_at_1pct_fpr`` are RMIA's; the others are in the CSV.
4. ``audit`` (defences that claim an epsilon, and ``none`` to show the audit's power): ``--canaries``
   canaries (records; subjects for subject-level DP), the one-run lower bound (Steinke et al. 2023) at
   95% confidence: ``audit_epsilon_lb`` next to the claim.

Threat model: the adversary is the server (honest-but-curious); it sees what the protocol sends it and
nothing else. Where a stage does not apply to a row the table says why (``n/a``); a combination the
framework refuses (a mechanism a strategy cannot honour) is a ``refused`` cell with the refusal's words.

Cells run in parallel as Ray tasks (one CPU each, ``--workers``; one Ray start for the whole grid), stages
checkpoint to ``OUT/cells/<cell>/<stage>.json`` and a finished cell to ``OUT/cells/<cell>.json``: a rerun with
the same ``--out`` skips what is done (resumable); a failed cell is retried on the next run. Outputs, rebuilt
from the cell files after every run: ``defenses.csv`` (tidy: dataset, defence, seed, metric, value),
``cells.csv`` (status and reasons), ``defenses.md`` (mean ± 95% t-interval half-width over seeds),
``defenses-<dataset>.png`` (privacy-utility scatter plots) and ``report.html``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from fedkd.config import ConfigError, load_config
from fedkd.registry import Registry

ROOT = Path(__file__).resolve().parents[2]
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
IMAGE_DATASETS = ("digits", "mnist")
KNOWN_PER_SIDE = 3  # subject MIA: subjects of known membership the adversary calibrates on, per side
STAGES = ("utility", "inversion", "record_mia", "audit")
SUBJECT_ATTACK = "loss-across-rounds"  # the subject MIA reported in the table (both are in the CSV)
POPULATION_MIN = 50  # record MIA: server-test records kept as population data for RMIA
RECORD_ATTACK = "rmia-online"  # the record MIA reported in the table (LOSS and LiRA are in the CSV)


@dataclass(frozen=True)
class Defence:
    """One row of the table: the overrides that make it, and what the server observes."""

    overrides: tuple[str, ...]
    description: str
    inversion: tuple[str, ...] = ("ig",)  # attacks on the server's observation of one client's reply (the first is the headline)
    no_inversion: str = ""  # why not, when ``inversion`` is empty
    global_model: bool = True  # the server holds a global model (record and subject MIA target it)
    no_global_model: str = ""
    claims: bool = False  # it claims an epsilon: the audit runs
    datasets: tuple[str, ...] = ("digits", "mnist", "subjects")
    reduced: str = ""  # a budget below the paper's, said in the table


DEFENCES: Registry[Defence] = Registry("defence")
_SERVER_HAS_NO_MODEL = "not built: the server holds no model (clients upload logits; a logit-based MIA is not built)"


def _dp(mech: str, eps: float, extra=()) -> tuple[str, ...]:
    return (f"privacy.mechanism={mech}", f"privacy.target_epsilon={eps}", *extra)


DEFENCES.add("none", Defence((), "FedAvg, no defence", claims=True))  # claims nothing; audited to show the audit's power
DEFENCES.add("dp-sgd-eps1", Defence(_dp("dp-sgd", 1.0), "FedAvg + DP-SGD (record-level, local), eps 1", claims=True))
DEFENCES.add("dp-sgd-eps8", Defence(_dp("dp-sgd", 8.0), "FedAvg + DP-SGD (record-level, local), eps 8", claims=True))
DEFENCES.add("gaussian-eps1", Defence(_dp("gaussian", 1.0), "DP-FedAvg, central Gaussian (client-level, trusted server), eps 1", claims=True))
DEFENCES.add("gaussian-eps8", Defence(_dp("gaussian", 8.0), "DP-FedAvg, central Gaussian (client-level, trusted server), eps 8", claims=True))
DEFENCES.add("rqm-eps8", Defence(_dp("rqm", 8.0), "RQM (client-level, local randomisation), eps 8", claims=True))
DEFENCES.add("pbm-eps8", Defence(_dp("pbm", 8.0), "PBM (client-level, local randomisation), eps 8", claims=True))
DEFENCES.add("subject-dp-eps1", Defence(_dp("subject-dp", 1.0, ("subject_dp.subjects_per_step=3",)), "FedAvg + subject-level DP, eps 1",
                                        claims=True, datasets=("subjects",)))
DEFENCES.add("subject-dp-eps8", Defence(_dp("subject-dp", 8.0, ("subject_dp.subjects_per_step=3",)), "FedAvg + subject-level DP, eps 8",
                                        claims=True, datasets=("subjects",)))
DEFENCES.add("hyperfl", Defence(("strategy.name=hyperfl", "model.name=hyperfl-cnn"), "HyperFL (clients upload hypernetwork gradients)",
                                inversion=("hyperfl-rank1", "hyperfl-ig", "hyperfl-dia"), global_model=False,
                                no_global_model="each client's model uses its private embedding and head", datasets=IMAGE_DATASETS))
DEFENCES.add("pfedhn", Defence(("strategy.name=pfedhn", "model.name=pfedhn-cnn"), "pFedHN (server-side hypernetwork, personal models)",
                               global_model=False, no_global_model="not built: personal models only (a per-client MIA)", datasets=IMAGE_DATASETS))
DEFENCES.add("fd", Defence(("strategy.name=fd",), "FD (federated distillation: per-class logits)", inversion=(),
                           no_inversion="no model or gradient is uploaded", global_model=False, no_global_model=_SERVER_HAS_NO_MODEL,
                           datasets=IMAGE_DATASETS))
DEFENCES.add("fedmd", Defence(("strategy.name=fedmd", "fedmd.alignment_size=100", "fedmd.public_epochs=5", "fedmd.private_epochs=5"),
                              "FedMD (logits on a public set)", inversion=(), no_inversion="no model or gradient is uploaded",
                              global_model=False, no_global_model=_SERVER_HAS_NO_MODEL, datasets=IMAGE_DATASETS,
                              reduced="alignment 100, 5 public + 5 private epochs"))
DEFENCES.add("feddf", Defence(("strategy.name=feddf", "feddf.max_steps=200", "feddf.eval_every=20", "feddf.patience=60"),
                              "FedDF (FedAvg + ensemble distillation on proxy data)", datasets=IMAGE_DATASETS,
                              reduced="200 distillation steps"))
DEFENCES.add("fedlgd", Defence(("strategy.name=fedlgd", "model.name=convnet-w32", "fedlgd.ipc=10", "fedlgd.warmup_iterations=30", "fedlgd.dm_iterations=10",
                                "fedlgd.gm_iterations=50", "fedlgd.server_ipc=10", "fedlgd.ci_tgap=5", "fedlgd.si_tgap=5"),
                               "FedLGD (local-global dataset distillation)", datasets=IMAGE_DATASETS, inversion=(),
                               no_inversion="not built: the client's step also trains on the server's virtual images, which IG's replay does not model",
                               reduced="DM warm-up 30 iterations (paper 10,000)"))


@dataclass(frozen=True)
class BenchSettings:
    """Everything a cell needs (sent to Ray tasks as a dict)."""

    out: str
    rounds: int = 5
    clients: int = 4
    local_epochs: int = 1
    attack_batch: int = 1
    candidates: int = 200
    references: int = 4
    canaries: int = 200
    mnist_samples: int = 3000
    mnist_dir: str = str(MNIST_DIR)
    quick: bool = False
    attack_steps: int = 0  # 0 = each attack's paper default
    attack_restarts: int = 0
    stages: tuple[str, ...] = STAGES
    extra: tuple[str, ...] = field(default=())  # --set overrides for every federation

    def inversion_budget(self) -> tuple[int, int]:
        """(steps, restarts) of the inversion attacks; 0 = the attack's paper default."""
        if self.quick:
            return self.attack_steps or 100, self.attack_restarts or 2
        return self.attack_steps, self.attack_restarts

    def label(self) -> str:
        s = [f"{self.rounds} rounds", f"{self.clients} clients ({max(self.clients, 4)} on subjects)", f"MNIST {self.mnist_samples} records",
             f"inversion batch {self.attack_batch}", f"{self.local_epochs} local epoch(s)",
             f"record MIA {self.candidates} candidates / {self.references} reference federations", f"audit {self.canaries} canaries"]
        steps, restarts = self.inversion_budget()
        if steps or restarts:
            s.append(f"WEAKENED inversion ({steps or 'default'} steps, {restarts or 'default'} restarts)")
        else:
            s.append("inversion at the papers' step counts")
        return ", ".join(s)


def dataset_overrides(dataset: str, s: BenchSettings) -> list[str]:
    if dataset == "digits":
        return ["data.dataset=digits", f"data.num_clients={s.clients}", "model.name=cnn"]
    if dataset == "mnist":
        return ["data.dataset=mnist", f"data.data_dir={s.mnist_dir}", f"data.max_samples={s.mnist_samples}", f"data.num_clients={s.clients}",
                "model.name=cnn"]
    if dataset == "subjects":  # 2 silos per subject; half of the subjects are non-members held by no one
        n = max(s.clients, 4)
        return ["data.dataset=synthetic-subjects", "data.partitioner=subject", f"data.num_clients={n}", f"data.num_subjects={10 * n}",
                "data.subjects_per_client=5", "data.clients_per_subject=2", "data.records_per_subject=30", "data.subject_separation=2.0",
                "data.client_test_fraction=0", "model.name=mlp", "model.hidden=[64, 64]", "train.batch_size=16"]
    raise ConfigError("--datasets", f"unknown dataset {dataset!r}; valid: digits, mnist, subjects")


def cell_name(dataset: str, defence: str, seed: int) -> str:
    return f"{dataset}-{defence}-s{seed}"


def base_overrides(dataset: str, defence: str, seed: int, s: BenchSettings) -> list[str]:
    d = DEFENCES.get(defence)
    out = dataset_overrides(dataset, s) + [f"run.seed={seed}", "run.device=auto", f"train.local_epochs={s.local_epochs}",
                                           f"run.rounds={s.rounds}"]
    if dataset == "subjects" and "strategy.name" not in " ".join(d.overrides):
        out.append("strategy.fraction_evaluate=0")
    return out + list(d.overrides) + list(s.extra)


# ---------------------------------------------------------------- stages
def stage_utility(dataset, defence, seed, s: BenchSettings, work: Path) -> dict:
    from fedkd.attacks.federations import run_federation

    cfg = load_config(None, base_overrides(dataset, defence, seed, s))
    summary, rounds = run_federation(cfg, work / "utility")
    out = {k: summary.get(k) for k in ("accuracy", "personal_accuracy", "epsilon", "delta", "bytes_up", "bytes_down", "wall_s")}
    for k in ("privacy_unit", "privacy_relation", "privacy_trust_model", "status", "error"):
        out[k] = summary.get(k)
    if out["status"] != "ok":
        return out  # run_cell records the cell with this status; nothing to attack
    d = DEFENCES.get(defence)
    if dataset == "subjects" and d.global_model:
        out.update(subject_mia(cfg, rounds))
    return out


def subject_mia(cfg, rounds) -> dict:
    """Suri et al.'s two subject-level attacks on the server's recorded global models."""
    from fedkd.attacks import mia_metrics as mm
    from fedkd.attacks import subject_mia as sm
    from fedkd.data import load_federation
    from fedkd.privacy.entropy import numpy_generator

    fed = load_federation(cfg.data, cfg.run.seed)
    members = fed.extras["members"]
    # fresh samples of each subject: the adversary's own draws
    samples, known = sm.adversary_view(fed.extras["subject_model"], members, 30, KNOWN_PER_SIDE, numpy_generator())
    out = {}
    for name, res in (("loss-threshold", sm.loss_threshold(rounds.models[-1], samples, known)),
                      ("loss-across-rounds", sm.loss_across_rounds(rounds, samples, known))):
        unseen = sm.unknown_subjects(res, known)
        row = mm.summary(res.scores[unseen], members[unseen], name)
        out[f"subject_{name}_auc"], out[f"subject_{name}_tpr_at_1pct_fpr"] = row["auc"], row["tpr_at_1pct_fpr"]
        out["subject_fpr_resolved_1pct"] = int(row["fpr_resolved_1pct"])
        out["subject_non_members"] = row["non_members"]
    # the headline is fixed in advance (the server sees every round): no choice made with the ground truth
    out["subject_auc"], out["subject_tpr_at_1pct_fpr"] = out[f"subject_{SUBJECT_ATTACK}_auc"], out[f"subject_{SUBJECT_ATTACK}_tpr_at_1pct_fpr"]
    return out


def stage_inversion(dataset, defence, seed, s: BenchSettings, work: Path) -> dict:
    from fedkd.attacks.federations import run_federation
    from fedkd.attacks.runner import attack_run_dir

    d = DEFENCES.get(defence)
    # the whole run (a mechanism calibrates its noise to run.rounds), attacked in round 2 (round 1 when there is one):
    # FedDF learns each node's architecture from its first reply
    base = base_overrides(dataset, defence, seed, s) + [
        "attack.setting=gradient", f"attack.batch_size={s.attack_batch}", f"attack.rounds=[{min(2, s.rounds)}]", "attack.clients=[0]",
        "strategy.fraction_evaluate=0", f"attack.steps={s.inversion_budget()[0]}", f"attack.restarts={s.inversion_budget()[1]}",
    ]
    cfg = load_config(None, base + [f"attack.name={d.inversion[0]}"])
    run_dir = work / "inversion"
    run_federation(cfg, run_dir)
    out, head = {}, None
    for attack in d.inversion:
        acfg = load_config(None, base + [f"attack.name={attack}"])
        res = attack_run_dir(run_dir, acfg, out=run_dir / attack, echo=lambda *_: None)
        for k in ("psnr", "ssim"):
            out[f"inv_{attack}_{k}"] = res.get(k)
        head = head or res  # the row's first attack is its headline, fixed in advance (the others are in the CSV)
    best = head
    for k in ("psnr", "ssim", "baseline_psnr", "baseline_ssim", "class_baseline_psnr", "class_baseline_ssim", "label_acc"):
        out[k] = best.get(k)
    out["inversion_attack"] = best["attack"]
    out["attack_steps"], out["attack_restarts"] = best["params"].get("steps"), best["params"].get("restarts")
    return out


def stage_record_mia(dataset, defence, seed, s: BenchSettings, work: Path) -> dict:
    from fedkd.attacks.shadow_federations import run_record_mia

    from fedkd.data import load_federation

    cfg = load_config(None, base_overrides(dataset, defence, seed, s) + ["strategy.fraction_evaluate=0"])
    pool = len(load_federation(cfg.data, cfg.run.seed).server_test)
    candidates = min(s.candidates, pool - POPULATION_MIN)  # a small server test split: fewer candidates (said in the notes)
    if candidates < 10:
        raise ConfigError("--candidates", f"the server test split has {pool} records: too few for a record MIA")
    res = run_record_mia(cfg, candidates=candidates, references=s.references, out_dir=work / "record_mia", parallel=False)
    out = {"record_candidates": candidates}
    for row in res.rows:
        name = row["attack"]
        out[f"record_{name}_auc"], out[f"record_{name}_tpr_at_1pct_fpr"] = row["auc"], row["tpr_at_1pct_fpr"]
        out["record_fpr_resolved_1pct"], out["record_non_members"] = int(row["fpr_resolved_1pct"]), row["non_members"]
    out["record_auc"], out["record_tpr_at_1pct_fpr"] = out[f"record_{RECORD_ATTACK}_auc"], out[f"record_{RECORD_ATTACK}_tpr_at_1pct_fpr"]
    return out


def stage_audit(dataset, defence, seed, s: BenchSettings, work: Path) -> dict:
    from fedkd.privacy.audit_run import run_audit

    cfg = load_config(None, base_overrides(dataset, defence, seed, s) + ["strategy.fraction_evaluate=0", f"audit.canaries={s.canaries}"])
    rep = run_audit(cfg, runs=1, out_dir=work / "audit", parallel=False, echo=lambda *_: None)
    b = rep["bounds"]["one-run"]
    return {"audit_epsilon_lb": b["epsilon"], "audit_claimed_epsilon": rep["claimed_epsilon"], "audit_unit": rep["unit"],
            "audit_violated": int(not rep["ok"])}


STAGE_FNS = {"utility": stage_utility, "inversion": stage_inversion, "record_mia": stage_record_mia, "audit": stage_audit}


def not_applicable(dataset: str, defence: str, stage: str) -> str:
    """Why ``stage`` does not apply to this row ('' when it does)."""
    d = DEFENCES.get(defence)
    if stage == "inversion":
        if dataset not in IMAGE_DATASETS:
            return "not images"
        return d.no_inversion if not d.inversion else ""
    if stage == "record_mia":
        if dataset == "subjects":
            return "subject dataset: the subject MIA runs instead"
        return d.no_global_model if not d.global_model else ""
    if stage == "audit":
        return "" if d.claims else "claims no epsilon"
    return ""


def run_cell(dataset: str, defence: str, seed: int, s: BenchSettings) -> dict:
    """Every stage of one cell, each checkpointed; returns the cell record (status ok/refused/failed)."""
    import torch

    torch.set_num_threads(1)
    name = cell_name(dataset, defence, seed)
    folder = Path(s.out) / "cells" / name
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(s.out) / "runs" / name
    cell = {"dataset": dataset, "defence": defence, "seed": seed, "quick": s.quick, "settings": s.label(), "extra": list(s.extra),
            "stages": list(s.stages), "metrics": {},
            "not_applicable": {}, "status": "ok", "reason": "", "stage_s": {}}
    t0 = time.perf_counter()
    d = DEFENCES.get(defence)
    if dataset not in d.datasets:
        cell.update(status="n/a", reason=f"{defence} does not run on {dataset}")
        return cell
    for stage in s.stages:
        why = not_applicable(dataset, defence, stage)
        if why:
            cell["not_applicable"][stage] = why
            continue
        path = folder / f"{stage}.json"
        part = json.loads(path.read_text()) if path.exists() else None
        if part is not None and (part.get("settings"), part.get("extra")) != (s.label(), list(s.extra)):
            part = None  # a stage checkpoint of other settings: run it again
        if part is None:
            ts = time.perf_counter()
            shutil.rmtree(work / stage, ignore_errors=True)  # a stage that died half-way left its run directory
            try:
                part = {"metrics": STAGE_FNS[stage](dataset, defence, seed, s, work / stage), "s": time.perf_counter() - ts}
            except ConfigError as e:
                if stage == "utility":
                    cell.update(status="refused", reason=str(e), cell_s=time.perf_counter() - t0)
                    return cell
                part = {"refused": str(e), "s": time.perf_counter() - ts}
            except Exception as e:  # noqa: BLE001 - recorded, the cell is retried on the next run
                cell.update(status="failed", reason=f"{stage}: {type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:],
                            cell_s=time.perf_counter() - t0)
                return cell
            part.update(settings=s.label(), extra=list(s.extra))
            _atomic_json(path, part)
        if "refused" in part:
            cell["not_applicable"][stage] = f"refused: {part['refused']}"
        cell["metrics"].update(part.get("metrics", {}))
        cell["stage_s"][stage] = part["s"]
        if stage == "utility" and cell["metrics"].get("status") not in (None, "ok"):
            cell.update(status=cell["metrics"]["status"], reason=str(cell["metrics"].get("error") or "")[:500], cell_s=time.perf_counter() - t0)
            return cell  # e.g. diverged: recorded as such, not averaged with the runs that finished
    cell["cell_s"] = time.perf_counter() - t0
    return cell


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


def _remote_cell(args_json: str, extra_path: list[str]) -> dict:
    for p in extra_path:
        if p not in sys.path:
            sys.path.insert(0, p)
    a = json.loads(args_json)
    s = BenchSettings(**{**a["settings"], "stages": tuple(a["settings"]["stages"]), "extra": tuple(a["settings"]["extra"])})
    try:
        return run_cell(a["dataset"], a["defence"], a["seed"], s)
    except Exception as e:  # noqa: BLE001 - not every exception survives Ray's pickling: send the words
        return {"dataset": a["dataset"], "defence": a["defence"], "seed": a["seed"], "status": "failed", "metrics": {}, "not_applicable": {},
                "reason": f"{type(e).__name__}: {e}"[:500], "traceback": traceback.format_exc()[-3000:]}


# ---------------------------------------------------------------- the grid
def plan(datasets, defences, seeds) -> list[tuple[str, str, int]]:
    from fedkd.registry import UnknownNameError

    for d in defences:
        try:
            DEFENCES.get(d)
        except UnknownNameError as e:
            raise ConfigError("--defences", str(e)) from None
    for ds in datasets:
        if ds not in (*IMAGE_DATASETS, "subjects"):
            raise ConfigError("--datasets", f"unknown dataset {ds!r}; valid: digits, mnist, subjects")
    datasets, defences, seeds = (list(dict.fromkeys(x)) for x in (datasets, defences, seeds))  # a name twice: one cell
    return [(ds, d, seed) for ds in datasets for d in defences if ds in DEFENCES.get(d).datasets for seed in seeds]


def run_grid(cells: list[tuple[str, str, int]], s: BenchSettings, *, workers: int = 0, echo=print) -> list[dict]:
    """Run every pending cell (Ray tasks when ``workers`` > 1, else in this process); write each finished one."""
    out = Path(s.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    for f in (out / "cells").glob("*.json"):  # a finished cell counts only for the settings that made it
        made = json.loads(f.read_text())
        if made.get("settings") != s.label() or made.get("extra", list(s.extra)) != list(s.extra):
            raise ConfigError("--out", f"{out} holds cells made with other settings ({made.get('settings')}); use another --out or the same settings")
    pending = [c for c in cells if not _done(out, c, s)]
    echo(f"defence grid: {len(cells)} cells, {len(cells) - len(pending)} done before, {len(pending)} to run ({s.label()})")
    t0 = time.perf_counter()
    done: list[dict] = []

    def finish(cell: dict) -> None:
        done.append(cell)
        name = cell_name(cell["dataset"], cell["defence"], cell["seed"])
        failed = out / "cells" / name / "failed.json"
        if cell["status"] != "failed":
            _atomic_json(out / "cells" / f"{name}.json", cell)
            failed.unlink(missing_ok=True)
        else:
            failed.parent.mkdir(parents=True, exist_ok=True)
            _atomic_json(failed, cell)
        elapsed = time.perf_counter() - t0
        eta = elapsed / len(done) * (len(pending) - len(done))
        extra = f": {cell['reason'][:160]}" if cell["reason"] else ""
        echo(f"[{len(done)}/{len(pending)}] {name} {cell['status']} ({cell.get('cell_s', 0):.0f} s){extra}; elapsed {elapsed:.0f} s, ETA {eta:.0f} s")

    if workers <= 1 or len(pending) <= 1:
        for c in pending:
            finish(run_cell(*c, s))
        return done
    import ray

    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        ray.init(num_cpus=workers, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(_remote_cell)
        settings = {**s.__dict__, "stages": list(s.stages), "extra": list(s.extra)}
        refs = {task.remote(json.dumps({"dataset": ds, "defence": d, "seed": seed, "settings": settings}), [str(ROOT)]): (ds, d, seed)
                for ds, d, seed in pending}
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for r in ready:
                ds, d, seed = refs.pop(r)
                try:
                    cell = ray.get(r)
                except Exception as e:  # noqa: BLE001 - a worker that died: recorded, retried on the next run
                    cell = {"dataset": ds, "defence": d, "seed": seed, "status": "failed", "reason": f"worker: {type(e).__name__}: {e}"[:500],
                            "metrics": {}, "not_applicable": {}}
                finish(cell)
    finally:
        if started:
            ray.shutdown()
    return done


def _done(out: Path, cell: tuple[str, str, int], s: BenchSettings) -> bool:
    """Finished, with every stage asked for this time (a run with fewer --stages does not finish a cell)."""
    path = out / "cells" / f"{cell_name(*cell)}.json"
    if not path.exists():
        return False
    return set(s.stages) <= set(json.loads(path.read_text()).get("stages", STAGES))


def load_cells(out: Path) -> list[dict]:
    """Finished cells, and the last failure of every cell that has not finished (the report shows both)."""
    folder = Path(out) / "cells"
    cells = [json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))]
    done = {cell_name(c["dataset"], c["defence"], c["seed"]) for c in cells}
    cells += [json.loads(f.read_text()) for f in sorted(folder.glob("*/failed.json")) if f.parent.name not in done]
    return cells


# ---------------------------------------------------------------- command line
def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--datasets", nargs="+", default=["digits", "mnist", "subjects"], help="digits, mnist (../shared/data/mnist), subjects")
    ap.add_argument("--defences", "--defenses", nargs="+", default=None, help=f"rows (default: all): {', '.join(DEFENCES.names())}")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--attack-batch", type=int, default=1)
    ap.add_argument("--candidates", type=int, default=200, help="record MIA candidates")
    ap.add_argument("--references", type=int, default=4, help="record MIA reference federations per cell")
    ap.add_argument("--canaries", type=int, default=200, help="audit canaries")
    ap.add_argument("--attack-steps", type=int, default=0, help="inversion steps (0 = each attack's paper default; fewer = WEAKENED, labelled)")
    ap.add_argument("--attack-restarts", type=int, default=0, help="inversion restarts (0 = the attack's default)")
    ap.add_argument("--mnist-samples", type=int, default=3000, help="MNIST records used (a seeded subsample of the 10,000 test images)")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    ap.add_argument("--quick", action="store_true", help="WEAKENED attacks (100 IG steps, 2 restarts): checks the machinery")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="cells at a time (Ray tasks); 1 = in this process")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="an override for every federation")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "defenses"))
    ap.add_argument("--report-only", action="store_true", help="rebuild the CSV, table, plots and HTML from finished cells")


def settings_from_args(args) -> BenchSettings:
    if args.attack_batch < 1:
        raise ConfigError("--attack-batch", f"must be >= 1 (got {args.attack_batch})")
    if args.attack_steps < 0 or args.attack_restarts < 0:
        raise ConfigError("--attack-steps", "must be >= 0 (0 = the paper default)")
    if args.rounds < 1 or args.clients < 2 or args.references < 2 or args.candidates < 10 or args.canaries < 2:
        raise ConfigError("bench", "need --rounds >= 1, --clients >= 2, --references >= 2, --candidates >= 10, --canaries >= 2")
    return BenchSettings(out=str(Path(args.out).resolve()), rounds=args.rounds, clients=args.clients, local_epochs=args.local_epochs,
                         attack_batch=args.attack_batch, candidates=args.candidates, references=args.references, canaries=args.canaries,
                         mnist_samples=args.mnist_samples, quick=args.quick, attack_steps=args.attack_steps, attack_restarts=args.attack_restarts, stages=tuple(args.stages), extra=tuple(args.overrides))


def main(args) -> int:
    from . import report

    s = settings_from_args(args)
    out = Path(s.out)
    datasets = list(args.datasets)
    cells = plan(datasets, args.defences or DEFENCES.names(), args.seeds)  # unknown names first
    if "mnist" in datasets and not Path(s.mnist_dir).is_dir():
        raise ConfigError("--datasets", f"mnist needs the IDX files in {s.mnist_dir}")
    t0 = time.perf_counter()
    if not args.report_only:
        for ds in dict.fromkeys(ds for ds, _, _ in cells):  # the --set overrides must load on every dataset (one line, exit 2)
            load_config(None, base_overrides(ds, "none", 0, s))
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        ran = run_grid(cells, s, workers=args.workers)
        with open(out / "invocations.jsonl", "a") as f:  # every invocation that ran cells, for the report's header
            f.write(json.dumps({"command": " ".join(sys.argv), "started": started, "wall_s": time.perf_counter() - t0, "cells_run": len(ran),
                                "load_average": os.getloadavg()}) + "\n")
    paths = report.write_all(out, load_cells(out), s, invocations=report.read_invocations(out))
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if not all(_done(out, c, s) for c in cells):
        print("some cells failed (their reasons are in cells.csv); run the same command again to retry them", file=sys.stderr)
        return 1
    return 0

