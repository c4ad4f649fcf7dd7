"""Membership inference and audits on small real fedkd federations (REDUCED settings: a shared 2-core
machine). Every federation is a real fedkd run (in-process grid; many at once as Ray tasks).

    python benchmarks/membership.py subject   # subject MIA, undefended and with subject-level DP
    python benchmarks/membership.py record    # record-level LOSS / LiRA / RMIA, FedAvg vs DP-SGD
    python benchmarks/membership.py sweep     # synthetic-federation sweep, AUC vs each property
    python benchmarks/membership.py audit     # audited lower bounds next to claimed epsilons

Results: benchmarks/results/membership_*.csv and *.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(os.environ.get("FEDKD_BENCH_DIR", "/tmp/fedkd-membership"))

# the base subject federation: 8 clients x 5 subjects, each member on 2 clients -> 20 members, 20 non-members
SUBJECT_BASE = [
    "data.dataset=synthetic-subjects", "data.partitioner=subject", "data.num_clients=8", "data.num_subjects=40",
    "data.subjects_per_client=5", "data.clients_per_subject=2", "data.records_per_subject=30", "data.subject_separation=2.0",
    "data.client_test_fraction=0", "model.hidden=[64, 64]", "run.rounds=8", "train.local_epochs=2", "train.batch_size=16",
    "strategy.fraction_evaluate=0",
]
KNOWN_PER_SIDE = 3  # subjects of known membership the adversary calibrates on (per side)


def _cfg(overrides):
    from fedkd.config import load_config

    return load_config(None, list(overrides))


def subject_attack(cfg, rounds, seed: int = 1) -> list[dict]:
    """Suri et al.'s two attacks on one federation; metrics over the subjects the adversary did not know."""
    from fedkd.attacks import mia_metrics as mm
    from fedkd.attacks import subject_mia as sm
    from fedkd.data import load_federation

    fed = load_federation(cfg.data, cfg.run.seed)
    members = fed.extras["members"]
    samples, known = sm.adversary_view(fed.extras["subject_model"], members, 30, KNOWN_PER_SIDE, np.random.default_rng(seed))
    rows = []
    for name, res in (("subject-loss-threshold", sm.loss_threshold(rounds.models[-1], samples, known)),
                      ("subject-loss-across-rounds", sm.loss_across_rounds(rounds, samples, known))):
        unseen = sm.unknown_subjects(res, known)
        row = mm.summary(res.scores[unseen], members[unseen], name)
        row["balanced_accuracy"] = float(((res.predicted_member & members) | (~res.predicted_member & ~members))[unseen].mean())
        rows.append(row)
    return rows


def part_subject(args) -> None:
    from fedkd.attacks.federations import run_many
    from fedkd.attacks.mia_metrics import write_csv

    settings = [("none", None)] + [("subject-dp", e) for e in (1.0, 4.0, 16.0)]
    cfgs = []
    for seed in range(args.seeds):
        for mech, eps in settings:
            o = SUBJECT_BASE + [f"run.seed={seed}"]
            if mech != "none":
                o += ["privacy.mechanism=subject-dp", f"privacy.target_epsilon={eps}", "subject_dp.subjects_per_step=3"]
            cfgs.append((seed, mech, eps, _cfg(o)))
    t0 = time.perf_counter()
    results = run_many([c for *_, c in cfgs], parallel=True)
    rows = []
    for (seed, mech, eps, cfg), (summary, rounds) in zip(cfgs, results):
        for row in subject_attack(cfg, rounds):
            row.update(seed=seed, mechanism=mech, target_epsilon=eps, claimed_epsilon=summary.get("epsilon"), accuracy=summary["accuracy"])
            rows.append(row)
    path = write_csv(rows, RESULTS / "membership_subject.csv")
    print(f"{len(cfgs)} federations in {time.perf_counter() - t0:.0f} s -> {path}")
    _print(rows, ["mechanism", "target_epsilon", "seed", "attack", "auc", "tpr_at_1pct_fpr", "balanced_accuracy", "accuracy", "claimed_epsilon"])


