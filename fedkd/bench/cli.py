"""``fedkd bench defenses ...``: the defence benchmark (fedkd/bench/defenses.py)."""

from __future__ import annotations

import argparse

from fedkd.cli import command


def _args(p: argparse.ArgumentParser) -> None:
    from .defenses import __doc__ as doc, add_arguments

    sub = p.add_subparsers(dest="bench", required=True)
    d = sub.add_parser("defenses", help="defences x attacks x datasets x seeds: utility, privacy, cost", description=doc.split("\n\n")[0])
    add_arguments(d)


@command("bench", "benchmarks shipped with fedkd (defenses)", _args)
def cmd_bench(args: argparse.Namespace) -> int:
    from .defenses import main

    return main(args)
