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
    resume: bool = False,
) -> dict:
    """Run ``cfg`` on its simulation backend. Returns the summary (also in ``<run dir>/summary.json``).

    Everything that can be checked is checked before the run directory is made (the config, the
    data and its partitioning, the strategy's own settings), so a bad experiment leaves nothing behind.
    With ``write=False`` nothing is written at all.
    """
    from fedkd.strategies import build_strategy

    t0 = time.perf_counter()
    fed = load_federation(cfg.data, cfg.run.seed)
    spec = build_strategy(cfg, fed)
    recorder = open_recorder(cfg, out, write=write, resume=resume)  # resume: continue the run in `out` from its checkpoint
    if recorder.out_dir is not None:
        echo(f"run directory: {recorder.out_dir}")
    run = lambda grid: run_server(grid, cfg, recorder, spec=spec, progress=progress, observers=observers, echo=echo)  # noqa: E731
    try:
        if cfg.simulation.backend == "fast":
            from fedkd.simulation import FastGrid

            with FastGrid(cfg.data.num_clients, num_actors=cfg.simulation.num_actors, ray_address=cfg.simulation.ray_address, warmup=cfg.to_json()) as grid:
                run(grid)
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
