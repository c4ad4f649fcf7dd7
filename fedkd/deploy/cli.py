"""``fedkd deploy``: run on Flower's deployment runtime.

    fedkd deploy local --nodes N [--tls] [--auth] [CONFIG] [--set k=v ...] [--out DIR]
    fedkd deploy certs DIR [--nodes N] [--name HOST ...]
    fedkd deploy compose [--dir DIR] [--nodes N] [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedkd.cli import add_experiment_args, command, print_summary


def _local_args(p: argparse.ArgumentParser) -> None:
    add_experiment_args(p)
    p.add_argument("--nodes", type=int, default=None, help="number of SuperNodes, one partition each (default: data.num_clients); sets data.num_clients")
    p.add_argument("--tls", action="store_true", help="TLS between SuperNodes/flwr and the SuperLink (certificates made for this run)")
    p.add_argument("--auth", action="store_true", help="SuperNode authentication (implies --tls): each node's key is registered first")
    p.add_argument("--certs", metavar="DIR", default=None, help="use the certificates/keys in DIR (from `fedkd deploy certs`) instead of making new ones; implies --tls")
    p.add_argument("--timeout", type=float, default=None, help="give up on the run after this many seconds")


def _certs_args(p: argparse.ArgumentParser) -> None:
    from fedkd.deploy import certs

    certs.add_arguments(p)


def _compose_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=".", help="where to write docker-compose.yml and its override files (default: .)")
    p.add_argument("--nodes", type=int, default=None, help="number of SuperNode services (default: 2)")
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if the files differ from what would be written")


def _deploy_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="deploy_command", required=True)
    for name, help_, add in (
        ("local", "SuperLink + N SuperNodes as local processes on 127.0.0.1; submit the experiment with flwr run", _local_args),
        ("certs", "make a CA + server certificate (TLS) and SuperNode key pairs (authentication)", _certs_args),
        ("compose", "write docker-compose.yml (+ TLS / auth override files) from fedkd/deploy/topology.py", _compose_args),
    ):
        add(sub.add_parser(name, help=help_, description=help_))


@command("deploy", "run on Flower's deployment runtime (local processes or docker-compose)", _deploy_args)
def cmd_deploy(args: argparse.Namespace) -> int:
    return {"local": _cmd_local, "certs": _cmd_certs, "compose": _cmd_compose}[args.deploy_command](args)


def _cmd_local(args: argparse.Namespace) -> int:
    from fedkd.config import ConfigError, load_config
    from fedkd.deploy.local import DeployError, deploy_local

    overrides = list(args.overrides)
    if args.nodes is not None:
        if args.nodes < 1:
            raise ConfigError("--nodes", f"must be >= 1 (got {args.nodes})")
        if any(o.split("=", 1)[0].strip() == "data.num_clients" for o in overrides):
            raise ConfigError("--nodes", "sets data.num_clients; do not also --set data.num_clients")
        overrides.append(f"data.num_clients={args.nodes}")
    cfg = load_config(args.config, overrides)
    nodes = args.nodes if args.nodes is not None else cfg.data.num_clients
    try:
        summary = deploy_local(cfg, nodes, tls=args.tls, auth=args.auth, out=args.out, certs_dir=args.certs, timeout=args.timeout)
    except DeployError as e:
        print(f"fedkd: error: {e}", file=sys.stderr)
        return 1
    print_summary(summary)
    print(f"  {'deploy_wall_s':<18} {summary['deploy_wall_s']:.4f}   (processes up, flwr run, rounds, processes down)")
    return 0


def _cmd_certs(args: argparse.Namespace) -> int:
    from fedkd.deploy import certs

    return certs.run(args)


def _cmd_compose(args: argparse.Namespace) -> int:
    from fedkd.deploy.compose import write_compose_files

    nodes = args.nodes if args.nodes is not None else None
    changed = write_compose_files(Path(args.dir), nodes=nodes, check=args.check)
    for path in changed:
        print(("differs: " if args.check else "wrote ") + str(path))
    return 1 if (args.check and changed) else 0
