"""``fedkd audit RUN_DIR|CONFIG``: insert canaries, train, attack, bound epsilon from below, compare.

1. The experiment (a run directory's ``config.toml``, or a TOML file, plus ``--set`` overrides) is run
   ``runs`` times as an in-process fedkd federation (:func:`fedkd.attacks.federations.run_federation`:
   the same strategies, privacy wrappers, ClientApp and mods as ``fedkd run``), each time with fresh
   canaries (:mod:`fedkd.privacy.canaries`): ``audit.canaries`` records (or subjects, for subject-level
   DP), each included with probability 1/2 (OS entropy).
2. The adversary sees every round's global model and samples of each canary (the record, or fresh
   samples of a canary subject's distribution) and scores every canary
   (:mod:`fedkd.attacks.canary_attacks`, ``gradient-regression`` by default).
3. Lower bounds at 95% (:mod:`fedkd.privacy.audit`):
   - **one-run** (Steinke, Nasr, Jagielski 2023), per run; with several runs the confidence is split
     over them (Bonferroni) and the largest bound is kept. This is the bound the verdict uses: it is
     valid for canaries that share one training run.
   - **Clopper-Pearson** (Bonferroni over thresholds) and **Bayesian** (Jeffreys posteriors; when there
     are several runs; threshold: "in" for the upper half of the scores, chosen without the coin flips),
     on the canaries pooled over runs. Both treat every canary as an independent trial, which canaries
     sharing a run are not: reported for comparison, not used for the verdict.
4. The claim: the accountant's epsilon in the audited runs' summaries (max over runs), for the unit the
   canaries test. Record canaries under a client-level claim (gaussian, rqm, pbm: add/remove one client)
   are a change *inside* one client, i.e. a replacement: by group privacy the claim for them is
   (2 eps, (1 + e^eps) delta). Exit 1 with a message when the bound exceeds the claim.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from fedkd.config import ConfigError

from . import audit as au
from .canaries import make_canaries

CLIENT_UNIT_MECHANISMS = ("gaussian", "rqm", "pbm")
DEFAULT_SAMPLES = 8  # fresh samples per canary subject the adversary draws


def claim_for(cfg, kind: str, epsilon: float | None) -> tuple[float | None, float, str]:
    """(claimed epsilon for the canaries' unit, its delta, a note)."""
    p = cfg.privacy
    if p.mechanism == "none" or epsilon is None or not math.isfinite(epsilon):
        return None, (p.delta if p.mechanism != "none" else 0.0), "no finite claim"
    if p.mechanism in CLIENT_UNIT_MECHANISMS:
        return 2 * epsilon, (1 + math.exp(epsilon)) * p.delta, f"client-level claim eps={epsilon:.4g}: a canary inside a client is a replacement, group privacy gives 2 eps"
    unit = "subject" if p.mechanism == "subject-dp" else "record"
    if unit != kind:
        raise ConfigError("audit.kind", f"{p.mechanism} claims {unit}-level privacy; audit it with {unit} canaries (got {kind})")
    return epsilon, p.delta, f"{unit}-level claim"


def run_audit(cfg, *, runs: int = 1, attack: str = "gradient-regression", out_dir: str | Path, parallel: bool = False,
              samples: int = DEFAULT_SAMPLES, debug_seed: int | None = None, echo=print) -> dict:
    from fedkd.attacks.canary_attacks import canary_scores
    from fedkd.attacks.federations import run_many
    from fedkd.data import load_federation

    if runs < 1:
        raise ConfigError("--runs", f"must be >= 1 (got {runs})")
    kind = cfg.audit.resolved_kind(cfg)
    if kind == "subject" and cfg.privacy.mechanism not in ("none", "subject-dp"):
        raise ConfigError("audit.kind", f"subject canaries audit subject-level claims; {cfg.privacy.mechanism} claims another unit")
    fed = load_federation(cfg.data, cfg.run.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    a = cfg.audit
    canaries, cfgs = [], []
    for i in range(runs):
        c = make_canaries(kind, a.canaries, fed.input_shape, fed.num_classes, cfg.data.num_clients, records_per_canary=a.records_per_canary,
                          clients_per_canary=a.clients_per_canary, seed=None if debug_seed is None else debug_seed + i)
        path = c.save(out / f"canaries-{i}.npz").resolve()
        canaries.append(c)
        cfgs.append(cfg.replace(**{"audit.canary_file": str(path)}))
    t0 = time.perf_counter()
    results = run_many(cfgs, parallel=parallel)
    train_s = time.perf_counter() - t0
    rng = np.random.default_rng(None if debug_seed is None else debug_seed + 10_000)
    scores, flips, eps_claims = [], [], []
    for c, (summary, rounds) in zip(canaries, results):
        x, y, g = c.fresh_samples(samples, rng)
        scores.append(canary_scores(attack, rounds, x, y, g))
        flips.append(c.included)
        eps_claims.append(summary.get("epsilon"))
    finite = [e for e in eps_claims if e is not None]
    accountant = max(finite) if finite else None
    claimed, delta, note = claim_for(cfg, kind, accountant)

    conf = au.CONFIDENCE
    per_run = [au.one_run_audit(s, f, delta, confidence=1 - (1 - conf) / runs) for s, f in zip(scores, flips)]
    best = max(per_run, key=lambda b: b.epsilon)
    one_run = au.AuditBound("one-run", best.epsilon, conf, delta, {**best.details, "runs": runs, "per_run": [b.epsilon for b in per_run]})
    s_all, f_all = np.concatenate(scores), np.concatenate(flips)
    cp = au.clopper_pearson_audit(s_all, f_all, delta)
    bounds = {"one-run": one_run, "clopper-pearson": cp}
    if runs > 1:
        guess = np.concatenate([s >= np.median(s) for s in scores])
        tp, fp = int((guess & f_all).sum()), int((guess & ~f_all).sum())
        bounds["bayesian"] = au.bayesian_audit(tp, fp, int((~guess & ~f_all).sum()), int((~guess & f_all).sum()), delta)
    unit = "subject" if kind == "subject" else "record"
    verdict = au.compare_with_claim(one_run, claimed, unit=unit)
    report = {
        "mechanism": cfg.privacy.mechanism, "unit": unit, "canaries": a.canaries, "runs": runs, "attack": attack,
        "accountant_epsilon": accountant, "claimed_epsilon": claimed, "claimed_delta": delta, "claim_note": note,
        "bounds": {k: {"epsilon": b.epsilon, "confidence": b.confidence, "details": b.details} for k, b in bounds.items()},
        "verdict": verdict.message, "ok": verdict.ok, "train_s": train_s,
        "accuracy": [r[0].get("accuracy") for r in results],
    }
    (out / "audit.json").write_text(json.dumps(report, indent=2, default=float))
    echo(f"audit: {runs} run(s) of {cfg.privacy.mechanism} with {a.canaries} {unit} canaries each, attack {attack} ({train_s:.1f} s of training)")
    for k, b in bounds.items():
        tag = "" if k == "one-run" else " (treats canaries as independent trials; not used for the verdict)"
        echo(f"  {k:<16} epsilon >= {b.epsilon:.3f} at {b.confidence:.0%}{tag}")
    echo(f"  claimed          {'-' if claimed is None else f'{claimed:.3f}'} ({note}, delta={delta:.3g})")
    echo(verdict.message)
    return report
