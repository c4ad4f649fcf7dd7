"""Throughput of one federated workload run three ways, in one process.

    python benchmarks/throughput.py                    # default experiment, 10 clients x 10 rounds
    python benchmarks/throughput.py --clients 100 --rounds 5
    python benchmarks/throughput.py --quick            # 4 clients x 3 rounds, 1 epoch (smoke test)

The workload is the default experiment (digits, MLP 64-64-10, 5 local epochs, batch 32, SGD 0.05
momentum 0.9, FedAvg, no per-round client evaluation). With more than 10 clients the partitioner is
IID (Dirichlet(0.5) cannot give 100+ clients samples of every kind from 1,437 digits).

1. floor: the same local training (fedkd.training.train) in a plain single-threaded PyTorch loop,
   with FedAvg's weighted average between rounds: the compute floor.
2. vanilla: a plain Flower app on ``run_simulation`` written the way Flower's quickstart writes it
   (benchmarks/vanilla_flower.py).
3. fedkd: fedkd's fast path (``simulation.backend = "fast"``).

Round time = from the end of the round-0 (central) evaluation to the end of the last round, the
same definition for all three. Process start-up (Ray, imports) is reported separately as total_s.
Prints a table and writes a CSV (``--csv``).

    python benchmarks/throughput.py --whole --repeat 3 [--set key=value ...]

``--whole`` times whole commands instead, each in a fresh process (imports, Ray, data, rounds,
shut-down), alternating so that a change in the machine's load hits both: ``fedkd run`` on the
default experiment (client evaluation every round, central evaluation) against the same experiment
as a plain Flower app (``python benchmarks/vanilla_flower.py``: same training, evaluation and
FedAvg). Reports each run, the medians and fedkd/vanilla (time).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

from fedkd.config import load_config  # noqa: E402
from fedkd.data import load_federation  # noqa: E402
from fedkd.models import model_from_config  # noqa: E402
from fedkd.training import train  # noqa: E402


def workload(clients: int, rounds: int, epochs: int):
    overrides = [
        f"data.num_clients={clients}", f"run.rounds={rounds}", f"train.local_epochs={epochs}",
        "strategy.fraction_evaluate=0.0", "run.name=throughput",
    ]
    if clients > 10:
        overrides += ["data.partitioner=iid", "data.min_partition_size=0"]
    return load_config(None, overrides)


def run_floor(cfg) -> float:
    """Plain PyTorch: every client trains in turn on one thread; weighted average of the weights."""
    torch.set_num_threads(1)
    fed = load_federation(cfg.data, cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    global_state = model_from_config(cfg.model, 0, fed.input_shape, fed.num_classes).state_dict()
    model = model_from_config(cfg.model, 0, fed.input_shape, fed.num_classes)
    t = cfg.train
    start = time.perf_counter()
    for rnd in range(cfg.run.rounds):
        acc = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
        total = 0
        for c in fed.clients:
            model.load_state_dict(global_state)
            res = train(model, c.train, epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr, momentum=t.momentum, seed=rnd * 100_003 + c.partition_id)
            for k, v in model.state_dict().items():
                acc[k] += v.double() * res.num_examples
            total += res.num_examples
        global_state = {k: (v / total).float() for k, v in acc.items()}
    return time.perf_counter() - start


def run_vanilla(cfg) -> float:
    import vanilla_flower

    return vanilla_flower.run(cfg)


def run_fedkd(cfg) -> float:
    from fedkd.experiment import run_experiment

    summary = run_experiment(cfg, write=False, progress=False, echo=lambda s: None)
    return float(summary["rounds_wall_s"])


def run_whole(repeat: int, sets: list[str], csv: str) -> int:
    here = Path(__file__).resolve().parent
    commands = {
        "fedkd": lambda tmp, i: [sys.executable, "-m", "fedkd", "run", "--no-progress", "--out", str(Path(tmp) / f"run-{i}"), *[a for kv in sets for a in ("--set", kv)]],
        "vanilla": lambda tmp, i: [sys.executable, str(here / "vanilla_flower.py"), *sets],
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeat):
            for name, cmd in commands.items():
                t = time.perf_counter()
                proc = subprocess.run(cmd(tmp, i), capture_output=True, text=True)
                wall = time.perf_counter() - t
                if proc.returncode != 0:
                    print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                    raise SystemExit(f"{name} failed (exit {proc.returncode})")
                load = os.getloadavg()[0]
                rows.append({"command": name, "repeat": i, "whole_s": wall, "load_1min": load})
                print(f"{name:>8} #{i}: {wall:7.2f} s (load {load:.1f})", flush=True)
    df = pd.DataFrame(rows)
    med = df.groupby("command")["whole_s"].median()
    ratio = med["fedkd"] / med["vanilla"]
    print(f"\nmedian whole command: fedkd {med['fedkd']:.2f} s, vanilla Flower {med['vanilla']:.2f} s, fedkd/vanilla (time) {ratio:.2f}")
    pairs = df.pivot(index="repeat", columns="command", values="whole_s")
    print("per repeat fedkd/vanilla: " + ", ".join(f"{r:.2f}" for r in pairs["fedkd"] / pairs["vanilla"]))
    df["fedkd/vanilla (median time)"] = ratio
    Path(csv).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(csv, index=False)
    print(f"wrote {csv}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="4 clients x 3 rounds x 1 epoch")
    ap.add_argument("--skip", action="append", default=[], choices=["floor", "vanilla", "fedkd"])
    ap.add_argument("--csv", default=None, help="default: runs/benchmarks/throughput.csv (whole: throughput_whole.csv)")
    ap.add_argument("--whole", action="store_true", help="time whole commands: fedkd run vs a plain Flower app")
    ap.add_argument("--repeat", type=int, default=3, help="--whole: runs of each command (alternating)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="--whole: override for both commands")
    args = ap.parse_args(argv)
    if args.whole:
        return run_whole(args.repeat, args.sets, args.csv or "runs/benchmarks/throughput_whole.csv")
    args.csv = args.csv or "runs/benchmarks/throughput.csv"
    if args.quick:
        args.clients, args.rounds, args.epochs = 4, 3, 1
    cfg = workload(args.clients, args.rounds, args.epochs)
    load_federation(cfg.data, cfg.run.seed)  # data loading is not part of any round time

    rows = []
    for name, fn in (("floor", run_floor), ("vanilla", run_vanilla), ("fedkd", run_fedkd)):
        if name in args.skip:
            continue
        t0 = time.perf_counter()
        rounds_s = fn(cfg)
        total_s = time.perf_counter() - t0
        updates = args.clients * args.rounds
        rows.append({"path": name, "clients": args.clients, "rounds": args.rounds, "rounds_wall_s": rounds_s, "total_s": total_s, "updates_per_s": updates / rounds_s})
        print(f"{name:>8}: rounds {rounds_s:8.2f} s, total {total_s:8.2f} s, {updates / rounds_s:9.1f} client updates/s", flush=True)

    df = pd.DataFrame(rows).set_index("path")
    ratios = {}
    if {"fedkd", "floor"} <= set(df.index):
        ratios["fedkd/floor (time)"] = df.loc["fedkd", "rounds_wall_s"] / df.loc["floor", "rounds_wall_s"]
    if {"fedkd", "vanilla"} <= set(df.index):
        ratios["vanilla/fedkd (time)"] = df.loc["vanilla", "rounds_wall_s"] / df.loc["fedkd", "rounds_wall_s"]
    for k, v in ratios.items():
        df[k] = v
    print()
    print(df.to_markdown(floatfmt=".2f") if _has_tabulate() else df.to_string(float_format=lambda v: f"{v:.2f}"))
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.csv)
    print(f"wrote {args.csv}")
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401

        return True
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
