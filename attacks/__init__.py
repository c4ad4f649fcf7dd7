"""Attacks by an honest-but-curious server, by name. Each takes only an :class:`Observation`.

Add an attack: write ``attacks/<paper>.py`` with a frozen parameter dataclass (the paper's defaults,
with ``steps`` and ``restarts`` fields) and ``fn(obs, params, device, seed) -> Reconstruction``,
register it with ``ATTACKS.add("<name>", AttackEntry(fn, Params, "description"))`` and import the
module below.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from fedkd.registry import Registry


@dataclass(frozen=True)
class AttackEntry:
    run: Callable  # (obs, params, device, seed) -> Reconstruction
    params: type  # frozen dataclass of hyperparameters with the paper's defaults
    description: str = ""
    tuned: dict | None = None  # dataset name -> {parameter: value} measured for that dataset (README: attack strength)

    def params_for(self, attack_cfg, dataset: str = "") -> object:
        """The defaults (with the values tuned for ``dataset``, if any), then ``attack.steps`` / ``attack.restarts``
        (when > 0) and ``attack.tv`` (when set and the attack has one)."""
        over = dict((self.tuned or {}).get(dataset, {}))
        over.update({k: getattr(attack_cfg, k) for k in ("steps", "restarts") if getattr(attack_cfg, k, 0)})
        names = {f.name for f in dataclasses.fields(self.params)}
        if getattr(attack_cfg, "tv", None) is not None and "tv" in names:
            over["tv"] = attack_cfg.tv
        return dataclasses.replace(self.params(), **over)


ATTACKS: Registry[AttackEntry] = Registry("attack")

from . import config  # noqa: E402,F401  (the [attack] config section)
from . import dlg, idlg, ig, dia  # noqa: E402,F401  (register the attacks)
from . import hyperfl_inversion  # noqa: E402,F401  (hyperfl-ig, hyperfl-dia, hyperfl-rank1 and HyperFL observations)
from . import recorder  # noqa: E402,F401  (records observations when attack.rounds/clients are set)
from . import federations  # noqa: E402,F401  (every round's global model for membership inference; [membership])
from .gradients import Reconstruction  # noqa: E402
from .observation import KnownTraining, Observation, ObservationError, load_observations  # noqa: E402


def run_attack(obs: Observation, attack_cfg, device="cpu", seed: int = 0, dataset: str = "") -> Reconstruction:
    entry = ATTACKS.get(attack_cfg.name)
    return entry.run(obs, entry.params_for(attack_cfg, dataset), device=device, seed=seed)


__all__ = ["ATTACKS", "AttackEntry", "KnownTraining", "Observation", "ObservationError", "Reconstruction", "load_observations", "run_attack"]
