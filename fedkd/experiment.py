"""Run one experiment end to end in simulation: validate, load data, run the rounds, write the run directory."""

from __future__ import annotations

import time
from pathlib import Path

from fedkd.config import ExperimentConfig
from fedkd.data import load_federation
from fedkd.server import open_recorder, run_server, summarize


def run_experiment(
    cfg: ExperimentConfig,
    out: str | Path | None = None,
    *,
    write: bool = True,
    progress: bool = True,
    observers=None,
    echo=print,
    pool=None,
    close_pool: bool = False,
    resume: bool = False,
) -> dict:
    """Run ``cfg`` on its simulation backend. Returns the summary (also in ``<run dir>/summary.json``).

    Everything that can be checked is checked before the run directory is made (the config, the
    data and its partitioning, the strategy's own settings, the actors' resources), so a bad
    experiment leaves nothing behind. With ``write=False`` nothing is written at all.

    Fast path: Ray and the actors start in the background (``pool``: a started
    :class:`fedkd.simulation.ActorPool` to reuse; else the active :class:`fedkd.simulation.Session`'s;
    else a pool of its own, closed at the end) while this thread loads the data and builds the strategy.
    ``close_pool``: close the given ``pool`` at the end too (``fedkd run`` starts one while it validates).
    """
    from fedkd.strategies import build_strategy

    t0 = time.perf_counter()
    own_pool = None
    if cfg.simulation.backend == "fast":
        from fedkd.simulation import ActorPool, active_session

        if pool is None:
            session = active_session()
            pool = session.pool_for(cfg) if session is not None else None
        if pool is not None and close_pool:
            own_pool = pool
        if pool is None:
            pool = own_pool = ActorPool.for_config(cfg, max_actors=cfg.data.num_clients)
    else:
        from fedkd.simulation import active_session

        if active_session() is not None:  # Flower's own Ray must not find our actors holding every CPU
            active_session().close()
    try:
        if pool is not None and not pool.slots:
            # Ray starts in this thread (its driver must) while another loads the data and builds the strategy
            fed, spec = _overlapped(lambda: pool.start(cfg.to_json()), lambda: _prepare(cfg, build_strategy))
        else:
            if pool is not None:
                pool.warm(cfg.to_json())  # the actors load the data while this thread does
            fed, spec = _prepare(cfg, build_strategy)
        recorder = open_recorder(cfg, out, write=write, resume=resume)  # resume: continue the run in `out` from its checkpoint
    except BaseException:
        if own_pool is not None:
            own_pool.close()
        raise
    if recorder.out_dir is not None:
        echo(f"run directory: {recorder.out_dir}")
    run = lambda grid: run_server(grid, cfg, recorder, spec=spec, progress=progress, observers=observers, echo=echo)  # noqa: E731
    try:
        if cfg.simulation.backend == "fast":
            from fedkd.simulation import FastGrid

            try:
                with FastGrid(cfg.data.num_clients, pool=pool, warmup=cfg.to_json()) as grid:
                    run(grid)
            finally:
                if own_pool is not None:
                    own_pool.close()
        else:
            from fedkd.simulation import run_flower_simulation

            run_flower_simulation(cfg, run)
    except KeyboardInterrupt:
        summarize(cfg, recorder, t0, status="interrupted", error="KeyboardInterrupt")
        raise
    except BaseException as e:
        summarize(cfg, recorder, t0, status="failed", error=f"{type(e).__name__}: {e}")
        raise
    summary = summarize(cfg, recorder, t0)
    summary["run_dir"] = str(recorder.out_dir) if recorder.out_dir else None
    return summary


def _prepare(cfg: ExperimentConfig, build_strategy):
    fed = load_federation(cfg.data, cfg.run.seed)
    return fed, build_strategy(cfg, fed)


def _overlapped(here, there):
    """Run ``there`` in a thread while ``here`` runs in this one; ``there``'s result (its exception re-raised)."""
    import threading

    box: dict = {}

    def target():
        try:
            box["result"] = there()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=target, name="fedkd-prepare", daemon=True)
    t.start()
    try:
        here()
    finally:
        t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
