"""Sweeps: many experiments in one Ray session, on the same warm actors, resumable.

    from fedkd.sweep import grid_configs, run_sweep

    configs = grid_configs("configs/default.toml", {"train.lr": [0.01, 0.05], "run.seed": [0, 1]}, ["run.rounds=3"])
    results = run_sweep(configs, "runs/lr-sweep")    # {name: summary}; runs/lr-sweep/<name>/ per experiment

Every experiment is validated before the first one starts. Ray and the actors start once (a
:class:`fedkd.simulation.Session`); each experiment then costs its data loading (overlapped with the
actors loading the same data) and its rounds. An experiment whose run directory holds a finished
summary (status ``ok`` or ``diverged``) is skipped, so an interrupted sweep, run again with the same
output directory, continues where it stopped; an unfinished run directory is cleared and run again.
``<out>/sweep.csv`` (one row per experiment: name, its grid values, status, accuracy, loss, epsilon,
wall_s, rounds_wall_s) is rewritten after every experiment.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import time
from contextlib import nullcontext
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedkd.config import ConfigError, ExperimentConfig, load_config

FINISHED = ("ok", "diverged")  # statuses of a run that needs no rerun
RUN_FILES = ("config.toml", "metrics.csv", "summary.json")


def toml_value(v: Any) -> str:
    """A Python value as the TOML text an override takes (strings are quoted, never converted)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as a TOML value")


def split_values(text: str) -> list[str]:
    """``"0.01,0.05"`` -> ``["0.01", "0.05"]``; commas inside brackets or quotes do not split."""
    out, cur, depth, quote = [], "", 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    out.append(cur.strip())
    return [v for v in out if v]


def experiment_name(assignments: Iterable[tuple[str, str]]) -> str:
    """A directory name for one grid point, e.g. ``train.lr=0.05_run.seed=1``."""
    parts = [f"{k}={v}" for k, v in assignments]
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "-", "_".join(parts)).strip("-")
    return name or "base"


def grid_configs(config: str | Path | None, grid: Mapping[str, Iterable[Any]], overrides: Iterable[str] = ()) -> dict[str, ExperimentConfig]:
    """One validated config per point of the grid's Cartesian product, keyed by :func:`experiment_name`.

    ``grid`` maps ``section.key`` to its values: Python values, or strings that are TOML text as
    ``--set`` takes it (``"0.05"``, ``'["mlp","cnn"]'``). A bad value raises ConfigError naming the key."""
    keys = list(grid)
    texts = [[v if isinstance(v, str) else toml_value(v) for v in grid[k]] for k in keys]
    for k, vs in zip(keys, texts):
        if not vs:
            raise ConfigError(k, "the sweep gives it no values")
    out: dict[str, ExperimentConfig] = {}
    for combo in itertools.product(*texts) if keys else [()]:
        assignments = list(zip(keys, combo))
        name = experiment_name(assignments)
        if name in out:
            raise ConfigError(keys[0] if keys else "sweep", f"two grid points share the name {name!r}")
        out[name] = load_config(config, [*overrides, *(f"{k}={v}" for k, v in assignments)])
    return out


