"""Record-level membership inference against a federation's final global model, with reference
(shadow) federations: LOSS, LiRA (online/offline) and RMIA, reported as the field reports them.

Setting (an auditing-style game, said plainly): N candidate records (taken from the server's test split,
so no client holds them otherwise) are each put on one random client. The target federation trains with
a random half of them (coin flips from OS entropy); the adversary trains M reference federations
with the same experiment, each with its own half (every candidate IN for exactly M/2 of them,
:func:`~fedkd.attacks.membership.balanced_in_mask`). The rest of every federation's data is the
experiment's own partitions: the adversary is assumed to know the non-candidate data and the training
recipe (the strong adversary of the LiRA paper's shadow-model setting). It sees only the final global
model's logits on the candidates and on population records (the rest of the server's test split).

All federations are real fedkd federations (:func:`fedkd.attacks.federations.run_many`: one Ray task
each), the candidates ride in through the canary hook (``audit.canary_file``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedkd.privacy.entropy import numpy_generator

from fedkd.privacy.canaries import Canaries

from . import lira, loss_attack, rmia
from . import mia_metrics as mm
from .membership import ReferenceOutputs, TargetOutputs, balanced_in_mask, logits_of


@dataclass(frozen=True)
class RecordMIAResult:
    rows: list  # one mia_metrics.summary row per attack
    scores: dict  # attack -> (N,) scores
    truth: np.ndarray  # (N,) the target's coin flips
    summaries: list  # the federations' summaries (target first)


def record_canaries(x, y, included, clients) -> Canaries:
    return Canaries("record", x, y, np.arange(len(y)), clients, included, x, y)


def run_record_mia(cfg, *, candidates: int = 400, references: int = 8, out_dir: str | Path, parallel: bool = True,
                   seed: int | None = None, labels: dict | None = None) -> RecordMIAResult:
    from fedkd.data import load_federation

    from .federations import run_many

    fed = load_federation(cfg.data, cfg.run.seed)
    pool = fed.server_test
    if len(pool) < candidates + 50:
        raise ValueError(f"the server test split has {len(pool)} records; need {candidates} candidates + >= 50 population records")
    rng = numpy_generator(seed)
    perm = rng.permutation(len(pool))
    cand, pop = perm[:candidates], perm[candidates:]
    x, y = pool.x[cand], pool.y[cand]
    clients = rng.integers(0, cfg.data.num_clients, candidates)
    truth = rng.random(candidates) < 0.5
    ref_in = balanced_in_mask(references, candidates, rng)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfgs = []
    for i, inc in enumerate([truth, *ref_in]):
        path = record_canaries(x, y, inc, clients).save(out / f"candidates-{i}.npz").resolve()
        cfgs.append(cfg.replace(**{"audit.canary_file": str(path)}))
    results = run_many(cfgs, parallel=parallel)
    finals = [r[1].models[-1] for r in results]
    target = TargetOutputs(logits_of(finals[0], x), y)
    refs = ReferenceOutputs(np.stack([logits_of(m, x) for m in finals[1:]]), ref_in)
    population = TargetOutputs(logits_of(finals[0], pool.x[pop]), pool.y[pop])
    pop_refs = np.stack([logits_of(m, pool.x[pop]) for m in finals[1:]])
    scores = {
        "loss": loss_attack.loss_scores(target),
        "lira-online": lira.lira_scores(target, refs, lira.LiRAParams(online=True)),
        "lira-offline": lira.lira_scores(target, refs, lira.LiRAParams(online=False)),
        "rmia-online": rmia.rmia_scores(target, refs, population, pop_refs, rmia.RMIAParams(online=True)),
    }
    labels = dict(labels or {})
    rows = [mm.summary(s, truth, name, references=references, **labels) for name, s in scores.items()]
    return RecordMIAResult(rows, scores, truth, [r[0] for r in results])
