"""Server strategies, by name. Every entry builds a Flower ``Strategy`` for an experiment.

Add a strategy: write ``strategies/<paper>.py`` with a builder ``(cfg, federation) -> StrategySpec``,
register it with ``@STRATEGIES.register("<name>")`` and import the module below. A builder that
supports clients with different architectures sets ``heterogeneous=True`` on its entry.
"""

from __future__ import annotations

from fedkd.registry import Registry

from .base import StrategyEntry, StrategySpec, central_evaluate_fn, global_model

STRATEGIES: Registry[StrategyEntry] = Registry("strategy")

# privacy.mechanism -> wrapper(spec, cfg, federation) -> spec. A mechanism that is a server-side
# wrapper around any weight-aggregating strategy (paired with a client mod in fedkd.clients.MODS)
# registers here; run_server applies it to whatever strategy the experiment names.
PRIVACY_WRAPPERS: dict = {}


def build_strategy(cfg, fed) -> StrategySpec:
    """The experiment's strategy, wrapped by its privacy mechanism when that mechanism is a wrapper."""
    spec = STRATEGIES.get(cfg.strategy.name).build(cfg, fed)
    wrap = PRIVACY_WRAPPERS.get(cfg.privacy.mechanism)
    return wrap(spec, cfg, fed) if wrap is not None else spec

from . import fedavg  # noqa: E402,F401  (registers "fedavg", "fedprox")
from . import local, fd, fedmd  # noqa: E402,F401  (registers "local", "fd", "fedmd")
from . import feddf, fedd2s  # noqa: E402,F401  (registers "feddf", "fedd2s")
from . import fedlgd  # noqa: E402,F401  (registers "fedlgd"; [fedlgd] section and hooks)
from . import hyperfl, pfedhn  # noqa: E402,F401  (registers "hyperfl", "pfedhn", "pfedhn-pc"; [hyperfl], [pfedhn] sections)

from . import rqm  # noqa: E402,F401  (PRIVACY_WRAPPERS["rqm"], summary fields of DP runs)
from . import dp_fedavg  # noqa: E402,F401  (PRIVACY_WRAPPERS["gaussian"])

__all__ = ["PRIVACY_WRAPPERS", "STRATEGIES", "build_strategy", "StrategyEntry", "StrategySpec", "central_evaluate_fn", "global_model"]
from fedkd.privacy import subject_dp_mechanism  # noqa: E402,F401  (PRIVACY_WRAPPERS["subject-dp"], its client, [subject_dp] and [audit])
