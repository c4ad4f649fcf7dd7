"""``fedkd audit RUN_DIR|CONFIG``: empirical epsilon lower bounds from canaries (see audit_run.py).

Exit codes: 0 the bound does not exceed the claim (or there is no claim), 1 it does (the message says
so), 2 a bad configuration (one line naming the key).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fedkd.cli import command


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", help="a run directory (its config.toml) or an experiment TOML (default: the built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a key, e.g. --set audit.canaries=500")
    p.add_argument("--runs", type=int, default=1, help="independent training runs, fresh canaries each (default 1: the one-run audit)")
    p.add_argument("--attack", default="gradient-regression", help="canary attack: gradient-regression (default), gradient-alignment or loss-difference")
    p.add_argument("--out", help="where canaries-*.npz and audit.json go (default: run.out_dir/audit-<name>-<time>)")
    p.add_argument("--parallel", action="store_true", help="train the runs as parallel Ray tasks")


@command("audit", "insert canaries, attack, and check the claimed epsilon against an empirical lower bound", _args)
def cmd_audit(args: argparse.Namespace) -> int:
    from fedkd.attacks.canary_attacks import ATTACKS
    from fedkd.config import ConfigError, load_config

    from .audit_run import run_audit

    target = Path(args.target) if args.target else None
    if target is not None and target.is_dir():
        if not (target / "config.toml").is_file():
            raise FileNotFoundError(f"{target} is not a run directory (no config.toml)")
        target = target / "config.toml"
    if args.attack not in ATTACKS:
        raise ConfigError("--attack", f"unknown value {args.attack!r}; valid: {', '.join(ATTACKS)}")
    cfg = load_config(target, args.overrides)
    if cfg.audit.canary_file:
        raise ConfigError("audit.canary_file", "is set by fedkd audit itself; leave it empty")
    out = args.out or Path(cfg.run.out_dir) / f"audit-{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    report = run_audit(cfg, runs=args.runs, attack=args.attack, out_dir=out, parallel=args.parallel)
    print(f"audit report in {Path(out) / 'audit.json'}")
    return 0 if report["ok"] else 1
