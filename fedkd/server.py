"""The server side of a fedkd run, shared by every runtime (fast simulation, Flower simulation, deployment)."""

from __future__ import annotations

import logging
import random
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from fedkd import keys
from fedkd.config import ExperimentConfig
from fedkd.data import load_federation
from fedkd.recording import Observer, RecordingGrid
from fedkd.results import RunRecorder, write_summary

# (column, width, format) of the per-round table
TABLE_COLUMNS = [
    ("round", 5, "d"),
    ("test_accuracy", 13, ".4f"),
    ("test_loss", 9, ".4f"),
    ("client_train_loss", 17, ".4f"),
    ("client_test_accuracy", 20, ".4f"),
    ("epsilon", 8, ".3f"),
    ("round_s", 7, ".2f"),
]


def table_header() -> str:
    return " ".join(f"{name:>{width}}" for name, width, _ in TABLE_COLUMNS)


def table_line(server_round: int, values: dict) -> str:
    cells = []
    for name, width, fmt in TABLE_COLUMNS:
        v = server_round if name == "round" else values.get(name)
        cells.append(f"{v:>{width}{fmt}}" if v is not None else f"{'-':>{width}}")
    return " ".join(cells)


@contextmanager
def quiet_flower(verbose: bool = False):
    """Flower logs every round at INFO; fedkd prints its own table instead."""
    logger = logging.getLogger("flwr")
    old = logger.level
    if not verbose:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)


# Extension hooks, filled by other packages at import time:
# OBSERVER_FACTORIES: (cfg, run_dir or None) -> Observer or None. Observers see every exchange
#   (round, sent messages, replies) of any run, in simulation and deployment (e.g. attack recordings).
# SUMMARY_HOOKS: (cfg, recorder) -> dict of extra summary.json fields (e.g. privacy accounting).
OBSERVER_FACTORIES: list = []
SUMMARY_HOOKS: list = []


def seed_everything(seed: int) -> None:
    random.seed(seed)  # Flower samples nodes with the `random` module
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_server(
    grid: Grid,
    cfg: ExperimentConfig,
    recorder: RunRecorder,
    *,
    spec=None,
    progress: bool = True,
    observers: list[Observer] | None = None,
    echo=print,
):
    """Run the configured strategy on ``grid``; metrics go to ``recorder``. Returns Flower's Result."""
    from tqdm.auto import tqdm

    from fedkd.strategies import build_strategy

    seed_everything(cfg.run.seed)
    fed = load_federation(cfg.data, cfg.run.seed)
    if spec is None:
        spec = build_strategy(cfg, fed)
    seed_everything(cfg.run.seed)
    conf = {keys.EXPERIMENT: cfg.to_json(), keys.CLIENT_LOGIC: spec.client, **(spec.extra_config or {})}
    observers = list(observers or [])
    for factory in OBSERVER_FACTORIES:
        obs = factory(cfg, recorder.out_dir)
        if obs is not None:
            observers.append(obs)
    rgrid = RecordingGrid(grid, recorder, observers)
    bar = tqdm(total=cfg.run.rounds, desc=f"{cfg.strategy.name} rounds", unit="round", disable=not progress, leave=False)
    if progress and echo is print:
        echo = tqdm.write  # keep the table above the progress bar
    echo(table_header())

    def evaluate_fn(server_round, arrays):
        res = spec.evaluate_fn(server_round, arrays) if spec.evaluate_fn else None
        if res is not None:
            recorder.add_many(server_round, "server", "test", dict(res))
        if server_round == 0:
            recorder.flush()
            recorder.start_rounds()
        else:
            recorder.end_round(server_round)
            line = table_line(server_round, recorder.round_table(server_round))
            echo(line)
            bar.update(1)
        return res

    try:
        with quiet_flower():
            return spec.strategy.start(
                grid=rgrid,
                initial_arrays=spec.initial_arrays,
                num_rounds=cfg.run.rounds,
                timeout=3600,
                train_config=ConfigRecord(dict(conf)),
                evaluate_config=ConfigRecord(dict(conf)),
                evaluate_fn=evaluate_fn,
            )
    finally:
        bar.close()


def summarize(cfg: ExperimentConfig, recorder: RunRecorder, t0: float, status: str = "ok", error: str | None = None) -> dict:
    """summary.json's content (also for failed runs: what finished is kept)."""
    df = recorder.frame()
    last = df["round"].max() if len(df) else 0
    acc = recorder.value(int(last), "server", "test", "accuracy")
    loss = recorder.value(int(last), "server", "test", "loss")
    eps_rows = df[(df["metric"] == "epsilon") & (df["node"] != "server")]
    dp = cfg.privacy.mechanism != "none"
    summary = {
        "status": status,
        "run": cfg.run.name,
        "strategy": cfg.strategy.name,
        "dataset": cfg.data.dataset,
        "model": list(cfg.model.name),
        "num_clients": cfg.data.num_clients,
        "rounds": cfg.run.rounds,
        "rounds_completed": len(recorder.round_times),
        "accuracy": acc,
        "loss": loss,
        "wall_s": time.perf_counter() - t0,
        "rounds_wall_s": (recorder.t_rounds_end - recorder.t_rounds_start) if recorder.t_rounds_end else None,
        "bytes_up": recorder.bytes_up,
        "bytes_down": recorder.bytes_down,
        "privacy_mechanism": cfg.privacy.mechanism,
        "privacy_unit": "record" if cfg.privacy.mechanism == "dp-sgd" else None,
        "epsilon": float(eps_rows["value"].max()) if dp and len(eps_rows) else None,
        "delta": cfg.privacy.delta if dp else None,
        "backend": cfg.simulation.backend,
        "failures": recorder.failures[:20],
    }
    for hook in SUMMARY_HOOKS:
        summary.update(hook(cfg, recorder))
    if error is not None:
        summary["error"] = error
    return write_summary(recorder.out_dir, summary)


def new_run_dir(cfg: ExperimentConfig, out: str | Path | None) -> Path:
    """``out`` if given (must not hold a run already), else ``run.out_dir/<name>-<timestamp>``."""
    if out is not None:
        path = Path(out)
        if (path / "summary.json").exists() or (path / "metrics.csv").exists():
            raise FileExistsError(f"{path} already holds a run")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(cfg.run.out_dir) / f"{cfg.run.name}-{stamp}"
        n = 1
        while path.exists():
            n += 1
            path = Path(cfg.run.out_dir) / f"{cfg.run.name}-{stamp}-{n}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.toml").write_text(cfg.to_toml())
    return path
