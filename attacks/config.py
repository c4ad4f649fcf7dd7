"""The ``[attack]`` config section: which attack, which threat setting, whom to record.

Recording is off unless ``attack.rounds`` and ``attack.clients`` are both set: an ordinary run is
untouched. ``attack.steps = 0`` and ``attack.restarts = 0`` mean "the attack's paper default"
(see each attack's parameter dataclass).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedkd.config import ConfigError, register_section

SETTINGS = ("gradient", "update")
ORDERS = ("unknown", "known")


@dataclass(frozen=True)
class AttackConfig:
    name: str = "ig"
    setting: str = "gradient"  # gradient: one SGD step on one batch; update: the whole local training
    batch_size: int = 1  # images the attacked client holds in an attacked round
    steps: int = 0  # optimisation steps; 0 = the attack's default
    restarts: int = 0  # independent restarts; 0 = the attack's default
    tv: float | None = None  # total-variation weight of ig/dia; None = the attack's default (tuned per dataset where measured)
    # update setting: the client reshuffles every epoch and the server never sees the order. "unknown": the
    # replay assumes the same consecutive mini-batches every epoch (an honest server); "known": an oracle
    # attacker is given the client's order (an upper bound on what the update leaks).
    order: str = "unknown"
    rounds: tuple[int, ...] = ()  # rounds whose replies the server records (empty = record nothing)
    clients: tuple[int, ...] = ()  # partition ids whose replies the server records

    def validate(self, cfg) -> None:
        from . import ATTACKS

        if self.name not in ATTACKS:
            raise ConfigError("attack.name", f"unknown value {self.name!r}; valid: {', '.join(ATTACKS.names())}")
        if self.setting not in SETTINGS:
            raise ConfigError("attack.setting", f"unknown value {self.setting!r}; valid: {', '.join(SETTINGS)}")
        if self.order not in ORDERS:
            raise ConfigError("attack.order", f"unknown value {self.order!r}; valid: {', '.join(ORDERS)}")
        if self.batch_size < 1:
            raise ConfigError("attack.batch_size", f"must be >= 1 (got {self.batch_size})")
        if self.steps < 0:
            raise ConfigError("attack.steps", f"must be >= 0 (0 = the attack's default; got {self.steps})")
        if self.restarts < 0:
            raise ConfigError("attack.restarts", f"must be >= 0 (0 = the attack's default; got {self.restarts})")
        if self.tv is not None and self.tv < 0:
            raise ConfigError("attack.tv", f"must be >= 0 (got {self.tv})")
        if bool(self.rounds) != bool(self.clients):
            raise ConfigError("attack.rounds", "attack.rounds and attack.clients must be set together (or both left empty)")
        for r in self.rounds:
            if not 1 <= r <= cfg.run.rounds:
                raise ConfigError("attack.rounds", f"round {r} outside 1..{cfg.run.rounds} (run.rounds)")
        for c in self.clients:
            if not 0 <= c < cfg.data.num_clients:
                raise ConfigError("attack.clients", f"partition {c} outside 0..{cfg.data.num_clients - 1}")

    @property
    def active(self) -> bool:
        return bool(self.rounds) and bool(self.clients)

    def records(self, server_round: int, partition_id: int) -> bool:
        return self.active and server_round in self.rounds and partition_id in self.clients


register_section("attack")(AttackConfig)
