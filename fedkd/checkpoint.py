"""Per-round checkpoints of a run, and the final model.

After every round the server writes ``<run dir>/checkpoint.pt`` atomically (a temporary file, then
``os.replace``), holding:

- ``round``: the last finished round, and ``arrays``: the global model(s) after it (Flower's ArrayRecord);
- ``strategy``: the strategy's state: ``strategy.state_dict()`` when the strategy defines one (with
  ``load_state_dict``), else every picklable attribute of the strategy object (and of strategies it wraps),
  pickled together so shared references (a model and its optimizer) survive; functions and the
  federation's data are left out, since building the strategy again recreates them;
- ``clients``: every client's ``Context.state``, from the grid's ``client_states()`` when it has one
  (``restore_client_states(states)`` puts them back), else None;
- ``rng``: the states of Python's ``random`` (Flower samples clients with it), NumPy's and torch's global
  generators on the server;
- ``recorder``: the metrics rows, traffic counters and faults so far.

``fedkd run --resume RUN_DIR`` rebuilds the experiment from ``config.toml``, loads the checkpoint and
continues with the next round. ``model.pt`` (written when the run ends, and at every checkpoint) is the
final global model as a torch state dict; :func:`load_model` turns it back into a module.
"""

from __future__ import annotations

import functools
import io
import copyreg
import pickle
import random
import types
from pathlib import Path

import numpy as np
import torch

from fedkd.results import atomic_write

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
VERSION = 1

_SKIP = (types.FunctionType, types.MethodType, types.BuiltinFunctionType, functools.partial, types.ModuleType)


def _skip(value) -> bool:
    from fedkd.config import ExperimentConfig
    from fedkd.data import Federation

    return isinstance(value, _SKIP + (Federation, ExperimentConfig)) or (
        isinstance(value, tuple) and any(isinstance(v, (Federation, ExperimentConfig)) for v in value)
    )


def _picklable(value) -> bool:
    try:
        pickle.dumps(value)
        return True
    except Exception:
        return False


def strategy_state(strategy) -> bytes:
    """The strategy's state as bytes (see the module docstring)."""
    if hasattr(strategy, "state_dict") and hasattr(strategy, "load_state_dict"):
        return pickle.dumps(("state_dict", strategy.state_dict()))
    return pickle.dumps(("attrs", _attrs(strategy)))


def _attrs(obj) -> dict:
    from flwr.serverapp.strategy import Strategy

    keep, inner = {}, {}
    for k, v in vars(obj).items():
        if _skip(v):
            continue
        if isinstance(v, Strategy):
            inner[k] = _attrs(v)
        elif _picklable(v):
            keep[k] = v
    return {"own": keep, "inner": inner}


def load_strategy_state(strategy, data: bytes) -> None:
    kind, state = pickle.loads(data)
    if kind == "state_dict":
        strategy.load_state_dict(state)
    else:
        _set_attrs(strategy, state)


def _set_attrs(obj, state: dict) -> None:
    for k, v in state["own"].items():
        setattr(obj, k, v)
    for k, sub in state["inner"].items():
        _set_attrs(getattr(obj, k), sub)


def rng_state() -> dict:
    out = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _memoryview_as_bytes(m: memoryview):
    return bytes, (m.tobytes(),)


# Records received over gRPC in deployment may view the message's buffer (memoryview, which pickle refuses);
# in a checkpoint they become bytes of their own, wherever they sit (arrays, recorder, strategy attributes).
copyreg.pickle(memoryview, _memoryview_as_bytes)


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _owned(arrays):
    """Arrays received over gRPC (deployment) may view the message's buffer (memoryview), which cannot be
    pickled: give each Array bytes of its own."""
    for rec in ([arrays] if hasattr(arrays, "values") else []):
        for a in rec.values():
            if isinstance(getattr(a, "data", None), memoryview):
                a.data = bytes(a.data)
    return arrays


def save_checkpoint(run_dir: Path, *, server_round: int, arrays, strategy, grid, recorder, cfg_json: str) -> Path:
    clients = grid.client_states() if hasattr(grid, "client_states") else None
    arrays = _owned(arrays)
    ckpt = {
        "version": VERSION,
        "round": int(server_round),
        "config": cfg_json,
        "arrays": arrays,
        "strategy": strategy_state(strategy),
        "clients": clients,
        "rng": rng_state(),
        "recorder": recorder.state(),
    }
    path = Path(run_dir) / CHECKPOINT
    atomic_write(path, _dumps(ckpt))
    return path


def load_checkpoint(run_dir: str | Path) -> dict:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no {CHECKPOINT} (was it written by fedkd run, and did a round finish?)")
    ckpt = torch.load(path, weights_only=False)
    if ckpt.get("version") != VERSION:
        raise ValueError(f"{path} is checkpoint version {ckpt.get('version')}, this fedkd reads version {VERSION}")
    return ckpt


def save_model(run_dir: Path, arrays, meta: dict) -> Path | None:
    """``model.pt``: {"state_dict": the global model's tensors, **meta}; nothing when the server holds no model."""
    if arrays is None or not len(arrays):
        return None
    path = Path(run_dir) / MODEL
    atomic_write(path, _dumps({"state_dict": arrays.to_torch_state_dict(), **meta}))
    return path


def load_model(run_dir: str | Path) -> torch.nn.Module:
    """The final global model of a run (``model.pt``), rebuilt from the run's config.toml.

    >>> model = load_model("runs/default-20260101-120000")   # doctest: +SKIP
    >>> model.eval(); logits = model(x)                      # doctest: +SKIP
    """
    from fedkd.config import load_config
    from fedkd.models import model_from_config

    run_dir = Path(run_dir)
    saved = torch.load(run_dir / MODEL, weights_only=False)
    cfg = load_config(run_dir / "config.toml")
    model = model_from_config(cfg.model, 0, tuple(saved["input_shape"]), int(saved["num_classes"]))
    model.load_state_dict(saved["state_dict"])
    return model
