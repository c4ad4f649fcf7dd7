"""The ``fedkd`` command.

    fedkd run [CONFIG] [--set section.key=value ...] [--out DIR]
    fedkd run --resume RUN_DIR
    fedkd report RUN_DIR
    fedkd sweep [CONFIG] --grid section.key=v1,v2 [--set ...] [--out DIR]   (fedkd/sweep.py)

Bad configuration ends with one line on stderr naming the key, exit code 2, and no run directory.
A run ends with exit code 0 (ok), 1 (failed), 3 (diverged), 130 (interrupted: Ctrl-C) or 143 (SIGTERM).
Other subcommands (privacy, attack, deploy) register themselves through ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from fedkd.config import ConfigError

# name -> (help, add_arguments(parser), run(args) -> exit code)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    def deco(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help, add_arguments, fn)
        return fn

    return deco


def add_experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="experiment TOML (default: the built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a key, e.g. --set run.rounds=5 (repeatable)")
    p.add_argument("--out", help="run directory (default: run.out_dir/<run.name>-<time>)")


def _run_args(p: argparse.ArgumentParser) -> None:
    add_experiment_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed or interrupted run from its last checkpoint (its own config.toml)")


@command("run", "run an experiment in simulation", _run_args)
def cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedkd.config import load_config
    from fedkd.experiment import run_experiment
    from fedkd.preflight import preflight
    from fedkd.recording import Diverged, RoundFailed
    from fedkd.server import EXIT_CODES, Terminated

    pool = getattr(args, "early_pool", None)  # started by main() while the subcommands imported
    if args.resume:
        if args.config or args.overrides or args.out:
            raise ConfigError("--resume", "continues a run with its own config.toml; give no CONFIG, --set or --out")
        run_dir = Path(args.resume)
        if not (run_dir / "config.toml").is_file():
            raise ConfigError("--resume", f"{str(run_dir)!r} is not a run directory (no config.toml)")
        if not (run_dir / "checkpoint.pt").is_file():
            raise ConfigError("--resume", f"{str(run_dir)!r} holds no checkpoint.pt (no round finished, or run.checkpoint = false)")
        cfg = load_config(run_dir / "config.toml")
        preflight(cfg, run_dir)
        out, resume = str(run_dir), True
    else:
        from fedkd.simulation import early_pool

        if pool is None:
            pool = early_pool(args.config, args.overrides)  # Ray starts here while the config (and torch) load
        try:
            if pool is None:
                cfg = load_config(args.config, args.overrides)
            else:
                from fedkd.experiment import _overlapped

                cfg = _overlapped(pool.start, lambda: load_config(args.config, args.overrides))  # start(): no-op if started
                if pool.key != type(pool).for_config(cfg, max_actors=cfg.data.num_clients).key:
                    pool.close()
                    pool = None
            preflight(cfg, args.out)
        except BaseException:
            if pool is not None:
                pool.close()
            raise
        out, resume = args.out, False
    try:
        summary = run_experiment(cfg, out, progress=not args.no_progress, pool=pool, close_pool=True, resume=resume)
    except Terminated:
        print("fedkd: terminated (SIGTERM); summary.json says interrupted, `fedkd run --resume RUN_DIR` continues", file=sys.stderr)
        return EXIT_CODES["terminated"]
    except Diverged as e:
        print(f"fedkd: diverged: {e}", file=sys.stderr)
        return EXIT_CODES["diverged"]
    except RoundFailed as e:
        print(f"fedkd: failed: {e}", file=sys.stderr)
        return EXIT_CODES["failed"]
    print_summary(summary)
    return EXIT_CODES.get(summary.get("status"), 1)


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory written by fedkd run")


@command("report", "print a run's summary, write accuracy/loss plots, list virtual-image grids", _report_args)
def cmd_report(args: argparse.Namespace) -> int:
    from fedkd.results import plot_run, read_run

    summary, df = read_run(args.run_dir)
    print_summary(summary)
    srv = df[(df["node"] == "server") & (df["split"] == "test")].pivot_table(index="round", columns="metric", values="value")
    if len(srv):
        print("\nglobal model on the server's test set:")
        print(srv.to_string(float_format=lambda v: f"{v:.4f}"))
    for path in plot_run(args.run_dir):
        print(f"wrote {path}")
    from fedkd.distill import list_grids

    grids = list_grids(args.run_dir)  # PNG grids of virtual images (FedLGD), written during the run
    if grids:
        print(f"\nvirtual images ({len(grids)} grids, one row per class):")
        for path in grids:
            print(f"  {path}")
    return 0


def print_summary(summary: dict) -> None:
    keys = ["status", "strategy", "dataset", "rounds", "accuracy", "loss", "personal_accuracy_mean", "personal_global_accuracy_mean", "wall_s", "rounds_wall_s", "bytes_up", "bytes_down", "privacy_mechanism", "epsilon", "delta", "privacy_unit", "privacy_relation", "privacy_trust_model", "privacy_guarantee", "privacy_noise_source", "privacy_outside_guarantee", "epsilon_hypothetical_secure_aggregation", "run_dir"]
    print("\nsummary")
    for k in keys:
        if k in summary:
            v = summary[k]
            print(f"  {k:<18} {v:.4g}" if isinstance(v, float) and 0 < abs(v) < 1e-3 else f"  {k:<18} {v:.4f}" if isinstance(v, float) else f"  {k:<18} {v}")
    counts = {k: v for k, v in (summary.get("faults_count") or {}).items() if v}
    if counts:
        print(f"  faults             {counts} (replies rejected/failed/missing; details in summary.json)")
    if summary.get("failures"):
        print(f"  failures           {json.dumps(summary['failures'][:3])}")


def build_parser() -> argparse.ArgumentParser:
    _load_commands()
    parser = argparse.ArgumentParser(prog="fedkd", description="Privacy research in federated learning on Flower.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, add, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add(p)
        p.set_defaults(func=fn)
    return parser


def _load_commands() -> None:
    """Subcommands defined by other packages register on import."""
    import importlib

    for mod in ("fedkd.privacy.cli", "fedkd.attacks.cli", "fedkd.deploy.cli", "fedkd.sweep", "fedkd.privacy.audit_cli", "fedkd.bench.cli"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def main(argv: list[str] | None = None) -> int:
    """The ``fedkd`` command. ``argv=None`` means this process *is* the command (console script, ``python -m
    fedkd``): then ``fedkd run`` ends with :func:`_exit_now` once everything is closed."""
    entry = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        pool = _early_start(argv)  # `fedkd run`: Ray starts here while the subcommands (torch included) import
    except KeyboardInterrupt:
        print("fedkd: interrupted", file=sys.stderr)
        return 130
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args.early_pool, pool = pool, None  # cmd_run owns it from here (and closes it)
        try:
            rc = int(args.func(args) or 0)
        except ConfigError as e:
            print(f"fedkd: error: {e}", file=sys.stderr)
            return 2
        except (FileNotFoundError, FileExistsError) as e:
            print(f"fedkd: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("fedkd: interrupted", file=sys.stderr)
            return 130
    finally:
        if pool is not None:  # the arguments did not parse: nobody else will close it
            pool.close()
    if entry and args.command == "run":
        _exit_now(rc)
    return rc


class _NoParse(Exception):
    pass


class _QuietParser(argparse.ArgumentParser):
    def error(self, message):  # the real parser reports bad arguments; this one only looks
        raise _NoParse(message)


def _early_start(argv: list[str]):
    """For ``fedkd run CONFIG ...`` that will start a local Ray: an :class:`~fedkd.simulation.ActorPool` started
    in this (main) thread, Ray's driver must be, while another thread imports the subcommands' modules
    (torch, the plugins: about 2 s), which ``build_parser`` would otherwise do first, and loads the data
    (scikit-learn, partitioning: 1-3 s), which the preflight check would do after Ray. None for anything else."""
    if argv[:1] != ["run"] or any(a in ("-h", "--help") or a.startswith("--resume") for a in argv[1:]):
        return None
    p = _QuietParser(add_help=False)
    _run_args(p)
    try:
        ns, _ = p.parse_known_args(argv[1:])
    except _NoParse:
        return None
    import threading

    box: dict = {}

    def load() -> None:
        try:
            _load_commands()
        except BaseException as e:  # noqa: BLE001  re-raised below, in this thread
            box["error"] = e
            return
        try:  # the data too (load_federation is cached, so the preflight check and the run reuse it)
            from fedkd.config import load_config
            from fedkd.preflight import check_data

            check_data(load_config(ns.config, ns.overrides))
        except Exception:  # noqa: BLE001  cmd_run's own validation and preflight report any problem
            pass

    t = threading.Thread(target=load, name="fedkd-imports", daemon=True)
    t.start()  # first: it has the most to do
    pool = None
    try:
        from fedkd.simulation import early_pool

        pool = early_pool(ns.config, ns.overrides)
        if pool is None:  # no local Ray to start: build_parser needs the imports anyway
            t.join()
            if "error" in box:
                raise box["error"]
            return None
        pool.start()
    except BaseException:
        t.join()
        if pool is not None:
            pool.close()
        raise
    t.join()
    if "error" in box:
        pool.close()
        raise box["error"]
    return pool


def _exit_now(rc: int) -> None:
    """End the ``fedkd run`` process without the interpreter's teardown (freeing torch's and Ray's modules:
    about 1.5 s measured on this machine) when there is nothing left to clean up: Ray is shut down (its
    processes stopped by ``ray.shutdown``), every file the run wrote was closed where it was written, and here
    the atexit handlers run, logging and stdout/stderr are flushed. If Ray is still up, exit normally."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return
    import atexit
    import logging
    import os

    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)

if __name__ == "__main__":
    sys.exit(main())