RECORD_BASE = [
    "data.dataset=digits", "data.partitioner=iid", "data.num_clients=4", "data.server_test_fraction=0.5", "data.client_test_fraction=0",
    "model.hidden=[128, 128]", "run.rounds=4", "train.local_epochs=2", "train.batch_size=16", "strategy.fraction_evaluate=0",
]


def part_record(args) -> None:
    from fedkd.attacks import mia_metrics as mm
    from fedkd.attacks.shadow_federations import run_record_mia

    rows, curves = [], {}
    for label, extra in (("fedavg", []), ("dp-sgd eps=8", ["privacy.mechanism=dp-sgd", "privacy.target_epsilon=8.0"])):
        cfg = _cfg(RECORD_BASE + extra)
        t0 = time.perf_counter()
        res = run_record_mia(cfg, candidates=args.candidates, references=args.references, out_dir=WORK / "record" / label.split()[0], labels={"defence": label})
        acc = float(np.mean([s["accuracy"] for s in res.summaries]))
        for r in res.rows:
            r.update(accuracy=acc, claimed_epsilon=res.summaries[0].get("epsilon"), wall_s=time.perf_counter() - t0)
            rows.append(r)
        for name in ("loss", "lira-online", "lira-offline", "rmia-online"):
            curves[f"{label}: {name}"] = (res.scores[name], res.truth)
    path = mm.write_csv(rows, RESULTS / "membership_record.csv")
    mm.plot_roc(curves, RESULTS / "membership_record_roc_log.png", title=f"record MIA, digits (reduced: {args.candidates} candidates, {args.references} refs)")
    print(f"-> {path}")
    _print(rows, ["defence", "attack", "auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "fpr_resolved_0.1pct", "accuracy", "claimed_epsilon"])


SWEEP = {  # property -> values (the base value is in SUBJECT_BASE)
    "data.subjects_per_client": [2, 5, 10],
    "data.records_per_subject": [10, 30, 90],
    "data.subject_separation": [0.5, 2.0, 5.0],
    "model.hidden": [[16], [64, 64], [256, 256]],
    "run.rounds": [2, 8, 16],
    "train.local_epochs": [1, 2, 5],
}


def part_sweep(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from fedkd.attacks.federations import run_many
    from fedkd.attacks.mia_metrics import write_csv

    cfgs = []
    for prop, values in SWEEP.items():
        for v in values:
            for seed in range(args.seeds):
                o = SUBJECT_BASE + [f"{prop}={json.dumps(v)}", f"run.seed={seed}"]
                if prop == "data.subjects_per_client":
                    o += [f"data.num_subjects={8 * v}"]  # keep half of the subjects non-members
                cfgs.append((prop, v, seed, _cfg(o)))
    t0 = time.perf_counter()
    results = run_many([c for *_, c in cfgs], parallel=True)
    rows = []
    for (prop, v, seed, cfg), (summary, rounds) in zip(cfgs, results):
        for row in subject_attack(cfg, rounds):
            row.update(property=prop, value=str(v), seed=seed, accuracy=summary["accuracy"])
            rows.append(row)
    path = write_csv(rows, RESULTS / "membership_sweep.csv")
    print(f"{len(cfgs)} federations in {time.perf_counter() - t0:.0f} s -> {path}")
    df = pd.DataFrame(rows)
    fig, axes = plt.subplots(2, 3, figsize=(11, 6.5))
    for ax, prop in zip(axes.flat, SWEEP):
        d = df[df["property"] == prop]
        for attack, g in d.groupby("attack"):
            m = g.groupby("value", sort=False)["auc"].mean()
            ax.plot(range(len(m)), m.values, "o-", label=attack.replace("subject-", ""))
            ax.set_xticks(range(len(m)), m.index)
        ax.axhline(0.5, color="k", lw=0.6, ls="--")
        ax.set_ylim(0.3, 1.02)
        ax.set_title(prop, fontsize=9)
        ax.set_ylabel("AUC (unknown subjects)")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Subject MIA AUC vs federation properties (REDUCED: one property at a time around the base, {args.seeds} seed(s), 20 member + 20 non-member subjects)", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "membership_sweep.png", dpi=110)
    print(f"-> {RESULTS / 'membership_sweep.png'}")
    _print(rows, ["property", "value", "seed", "attack", "auc", "accuracy"])


AUDITS = {  # name -> (overrides, canary kind)
    "dp-sgd": (RECORD_BASE[:4] + ["data.client_test_fraction=0", "model.hidden=[64]", "run.rounds=3", "train.local_epochs=1", "strategy.fraction_evaluate=0",
               "privacy.mechanism=dp-sgd", "privacy.target_epsilon=2.0"], "record"),
    "gaussian": (RECORD_BASE[:4] + ["data.client_test_fraction=0", "model.hidden=[64]", "run.rounds=3", "train.local_epochs=1", "strategy.fraction_evaluate=0",
                 "privacy.mechanism=gaussian", "privacy.target_epsilon=2.0", "privacy.max_grad_norm=1.0"], "record"),
    "rqm": (RECORD_BASE[:4] + ["data.client_test_fraction=0", "model.hidden=[64]", "run.rounds=3", "train.local_epochs=1", "strategy.fraction_evaluate=0",
            "privacy.mechanism=rqm", "privacy.target_epsilon=8.0"], "record"),
    "subject-dp": (SUBJECT_BASE[:8] + ["data.client_test_fraction=0", "model.hidden=[64]", "run.rounds=3", "train.local_epochs=1", "strategy.fraction_evaluate=0",
                   "privacy.mechanism=subject-dp", "privacy.target_epsilon=2.0", "subject_dp.subjects_per_step=20", "audit.records_per_canary=2"], "subject"),
    "none": (RECORD_BASE[:4] + ["data.client_test_fraction=0", "model.hidden=[64]", "run.rounds=3", "train.local_epochs=1", "strategy.fraction_evaluate=0"], "record"),
    # undefended, with canaries a large share of the data and more local training (the setting above gives AUC ~0.5)
    "none-small": (RECORD_BASE[:4] + ["data.client_test_fraction=0", "model.hidden=[64]", "run.rounds=4", "train.local_epochs=5", "strategy.fraction_evaluate=0",
                   "data.max_samples=400"], "record"),
}


def part_audit(args) -> None:
    from fedkd.attacks.mia_metrics import write_csv
    from fedkd.privacy.audit_run import run_audit

    rows = []
    for name in args.mechanisms:
        overrides, _ = AUDITS[name]
        cfg = _cfg(overrides + [f"audit.canaries={args.canaries}"])
        t0 = time.perf_counter()
        rep = run_audit(cfg, runs=args.runs, out_dir=WORK / "audit" / name, parallel=args.runs > 1)
        b = rep["bounds"]
        rows.append({
            "mechanism": name, "unit": rep["unit"], "canaries": rep["canaries"], "runs": rep["runs"], "attack": rep["attack"],
            "accountant_epsilon": rep["accountant_epsilon"], "claimed_epsilon_for_unit": rep["claimed_epsilon"], "delta": rep["claimed_delta"],
            "one_run_bound": b["one-run"]["epsilon"], "clopper_pearson_bound": b["clopper-pearson"]["epsilon"],
            "bayesian_bound": b.get("bayesian", {}).get("epsilon"), "ok": rep["ok"], "accuracy": float(np.mean([a for a in rep["accuracy"] if a is not None])),
            "wall_s": time.perf_counter() - t0,
        })
    path = RESULTS / "membership_audit.csv"
    if args.append and path.exists():
        import pandas as pd

        rows = pd.read_csv(path).to_dict("records") + rows
    path = write_csv(rows, path)
    print(f"-> {path}")
    _print(rows, list(rows[0]))


def _print(rows, cols) -> None:
    import pandas as pd

    print(pd.DataFrame(rows)[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["subject", "record", "sweep", "audit"])
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--candidates", type=int, default=400)
    p.add_argument("--references", type=int, default=8)
    p.add_argument("--canaries", type=int, default=300)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--append", action="store_true", help="audit: add rows to the existing CSV")
    p.add_argument("--mechanisms", nargs="+", default=["dp-sgd", "gaussian", "rqm", "subject-dp"], choices=list(AUDITS))
    args = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    {"subject": part_subject, "record": part_record, "sweep": part_sweep, "audit": part_audit}[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
