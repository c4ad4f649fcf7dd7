"""Central Gaussian DP-FedAvg (McMahan et al. 2018, arXiv 1710.06963) around any weight-averaging strategy.

Flower's ``DifferentialPrivacyServerSideFixedClipping`` does the mechanics: clip each update
(reply - global) to L2 norm ``privacy.max_grad_norm``, let the wrapped strategy average, add
Gaussian noise of std sigma C / n to the average. That noise matches the accountant
(``fedkd.privacy.gaussian``: sensitivity C on the sum) only for an unweighted mean, so this
wrapper gives every reply the same weight before the wrapped strategy averages.
``privacy.noise_multiplier`` is sigma, or ``privacy.target_epsilon`` is calibrated to sigma over
``run.rounds`` rounds.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

from fedkd import keys
from fedkd.privacy import gaussian

from . import PRIVACY_WRAPPERS
from .base import StrategySpec


class UniformDPFedAvg(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping wrapper with equal client weights."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for r in replies:
            if not r.has_error():
                for rec in r.content.metric_records.values():
                    if keys.NUM_EXAMPLES in rec:
                        rec[keys.NUM_EXAMPLES] = 1
        return super().aggregate_train(server_round, replies)


def noise_multiplier(cfg) -> float:
    p = cfg.privacy
    if p.noise_multiplier is not None:
        return float(p.noise_multiplier)
    return gaussian.calibrate_noise(p.target_epsilon, cfg.run.rounds, p.delta)


def sample_size(cfg) -> int:
    """Clients per round, as Flower's FedAvg samples them (min_train_nodes = 1)."""
    return max(int(cfg.data.num_clients * cfg.strategy.fraction_train), 1)


def wrap_gaussian(spec: StrategySpec, cfg, fed) -> StrategySpec:
    spec.strategy = UniformDPFedAvg(spec.strategy, noise_multiplier(cfg), cfg.privacy.max_grad_norm, sample_size(cfg))
    return spec


PRIVACY_WRAPPERS["gaussian"] = wrap_gaussian