def read_finished(run_dir: Path) -> dict | None:
    """The summary of a finished run in ``run_dir``, else None."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("status") in FINISHED else None


def run_sweep(
    experiments: Mapping[str, ExperimentConfig],
    out: str | Path,
    *,
    resume: bool = True,
    progress: bool = False,
    echo=print,
    stop_on_error: bool = False,
) -> dict[str, dict]:
    """Run every experiment (name -> config) into ``out/<name>`` in one Ray session. Returns name -> summary
    (``skipped`` True for the ones a previous sweep finished; a failed experiment's summary has status
    ``failed`` and its error, and the sweep goes on unless ``stop_on_error``)."""
    from fedkd.experiment import run_experiment
    from fedkd.simulation import Session, active_session

    out = Path(out)
    for name in experiments:
        if not name or "/" in name or name in (".", ".."):
            raise ConfigError("sweep", f"bad experiment name {name!r}")
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    outer = active_session()
    with (nullcontext(outer) if outer is not None else Session()) as session:
        for i, (name, cfg) in enumerate(experiments.items(), 1):
            run_dir = out / name
            done = read_finished(run_dir) if resume else None
            if done is not None:
                results[name] = {**done, "skipped": True}
                echo(f"[{i}/{len(experiments)}] {name}: finished before, skipped")
                continue
            _clear(run_dir)
            echo(f"[{i}/{len(experiments)}] {name}")
            try:
                summary = run_experiment(cfg, run_dir, progress=progress, echo=(lambda s: None) if not progress else echo)
            except (KeyboardInterrupt, ConfigError):
                raise
            except Exception as e:
                if stop_on_error:
                    raise
                summary = read_finished(run_dir) or _failed_summary(run_dir, e)
            results[name] = {**summary, "skipped": False}
            echo(f"    {summary.get('status')}: accuracy {_fmt(summary.get('accuracy'))}, {summary.get('wall_s', 0):.1f}s")
            write_table(out, experiments, results)
        echo(f"sweep: {len(experiments)} experiments in {time.perf_counter() - t0:.1f}s ({session.pools_started} Ray actor pool(s) started), table in {out / 'sweep.csv'}")
    write_table(out, experiments, results)
    return results


def _clear(run_dir: Path) -> None:
    """Remove an unfinished run's files (only fedkd's own; anything else stays)."""
    if not run_dir.is_dir():
        return
    for f in RUN_FILES:
        (run_dir / f).unlink(missing_ok=True)
    for extra in run_dir.iterdir():
        if extra.is_file() and extra.suffix in (".png", ".npz", ".pt", ".tmp"):
            extra.unlink()
        elif extra.is_dir() and extra.name in ("attacks", "checkpoints", "grids"):
            shutil.rmtree(extra)


def _failed_summary(run_dir: Path, e: BaseException) -> dict:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {"status": "failed", "error": f"{type(e).__name__}: {e}"}


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


TABLE_KEYS = ("status", "accuracy", "loss", "epsilon", "delta", "rounds_completed", "wall_s", "rounds_wall_s", "skipped", "error")


def write_table(out: Path, experiments: Mapping[str, ExperimentConfig], results: Mapping[str, dict]) -> Path:
    import pandas as pd

    rows = []
    for name in experiments:
        if name in results:
            r = results[name]
            rows.append({"name": name, **{k: r.get(k) for k in TABLE_KEYS}, "run_dir": str(out / name)})
    path = out / "sweep.csv"
    tmp = path.with_suffix(".csv.tmp")
    pd.DataFrame(rows, columns=["name", *TABLE_KEYS, "run_dir"]).to_csv(tmp, index=False)
    tmp.replace(path)
    return path


# -- the `fedkd sweep` command

def _sweep_args(p) -> None:
    p.add_argument("config", nargs="?", help="experiment TOML every point starts from (default: the built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a key in every experiment (repeatable)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...", help="sweep a key over values (repeatable: the Cartesian product)")
    p.add_argument("--out", help="sweep directory, one run directory per experiment (default: run.out_dir/sweep-<run.name>)")
    p.add_argument("--no-resume", action="store_true", help="run every experiment again, even finished ones")
    p.add_argument("--progress", action="store_true", help="print every experiment's per-round table")


def cmd_sweep(args) -> int:
    """Exit 0 when every experiment finished, 1 when some failed (their errors are in sweep.csv)."""
    grid = {}
    for item in args.grid:
        key, eq, values = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(item, "grid entries look like section.key=v1,v2")
        grid[key.strip()] = split_values(values)
    configs = grid_configs(args.config, grid, args.overrides)
    base = next(iter(configs.values()))
    out = Path(args.out) if args.out else Path(base.run.out_dir) / f"sweep-{base.run.name}"
    results = run_sweep(configs, out, resume=not args.no_resume, progress=args.progress)
    return 0 if all(r.get("status") in FINISHED for r in results.values()) else 1


def _register() -> None:
    from fedkd.cli import command

    command("sweep", "run a grid of experiments in one Ray session (resumable)", _sweep_args)(cmd_sweep)


_register()
