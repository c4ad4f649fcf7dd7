"""Local-only training (no federation): the isolated-training baseline of the distillation papers.

Every round each sampled client trains its own model for ``train.local_epochs`` on its private data;
nothing but metrics crosses the wire. Evaluation is personalised (``strategies/personal.py``).
Any mix of architectures works.
"""

from __future__ import annotations

from flwr.app import ArrayRecord

from . import STRATEGIES
from .base import StrategyEntry, StrategySpec
from .fedavg import sampling
from .personal import PersonalStrategy


class LocalOnly(PersonalStrategy):
    """Sends each sampled client an empty message; clients train their own models."""


def build_local(cfg, fed) -> StrategySpec:
    strategy = LocalOnly(**sampling(cfg))
    return StrategySpec(strategy, ArrayRecord(), strategy.evaluate_fn, client="local")


STRATEGIES.add("local", StrategyEntry(build_local, heterogeneous=True, mechanisms=("none", "dp-sgd"), description="local-only training, no communication (baseline)"))
