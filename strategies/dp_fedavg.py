"""Central Gaussian DP-FedAvg (McMahan et al. 2018, arXiv 1710.06963) around any weight-averaging strategy.

Flower's ``DifferentialPrivacyServerSideFixedClipping`` does the mechanics: clip each update
(reply - global) to L2 norm ``privacy.max_grad_norm``, let the wrapped strategy average, add
Gaussian noise of std sigma C / n to the average. That noise matches the accountant
(``fedkd.privacy.gaussian``: sensitivity C on the sum) only for an unweighted mean, so this
wrapper gives every reply the same weight before the wrapped strategy averages.
``privacy.noise_multiplier`` is sigma, or ``privacy.target_epsilon`` is calibrated to sigma over
``run.rounds`` rounds. The noise is drawn from OS entropy, and a round with fewer replies than the
calibrated cohort is refused (see :class:`UniformDPFedAvg`).

Neighbouring relation: the cohort of n clients per round is fixed and public and one client's update
is replaced by zeros (zero-out); the trust model is central (the server sees every clipped update).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

from fedkd import keys
from fedkd.privacy import gaussian
from fedkd.privacy.entropy import numpy_generator

from . import PRIVACY_WRAPPERS
from .base import StrategySpec


# cfg JSON -> rounds whose aggregation was refused (fewer replies than the noise was calibrated for).
REFUSED_ROUNDS: dict[str, list[int]] = {}


class UniformDPFedAvg(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping wrapper with equal client weights, strict reply counts and
    private noise.

    - Strict: the noise std sigma C / n is calibrated for n = ``num_sampled_clients`` replies; a round
      with fewer (or any failed reply) is not aggregated (the global model stays as it was, nothing is
      released), never aggregated under-noised. Refused rounds are listed in summary.json.
    - Private noise: Flower's wrapper draws from NumPy's global generator, which fedkd seeds with
      ``run.seed``; here the noise comes from OS entropy (``fedkd.privacy.entropy``), or from
      ``noise_seed`` and the round with ``privacy.reproducible_noise`` (debugging, no guarantee).
    """

    def __init__(self, *args, noise_seed: int | None = None, run_key: str = "", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.noise_seed = noise_seed
        self.run_key = run_key
        self._round = 0

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        ok = [r for r in replies if not r.has_error()]
        if len(ok) != self.num_sampled_clients or len(ok) != len(replies):
            REFUSED_ROUNDS.setdefault(self.run_key, []).append(server_round)
            return None, None
        for r in ok:
            for rec in r.content.metric_records.values():
                if keys.NUM_EXAMPLES in rec:
                    rec[keys.NUM_EXAMPLES] = 1
        self._round = server_round
        return super().aggregate_train(server_round, replies)

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        std = self.noise_multiplier * self.clipping_norm / self.num_sampled_clients
        seed = None if self.noise_seed is None else zlib.crc32(f"gaussian,{self.noise_seed},{self._round}".encode())
        return add_noise(aggregated_arrays, std, numpy_generator(seed))


def add_noise(arrays: ArrayRecord, std: float, rng: np.random.Generator) -> ArrayRecord:
    """``arrays`` + N(0, std^2) per float coordinate, drawn from ``rng`` (integer arrays untouched)."""
    out = {}
    for name, arr in arrays.items():
        a = arr.numpy()
        if np.issubdtype(a.dtype, np.floating) and std > 0:
            a = (a + rng.normal(0.0, std, a.shape)).astype(a.dtype)
        out[name] = Array(np.asarray(a))
    return ArrayRecord(out)


def noise_multiplier(cfg) -> float:
    p = cfg.privacy
    if p.noise_multiplier is not None:
        return float(p.noise_multiplier)
    return gaussian.calibrate_noise(p.target_epsilon, cfg.run.rounds, p.delta)


def sample_size(cfg) -> int:
    """Clients per round, as Flower's FedAvg samples them (min_train_nodes = 1)."""
    return max(int(cfg.data.num_clients * cfg.strategy.fraction_train), 1)


def wrap_gaussian(spec: StrategySpec, cfg, fed) -> StrategySpec:
    seed = cfg.run.seed if cfg.privacy.reproducible_noise else None
    REFUSED_ROUNDS[cfg.to_json()] = []
    spec.strategy = UniformDPFedAvg(
        spec.strategy, noise_multiplier(cfg), cfg.privacy.max_grad_norm, sample_size(cfg), noise_seed=seed, run_key=cfg.to_json(),
    )
    return spec


PRIVACY_WRAPPERS["gaussian"] = wrap_gaussian
