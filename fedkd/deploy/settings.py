"""The ``[deploy]`` config section: how a run behaves where Flower's ServerApp runs it (``flwr run``).

    [deploy]
    one_exchange = "auto"   # "auto": rounds of one exchange where the strategy allows it (fedkd.deploy.one_exchange);
                            # "on": the same, and refuse an experiment that does not allow it; "off": never
    pull_interval = 0.2     # seconds between the ServerApp's pulls for replies (Flower's own Grid: 3 s)
    warm_worker = true      # each SuperNode runs its messages in one long-lived worker process that keeps torch,
                            # fedkd and the partitions loaded (fedkd.deploy.worker); false: every ClientApp
                            # process imports and runs everything itself (Flower's way)
    worker_idle_s = 900.0   # a warm worker that gets no message for this long exits (the next one starts it again)

They apply to ``fedkd deploy local``, docker-compose and ``flwr run`` (the ServerApp of ``fedkd/apps.py``); the
in-process simulation backends do not read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedkd.config import _one_of, _require, register_section

ONE_EXCHANGE = ("auto", "on", "off")


@register_section("deploy")
@dataclass(frozen=True)
class DeploySettings:
    one_exchange: str = "auto"
    pull_interval: float = 0.2
    warm_worker: bool = True
    worker_idle_s: float = 900.0

    def validate(self, cfg) -> None:
        _require(self.one_exchange in ONE_EXCHANGE, "deploy.one_exchange", _one_of(self.one_exchange, list(ONE_EXCHANGE)))
        _require(
            math.isfinite(self.pull_interval) and 0.01 <= self.pull_interval <= 60,
            "deploy.pull_interval",
            f"must be between 0.01 and 60 seconds (got {self.pull_interval})",
        )
        _require(isinstance(self.warm_worker, bool), "deploy.warm_worker", f"must be true or false (got {self.warm_worker!r})")
        _require(
            math.isfinite(self.worker_idle_s) and 1 <= self.worker_idle_s <= 86400,
            "deploy.worker_idle_s",
            f"must be between 1 and 86400 seconds (got {self.worker_idle_s})",
        )
        if self.one_exchange == "on":
            from fedkd.deploy.one_exchange import allowed

            ok, why = allowed(cfg, "weights")
            _require(ok, "deploy.one_exchange", f"'on' is not valid here: {why} (use 'auto' or 'off')")
