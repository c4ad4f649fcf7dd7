"""Server half of the Randomized Quantization Mechanism (RQM, arXiv 2306.11913): a strategy wrapper.

Clients (``fedkd.clients.rqm.rqm_mod``) send level indices of their clipped update. The wrapper
decodes each reply into the update B(z) = -X + 2 z X / (m - 1), rebuilds ``global + update`` and
hands those replies to the wrapped strategy, whose own averaging then yields global + the mean
decoded update (FedAvg weights by ``num-examples``; unbiased either way, as E[B(z)] = x). It wraps
FedAvg, FedProx and any strategy that aggregates weights, the way Flower's DP wrappers do.

With ``privacy.target_epsilon`` set, the builder calibrates ``extend`` (the paper's Delta) for the
model's number of coordinates and ``run.rounds`` and sends it to the clients in the config.
The same wrapper decodes the Poisson Binomial Mechanism baseline (``privacy.mechanism = "pbm"``,
``fedkd.privacy.pbm``; ``target_epsilon`` calibrates its theta).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedkd import keys
from fedkd.privacy import pbm, rqm

from . import PRIVACY_WRAPPERS
from .base import StrategySpec

# cfg JSON -> the RQMParams / PBMParams in force (extend / theta may be calibrated), for the summary hook.
IN_FORCE: dict = {}


class RQMStrategy(Strategy):
    """Decode RQM level indices (or PBM counts) in train replies, then let ``strategy`` aggregate."""

    def __init__(self, strategy: Strategy, params) -> None:
        super().__init__()
        self.strategy = strategy
        self.params = params
        self.current_arrays = ArrayRecord()

    def __repr__(self) -> str:
        return f"quantizing DP wrapper ({self.params}) around {self.strategy!r}"

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.current_arrays = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def decode_reply(self, record: ArrayRecord) -> ArrayRecord:
        """global + B(z) for every quantized array; the global value for arrays not sent."""
        return decode_quantized(self.current_arrays, record, self.params)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:
            if reply.has_error() or keys.ARRAYS not in reply.content.array_records:
                continue
            reply.content[keys.ARRAYS] = self.decode_reply(reply.content[keys.ARRAYS])
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)


def decode_quantized(global_arrays: ArrayRecord, record: ArrayRecord, params) -> ArrayRecord:
    """What the server reads from one client's reply: global + decode(z) for every quantized array
    (the global value for arrays not sent). ``params`` is an RQM or PBM codec."""
    out = {}
    m = params.symbols
    for name, cur in global_arrays.items():
        g = cur.numpy()
        if name not in record:
            out[name] = Array(np.array(g, copy=True))
            continue
        z = record[name].numpy()
        if not np.issubdtype(z.dtype, np.unsignedinteger) or z.shape != g.shape or (z.size and int(z.max()) >= m):
            raise ValueError(f"RQM reply array {name!r} is not level indices in [0, {m - 1}] of shape {g.shape}")
        out[name] = Array((g.astype(np.float64) + params.decode(z).numpy()).astype(g.dtype))
    return ArrayRecord(out)


def float_coords(arrays: ArrayRecord) -> int:
    """How many coordinates a client quantizes: the float entries of the model."""
    return sum(int(a.numpy().size) for a in arrays.values() if np.issubdtype(a.numpy().dtype, np.floating))


def params_in_force(cfg, initial_arrays: ArrayRecord) -> rqm.RQMParams:
    p = cfg.privacy
    extend = p.extend
    if p.target_epsilon is not None:
        extend = rqm.calibrate_extend(p.target_epsilon, p.clip, p.levels, p.keep_prob, float_coords(initial_arrays), cfg.run.rounds, p.delta)
    return rqm.RQMParams(p.clip, extend, p.levels, p.keep_prob)


def wrap_rqm(spec: StrategySpec, cfg, fed) -> StrategySpec:
    params = params_in_force(cfg, spec.initial_arrays)
    IN_FORCE[cfg.to_json()] = params
    spec.strategy = RQMStrategy(spec.strategy, params)
    spec.extra_config = {**(spec.extra_config or {}), keys.RQM_EXTEND: float(params.extend)}
    return spec


def wrap_pbm(spec: StrategySpec, cfg, fed) -> StrategySpec:
    p = cfg.privacy
    theta = p.theta
    if p.target_epsilon is not None:
        theta = pbm.calibrate_theta(p.target_epsilon, p.clip, p.trials, float_coords(spec.initial_arrays), cfg.run.rounds, p.delta)
    params = pbm.PBMParams(p.clip, theta, p.trials)
    IN_FORCE[cfg.to_json()] = params
    spec.strategy = RQMStrategy(spec.strategy, params)
    spec.extra_config = {**(spec.extra_config or {}), keys.PBM_THETA: float(theta)}
    return spec


PRIVACY_WRAPPERS["rqm"] = wrap_rqm
PRIVACY_WRAPPERS["pbm"] = wrap_pbm


def _register_summary() -> None:
    from fedkd.privacy.report import privacy_summary, wire_summary
    from fedkd.server import SUMMARY_HOOKS

    for hook in (privacy_summary, wire_summary):
        if hook not in SUMMARY_HOOKS:
            SUMMARY_HOOKS.append(hook)


_register_summary()
