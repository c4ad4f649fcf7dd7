"""Server strategies, by name. Every entry builds a Flower ``Strategy`` for an experiment.

Add a strategy: write ``strategies/<paper>.py`` with a builder ``(cfg, federation) -> StrategySpec``,
register it with ``@STRATEGIES.register("<name>")`` and import the module below. A builder that
supports clients with different architectures sets ``heterogeneous=True`` on its entry.
"""

from __future__ import annotations

from fedkd.registry import Registry

from .base import StrategyEntry, StrategySpec, central_evaluate_fn, global_model

STRATEGIES: Registry[StrategyEntry] = Registry("strategy")

from . import fedavg  # noqa: E402,F401  (registers "fedavg", "fedprox")

__all__ = ["STRATEGIES", "StrategyEntry", "StrategySpec", "central_evaluate_fn", "global_model"]
