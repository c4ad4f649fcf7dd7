"""Federated distillation vs FedAvg vs local-only training: accuracy, bytes per round, wall time.

    .venv/bin/python benchmarks/distillation.py --quick     # 3 rounds: a smoke check (~2 min)
    .venv/bin/python benchmarks/distillation.py             # digits, 10 clients, Dirichlet 0.3, 20 rounds
    .venv/bin/python benchmarks/distillation.py --mnist     # also MNIST from ../shared/data/mnist (t10k only)

Every strategy in STRATEGY_NAMES that is registered runs (FedDF/FedD2S appear once merged) on the
same federation and seed, all clients with the same architecture (``--model``, default mlp) so FedAvg
is comparable; the distillation strategies also run heterogeneous (mlp + cnn), which FedAvg cannot.
Writes ``benchmarks/results/distillation-<dataset>.csv`` and prints a markdown table.

Columns: ``global_acc`` = the global model on the server test set (FedAvg) or the mean of the
clients' own models on it (personal strategies); ``own_acc`` = the mean over clients of the model
each client ends with, on its own test split (FedAvg: the global model); ``baseline_acc`` (FedMD) =
the clients' mean own-split accuracy after the transfer-learning start, before any collaboration;
``up_kb``/``down_kb`` = payload kilobytes per round, all clients together; ``wall_s`` = the run.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import pandas as pd  # noqa: E402

from fedkd.config import load_config  # noqa: E402
from fedkd.experiment import run_experiment  # noqa: E402
from fedkd.strategies import STRATEGIES  # noqa: E402

STRATEGY_NAMES = ["fedavg", "local", "fedmd", "fd", "feddf", "fedd2s"]
ROOT = Path(__file__).resolve().parents[1]


def settings(dataset: str, quick: bool) -> list[str]:
    base = ["data.num_clients=10", "data.partitioner=dirichlet", "data.alpha=0.3", "run.seed=0", f"run.rounds={3 if quick else 20}"]
    if dataset == "digits":
        # 144 public images (10% held out): align on a random 100 of them per round
        return base + ["data.dataset=digits", "train.local_epochs=2", "fedmd.alignment_size=100"]
    return base + [  # MNIST's t10k: fedkd splits 20% off as the server test set
        "data.dataset=mnist", f"data.data_dir={ROOT.parent / 'shared' / 'data' / 'mnist'}", "train.local_epochs=1",
        "fedmd.alignment_size=500", "fedmd.public_epochs=5", "fedmd.private_epochs=5",
    ]


def run_one(name: str, models: list[str], overrides: list[str], out: Path) -> dict:
    model = "model.name=[" + ", ".join(f'"{m}"' for m in models) + "]"
    cfg = load_config(None, overrides + [f"strategy.name={name}", model, f"run.name={name}"])
    t = time.perf_counter()
    s = run_experiment(cfg, out, progress=False, echo=lambda *_: None)
    wall = time.perf_counter() - t
    df = pd.read_csv(out / "metrics.csv", dtype={"node": str})
    pre = df[(df["node"] != "server") & (df["round"] == 1) & (df["metric"] == "pre_accuracy")]
    rounds = cfg.run.rounds
    return {
        "dataset": cfg.data.dataset, "strategy": name, "models": "+".join(models), "rounds": rounds,
        "global_acc": round(s["accuracy"], 4), "own_acc": round(s["personal_accuracy"], 4) if s.get("personal_accuracy") is not None else None,
        "baseline_acc": round(float(pre["value"].mean()), 4) if len(pre) else None,
        "up_kb": round(s["bytes_up"] / rounds / 1e3, 1), "down_kb": round(s["bytes_down"] / rounds / 1e3, 1),
        "wall_s": round(wall, 1), "rounds_s": round(s["rounds_wall_s"] or 0.0, 1),
    }


def markdown(rows: list[dict]) -> str:
    cols = ["dataset", "strategy", "models", "global_acc", "own_acc", "baseline_acc", "up_kb", "down_kb", "up_vs_fedavg", "wall_s"]
    fedavg_up = {r["dataset"]: r["up_kb"] for r in rows if r["strategy"] == "fedavg"}
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        ref = fedavg_up.get(r["dataset"])
        r = {**r, "up_vs_fedavg": (f"1/{ref / r['up_kb']:.0f}" if r["up_kb"] else "0") if ref else "-"}
        lines.append("| " + " | ".join("-" if r.get(c) is None else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds")
    ap.add_argument("--mnist", action="store_true", help="also MNIST from ../shared/data/mnist when present")
    ap.add_argument("--model", default="mlp", help="architecture of the homogeneous runs")
    ap.add_argument("--only", nargs="*", help="strategies to run (default: every registered one of STRATEGY_NAMES)")
    args = ap.parse_args(argv)
    import ray

    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level="ERROR", configure_logging=True)  # one Ray for all runs
    datasets = ["digits"]
    if args.mnist:
        if (ROOT.parent / "shared" / "data" / "mnist").is_dir():
            datasets.append("mnist")
        else:
            print("no ../shared/data/mnist: MNIST skipped", file=sys.stderr)
    names = [n for n in (args.only or STRATEGY_NAMES) if n in STRATEGIES]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ds in datasets:
            overrides = settings(ds, args.quick)
            plan = [(n, [args.model]) for n in names] + [(n, ["mlp", "cnn"]) for n in names if STRATEGIES.get(n).heterogeneous]
            for name, models in plan:
                row = run_one(name, models, overrides, Path(tmp) / f"{ds}-{name}-{'-'.join(models)}")
                print(row, flush=True)
                rows.append(row)
            out = ROOT / "benchmarks" / "results" / f"distillation-{ds}{'-quick' if args.quick else ''}.csv"
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows([r for r in rows if r["dataset"] == ds])
            print(f"wrote {out}")
    ray.shutdown()
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
