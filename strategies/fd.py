"""FD: Federated Distillation (Jeong et al. 2018, arXiv 1811.11479). No public data, no weights.

Per round (client side in ``clients/fd.py``):

1. Each sampled client trains its own model on its private data with
   ``CE(y, F(x)) + beta * KD(F(x), G_y)``, where ``G_y`` is the global average logit vector of the
   sample's label ``y`` that the server sent (no distillation term in round 1, and none for labels no
   other client holds). While training it accumulates, per label, the average of the logits its model
   produced on that label's samples.
2. It uploads that (K, K) matrix of per-label average logits (row = label) -- exactly K*K float32
   values -- plus K label weights in the reply's MetricRecord: by default 0/1, which labels it
   holds; with ``fd.weighted = true`` its exact per-label sample counts.
3. The server averages per label over the clients holding it. Default (``fd.weighted = false``): the
   paper's plain, unweighted average of the clients' per-label logits; ``fd.weighted = true``: weighted
   by the per-label counts (more samples, more weight; it also reveals the counts). As in the paper's
   algorithm, the global logits a client receives exclude its own contribution: client i gets
   ``G^(i)_l = sum_{j != i} w_jl F_jl / sum_{j != i} w_jl`` (w = 0/1 or counts; NaN rows where no
   other client has label l), again exactly K*K values. These go down with the next round's train message.

``KD`` is the KL divergence between the temperature-softened distributions, scaled by T^2 (Hinton
et al.); with the default ``fd.temperature = 1`` it is the plain soft-target loss. The paper's
regulariser is a soft-label cross-entropy, which differs from this KL by a constant only (same
gradients). ``fd.beta`` weights it; the paper does not fix a value we could check, so the default is 1.
Clients keep their own models (any architecture); evaluation is personalised.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedkd import keys
from fedkd.config import ConfigError, register_section

from . import STRATEGIES
from .base import StrategyEntry, StrategySpec
from .fedavg import sampling
from .personal import PersonalStrategy, mean_metrics


@register_section("fd")
@dataclass(frozen=True)
class FDConfig:
    beta: float = 1.0  # weight of the distillation term
    temperature: float = 1.0  # softmax temperature of the distillation term (the paper uses none: 1)
    weighted: bool = False  # False: the paper's unweighted per-label average; True: weighted by per-label counts

    def validate(self, cfg) -> None:
        if not (self.temperature > 0 and np.isfinite(self.temperature)):
            raise ConfigError("fd.temperature", f"must be > 0 (got {self.temperature})")
        if not (self.beta >= 0 and np.isfinite(self.beta)):
            raise ConfigError("fd.beta", f"must be >= 0 (got {self.beta})")


def global_logits(logits: np.ndarray, counts: np.ndarray, exclude: int | None = None) -> np.ndarray:
    """Weighted per-label average (weights 0/1 = the paper's unweighted average over holders) of the clients' logits, optionally leaving one client out.

    logits: (M, K, K) per client, row l = the client's average logit vector on label l.
    counts: (M, K) samples per label per client. Returns (K, K); rows no (other) client holds are NaN.
    """
    w = counts.astype(np.float64).copy()  # (M, K)
    if exclude is not None:
        w[exclude] = 0.0
    num = np.einsum("mk,mkc->kc", w, logits.astype(np.float64))  # (K, K)
    den = w.sum(0)  # (K,)
    out = np.full(num.shape, np.nan)
    held = den > 0
    out[held] = num[held] / den[held, None]
    return out.astype(np.float32)


class FD(PersonalStrategy):
    """Per-label logits up, leave-one-out global per-label logits down."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.uploads: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # node id -> ((K, K) logits, (K,) counts)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        nodes, conf = self.sample(server_round, config, grid)
        if not self.uploads:  # round 1: nothing to distil yet
            return [self.message(n, conf) for n in nodes]
        ids = list(self.uploads)
        logits = np.stack([self.uploads[i][0] for i in ids])  # (M, K, K)
        counts = np.stack([self.uploads[i][1] for i in ids])  # (M, K)
        out = []
        for n in nodes:
            g = global_logits(logits, counts, exclude=ids.index(n) if n in self.uploads else None)
            out.append(self.message(n, conf, ArrayRecord({keys.LOGITS: Array(g)})))
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = self.valid(replies)
        uploads = {}
        for r in valid:
            logits = r.content[self.arrayrecord_key][keys.LOGITS].numpy()
            counts = np.asarray(r.content[keys.METRICS][keys.LABEL_COUNTS], dtype=np.float64)
            uploads[r.metadata.src_node_id] = (logits, counts)
        if uploads:
            self.uploads = uploads  # the latest round's uploads make the next global logits
        return None, mean_metrics(valid)


def build_fd(cfg, fed) -> StrategySpec:
    strategy = FD(**sampling(cfg))
    return StrategySpec(strategy, ArrayRecord(), strategy.evaluate_fn, client="fd")


# dp-sgd is refused: the uploaded per-label logits are averages of the model's outputs on private
# training records, which DP-SGD (it protects the model) does not cover; rqm/pbm/gaussian act on weights.
STRATEGIES.add("fd", StrategyEntry(build_fd, heterogeneous=True, mechanisms=("none",), description="Federated Distillation (Jeong et al. 2018): per-label logits, no public data"))
