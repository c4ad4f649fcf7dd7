"""The server side of a fedkd run, shared by every runtime (fast simulation, Flower simulation, deployment)."""

from __future__ import annotations

import logging
import math
import random
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from fedkd import keys
from fedkd.config import ExperimentConfig
from fedkd.data import load_federation
from fedkd.recording import Diverged, Observer, RecordingGrid, ReplyValidator, nonfinite
from fedkd.results import RunRecorder, write_summary

# exit codes of `fedkd run` by final status (2 is a bad configuration, before anything starts)
EXIT_CODES = {"ok": 0, "failed": 1, "diverged": 3, "interrupted": 130, "terminated": 143}


class Terminated(KeyboardInterrupt):
    """SIGTERM: an interruption (status ``interrupted``), like Ctrl-C, not a failure."""


@contextmanager
def sigterm_interrupts():
    """Turn SIGTERM into :class:`Terminated` while the rounds run (Ray's driver handler would sys.exit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"signal {signum} (SIGTERM)")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def status_of(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return getattr(exc, "status", "failed")

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
# EXTRA_CLIENT_RECORDS: cfg -> how many records clients may hold beyond the federation (e.g. an audit's
# canaries); the reply validator's bound on num-examples adds them.
EXTRA_CLIENT_RECORDS: list = []


def seed_everything(seed: int) -> None:
    random.seed(seed)  # Flower samples nodes with the `random` module
    np.random.seed(seed)
    torch.manual_seed(seed)


def reply_validator(cfg: ExperimentConfig, fed, strategy) -> ReplyValidator:
    """Checks for every reply of this run (see fedkd.recording.ReplyValidator)."""
    size = sum(len(c.train) + len(c.test) for c in fed.clients) + (len(fed.public) if getattr(fed, "public", None) is not None else 0)
    size += sum(int(extra(cfg)) for extra in EXTRA_CLIENT_RECORDS)
    encoded = cfg.privacy.mechanism in ("rqm", "pbm")  # quantized updates: level indices, float arrays only
    return ReplyValidator(size, encoded=encoded, extra=getattr(strategy, "check_reply", None))


def run_rounds(strategy, grid, arrays: ArrayRecord, *, first_round: int, num_rounds: int, timeout: float, train_config: ConfigRecord,
               evaluate_config: ConfigRecord, evaluate_fn, on_round_end=None) -> Result:
    """Flower's ``Strategy.start`` loop (train, aggregate, client evaluation, central evaluation), from
    ``first_round`` on, with ``on_round_end(round, arrays)`` after each round (checkpoints) and a check that
    the aggregate stays finite. Round 0's central evaluation is the caller's."""
    result = Result()
    for rnd in range(first_round, num_rounds + 1):
        replies = grid.send_and_receive(messages=strategy.configure_train(rnd, arrays, train_config, grid), timeout=timeout)
        agg_arrays, agg_metrics = strategy.aggregate_train(rnd, replies)
        if agg_arrays is not None:
            bad = nonfinite(agg_arrays)
            if bad is not None:
                raise Diverged(f"round {rnd}: the aggregated {bad} holds NaN or Inf")
            result.arrays = arrays = agg_arrays
        if agg_metrics is not None:
            result.train_metrics_clientapp[rnd] = agg_metrics
        replies = grid.send_and_receive(messages=strategy.configure_evaluate(rnd, arrays, evaluate_config, grid), timeout=timeout)
        agg_eval = strategy.aggregate_evaluate(rnd, replies)
        if agg_eval is not None:
            result.evaluate_metrics_clientapp[rnd] = agg_eval
        if evaluate_fn is not None:
            res = evaluate_fn(rnd, arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[rnd] = res
        if on_round_end is not None:
            on_round_end(rnd, arrays)
    if result.arrays is None or not len(result.arrays):
        result.arrays = arrays
    return result


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
    """Run the configured strategy on ``grid``; metrics go to ``recorder``. Returns Flower's Result.

    Every reply is checked (fedkd.recording); with a run directory, a checkpoint and summary.json
    (status ``running``) are written after every round. ``recorder.resume_from`` (a loaded checkpoint,
    set by :func:`open_recorder`) continues a run after its last finished round. A failure sets
    ``recorder.status`` (e.g. ``diverged``) before it propagates."""
    try:
        with sigterm_interrupts():
            return _run_server(grid, cfg, recorder, spec=spec, progress=progress, observers=observers, echo=echo)
    except BaseException as e:
        if recorder.status is None:
            recorder.status, recorder.error = status_of(e), f"{type(e).__name__}: {e}"
        recorder.flush()
        raise


def _run_server(grid, cfg, recorder, *, spec, progress, observers, echo):
    from tqdm.auto import tqdm

    from fedkd import checkpoint
    from fedkd.strategies import build_strategy

    seed_everything(cfg.run.seed)
    fed = load_federation(cfg.data, cfg.run.seed)
    if spec is None:
        spec = build_strategy(cfg, fed)
    seed_everything(cfg.run.seed)
    resume = getattr(recorder, "resume_from", None)
    conf = {keys.EXPERIMENT: cfg.to_json(), keys.CLIENT_LOGIC: spec.client, **(spec.extra_config or {})}
    observers = list(observers or [])
    for factory in OBSERVER_FACTORIES:
        obs = factory(cfg, recorder.out_dir)
        if obs is not None:
            observers.append(obs)
    timeout = cfg.simulation.round_timeout
    rgrid = RecordingGrid(grid, recorder, observers, validator=reply_validator(cfg, fed, spec.strategy), timeout=timeout,
                          min_replies=cfg.strategy.min_replies)
    first = 1 if resume is None else resume["round"] + 1
    bar = tqdm(total=cfg.run.rounds, initial=first - 1, desc=f"{cfg.strategy.name} rounds", unit="round", disable=not progress, leave=False)
    if progress and echo is print:
        echo = tqdm.write  # keep the table above the progress bar
    echo(table_header())
    save = recorder.out_dir is not None and cfg.run.checkpoint
    model_meta = {"input_shape": list(fed.input_shape), "num_classes": int(fed.num_classes), "model": list(cfg.model.name)}

    def evaluate_fn(server_round, arrays):
        res = spec.evaluate_fn(server_round, arrays) if spec.evaluate_fn else None
        if res is not None:
            recorder.add_many(server_round, "server", "test", dict(res))
            loss = dict(res).get(keys.LOSS)
            if server_round > 0 and isinstance(loss, float) and not math.isfinite(loss):
                recorder.end_round(server_round)
                raise Diverged(f"round {server_round}: the global model's test loss is {loss}")
        if server_round == 0:
            recorder.flush()
            recorder.start_rounds()
        else:
            recorder.end_round(server_round)
            line = table_line(server_round, recorder.round_table(server_round))
            echo(line)
            bar.update(1)
        return res

    def on_round_end(server_round, arrays):
        if save:
            checkpoint.save_checkpoint(recorder.out_dir, server_round=server_round, arrays=arrays, strategy=spec.strategy, grid=grid,
                                       recorder=recorder, cfg_json=cfg.to_json())
        if recorder.out_dir is not None:
            summarize(cfg, recorder, recorder.t_start, status="running")

    arrays = spec.initial_arrays
    if resume is not None:
        arrays = resume["arrays"]
        checkpoint.load_strategy_state(spec.strategy, resume["strategy"])
        if resume.get("clients") is not None:
            if hasattr(grid, "restore_client_states"):
                grid.restore_client_states(resume["clients"])
            elif any(len(s) for s in resume["clients"].values()):
                echo("fedkd: warning: this grid cannot restore the clients' saved state; clients start from empty state")
        checkpoint.set_rng_state(resume["rng"])
        recorder.start_rounds()
        echo(f"resuming after round {resume['round']}")
    try:
        with quiet_flower():
            if resume is None:
                evaluate_fn(0, arrays)
            result = run_rounds(spec.strategy, rgrid, arrays, first_round=first, num_rounds=cfg.run.rounds, timeout=timeout,
                                train_config=ConfigRecord(dict(conf)), evaluate_config=ConfigRecord(dict(conf)), evaluate_fn=evaluate_fn,
                                on_round_end=on_round_end)
    finally:
        bar.close()
    if recorder.out_dir is not None:
        checkpoint.save_model(recorder.out_dir, result.arrays, model_meta)
    return result


def summarize(cfg: ExperimentConfig, recorder: RunRecorder, t0: float, status: str = "ok", error: str | None = None) -> dict:
    """summary.json's content (also for failed runs: what finished is kept)."""
    df = recorder.frame()
    last = df["round"].max() if len(df) else 0
    acc = recorder.value(int(last), "server", "test", "accuracy")
    loss = recorder.value(int(last), "server", "test", "loss")
    eps_rows = df[(df["metric"] == "epsilon") & (df["node"] != "server")]
    dp = cfg.privacy.mechanism != "none"
    if status != "running" and recorder.status is not None:  # decided where the run failed (e.g. diverged)
        status = recorder.status
        error = error if error is not None and status == "failed" else (recorder.error or error)
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
        "faults": recorder.faults[:100],  # replies rejected, failed or missing: {round, node, kind, reason}
        "faults_count": {k: sum(f["kind"] == k for f in recorder.faults) for k in ("rejected", "error", "missing")},
    }
    for hook in SUMMARY_HOOKS:
        summary.update(hook(cfg, recorder))
    if error is not None:
        summary["error"] = error
    return write_summary(recorder.out_dir, summary)


def open_recorder(cfg: ExperimentConfig, out: str | Path | None, *, write: bool = True, resume: bool = False) -> RunRecorder:
    """The run's recorder: a new run directory, none (``write=False``), or (``resume``) the run in ``out``
    continued from its checkpoint (``recorder.resume_from``)."""
    if not write:
        return RunRecorder(None)
    if not resume:
        return RunRecorder(new_run_dir(cfg, out))
    from fedkd import checkpoint

    ckpt = checkpoint.load_checkpoint(out)
    recorder = RunRecorder(None)
    recorder.out_dir = Path(out)
    recorder.restore(ckpt["recorder"])
    recorder.resume_from = ckpt
    return recorder


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
