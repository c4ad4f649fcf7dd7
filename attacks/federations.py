"""Real fedkd federations for membership inference: every round's global model recorded, and many
small federations at once.

- :class:`GlobalModelRecorder`: an observer (``fedkd.server`` observers see every exchange) that keeps
  the global model the server sends in each round: the train message of round r carries the model after
  round r - 1, an evaluate message of round r the model after round r. With the final model from Flower's
  ``Result`` this is every model a participant of a FedAvg federation receives: a
  :class:`~fedkd.attacks.membership.RoundsObservation`. ``[membership] record_global_models = true`` also
  writes them to ``<run_dir>/global_models/round0003.pt`` in ordinary runs (simulation or deployment).
- :func:`run_federation`: one experiment (same ServerApp logic, strategies, privacy wrappers, ClientApp
  and mods as ``fedkd run``) on :class:`fedkd.attacks.inline.InlineGrid` (the ClientApp in this process,
  for federations too small to pay for actors); returns its summary and the recorded rounds.
- :func:`run_many`: many such federations in parallel, one Ray task each (a local Ray with
  ``num_cpus`` workers, or ``ray_address``), or serially with ``parallel=False``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fedkd import keys
from fedkd.config import register_section
from fedkd.server import OBSERVER_FACTORIES
from fedkd.attacks.inline import InlineGrid

from .membership import ModelObservation, RoundsObservation


@dataclass(frozen=True)
class MembershipConfig:
    record_global_models: bool = False  # write every round's global model to <run_dir>/global_models/

    def validate(self, cfg) -> None:
        return None


register_section("membership")(MembershipConfig)


def _describe(cfg):
    from fedkd.data import load_federation

    fed = load_federation(cfg.data, cfg.run.seed)
    name = cfg.model.name[0]
    return name, tuple(fed.input_shape), fed.num_classes, (tuple(cfg.model.hidden) if name == "mlp" else None), cfg.model.dropout


class GlobalModelRecorder:
    """Observer keeping {round: state dict} of the global model (round 0 = the initial model)."""

    def __init__(self, cfg, folder: Path | None = None) -> None:
        self.cfg = cfg
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.folder = Path(folder) if folder is not None else None

    def _model_state(self, arrays) -> dict[str, torch.Tensor]:
        """The global model's state dict; FedDF packs one model per architecture group as "<model>/<param>": the
        group of this experiment's (first) model is the global model the attacks load."""
        state = {k: v.detach().clone() for k, v in arrays.to_torch_state_dict().items()}
        prefix = f"{self.cfg.model.name[0]}/"
        if state and all("/" in k for k in state) and any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        return state

    def _keep(self, rnd: int, msg) -> None:
        if rnd in self.states or not msg.has_content() or keys.ARRAYS not in msg.content.array_records:
            return
        state = self._model_state(msg.content[keys.ARRAYS])
        self.states[rnd] = state
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            torch.save(state, self.folder / f"round{rnd:04d}.pt")

    def __call__(self, server_round: int, sent: list, replies: list) -> None:
        for m in sent[:1]:  # every message of an exchange carries the same global model
            kind = m.metadata.message_type
            if kind.startswith("train"):
                self._keep(server_round - 1, m)
            elif kind.startswith("evaluate"):
                self._keep(server_round, m)

    def add_final(self, server_round: int, arrays) -> None:
        if arrays is not None and server_round not in self.states:
            self.states[server_round] = self._model_state(arrays)

    def observation(self) -> RoundsObservation:
        name, shape, k, hidden, dropout = _describe(self.cfg)
        return RoundsObservation(tuple(ModelObservation(name, shape, k, self.states[r], hidden, dropout, r) for r in sorted(self.states)))


def load_rounds(run_dir: str | Path) -> RoundsObservation:
    """The global models a run with ``membership.record_global_models`` wrote."""
    from fedkd.config import load_config

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.toml")
    name, shape, k, hidden, dropout = _describe(cfg)
    files = sorted((run_dir / "global_models").glob("round*.pt"))
    if not files:
        raise FileNotFoundError(f"{run_dir} has no global_models/ (run with --set membership.record_global_models=true)")
    return RoundsObservation(tuple(ModelObservation(name, shape, k, torch.load(f), hidden, dropout, int(f.stem[5:])) for f in files))


def _factory(cfg, run_dir):
    m = getattr(cfg, "membership", None)
    if m is None or not m.record_global_models or run_dir is None:
        return None
    return GlobalModelRecorder(cfg, Path(run_dir) / "global_models")


OBSERVER_FACTORIES.append(_factory)


# ---------------------------------------------------------------- in-process federations
def run_federation(cfg, out: str | Path | None = None) -> tuple[dict, RoundsObservation]:
    """Run ``cfg`` in this process; returns (summary, every round's global model)."""
    from fedkd.data import load_federation
    from fedkd.results import RunRecorder
    from fedkd.server import new_run_dir, run_server, summarize
    from fedkd.strategies import build_strategy

    t0 = time.perf_counter()
    fed = load_federation(cfg.data, cfg.run.seed)
    spec = build_strategy(cfg, fed)
    recorder = RunRecorder(new_run_dir(cfg, out) if out is not None else None)
    rec = GlobalModelRecorder(cfg)
    result = run_server(InlineGrid(cfg.data.num_clients), cfg, recorder, spec=spec, progress=False, observers=[rec], echo=lambda *_: None)
    rec.add_final(cfg.run.rounds, getattr(result, "arrays", None))
    summary = summarize(cfg, recorder, t0)
    return summary, rec.observation()


def _remote_body(cfg_json: str, extra_path: list[str]) -> tuple[dict, list]:
    import sys

    for p in extra_path:
        if p not in sys.path:
            sys.path.insert(0, p)
    torch.set_num_threads(1)
    from fedkd.config import config_from_json

    summary, rounds = run_federation(config_from_json(cfg_json))
    return summary, [(m.server_round, m.state) for m in rounds.models]


def run_many(cfgs: list, *, parallel: bool = True, num_cpus: int | None = None, ray_address: str = "") -> list[tuple[dict, RoundsObservation]]:
    """Run every experiment of ``cfgs`` (in-process federations); on Ray tasks when ``parallel``."""
    if not parallel or len(cfgs) <= 1:
        return [run_federation(c) for c in cfgs]
    import ray

    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        ray.init(address=ray_address or None, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 **({} if ray_address else {"num_cpus": num_cpus or os.cpu_count() or 1}))
        started = True
    try:
        task = ray.remote(num_cpus=1)(_remote_body)
        outs = ray.get([task.remote(c.to_json(), []) for c in cfgs])
    finally:
        if started:
            ray.shutdown()
    results = []
    for cfg, (summary, states) in zip(cfgs, outs):
        name, shape, k, hidden, dropout = _describe(cfg)
        results.append((summary, RoundsObservation(tuple(ModelObservation(name, shape, k, s, hidden, dropout, r) for r, s in states))))
    return results
