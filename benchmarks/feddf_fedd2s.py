"""FedDF and FedD2S vs FedAvg and local-only training on digits (10 clients, Dirichlet 0.3, 20 rounds).

    .venv/bin/python benchmarks/feddf_fedd2s.py                # the README table (a few minutes per run on 2 cores)
    .venv/bin/python benchmarks/feddf_fedd2s.py --quick        # 4 clients, 2 rounds: checks the script runs

Writes ``<out>/results.csv`` and ``<out>/results.md``. "local-only" is FedD2S with beta = 0: the same
personal models and local training, with the server's knowledge given zero weight.
Accuracy columns: ``accuracy`` is the server-side metric of each strategy (FedAvg: the global model on
the server test set; FedDF: mean over architecture groups on the server test set minus its proxy half;
FedD2S: mean personal accuracy on the clients' own test splits); ``global_acc`` is FedD2S's personal
models on the server test set (mean over clients).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

from fedkd.config import load_config  # noqa: E402
from fedkd.experiment import run_experiment  # noqa: E402

BASE = ["data.dataset=digits", "data.num_clients=10", "data.partitioner=dirichlet", "data.alpha=0.3", "run.rounds=20", "run.seed=0"]
# FedDF's paper budget (10^4 steps, patience 10^3) is too slow on a shared 2-core CPU; a smaller one:
FEDDF = ["feddf.max_steps=500", "feddf.eval_every=50", "feddf.patience=200"]
HET = 'model.name=["mlp", "cnn"]'
RUNS = [
    ("fedavg", "mlp", ["strategy.name=fedavg"]),
    ("fedavg", "cnn", ["strategy.name=fedavg", "model.name=cnn"]),
    ("feddf", "mlp", ["strategy.name=feddf", *FEDDF]),
    ("feddf", "mlp+cnn", ["strategy.name=feddf", HET, *FEDDF]),
    ("fedd2s", "mlp+cnn", ["strategy.name=fedd2s", HET]),
    ("local-only", "mlp+cnn", ["strategy.name=fedd2s", HET, "fedd2s.beta=0"]),
]
QUICK = ["data.num_clients=4", "run.rounds=2", "train.local_epochs=1", "data.min_partition_size=5", "feddf.max_steps=20"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="runs/bench-feddf-fedd2s")
    ap.add_argument("--only", default="", help="comma-separated row numbers (0-based) to run")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    pick = {int(i) for i in args.only.split(",") if i}
    for i, (name, models, sets) in enumerate(RUNS):
        if pick and i not in pick:
            continue
        cfg = load_config(None, BASE + sets + (QUICK if args.quick else []) + [f"run.name={name}-{models.replace('+', '-')}"])
        s = run_experiment(cfg, out / f"{i}-{cfg.run.name}", progress=False, echo=lambda *_: None)
        r = cfg.run.rounds
        rows.append({
            "strategy": name, "models": models, "accuracy": round(s["accuracy"], 4),
            "personal_accuracy": round(s["personal_accuracy"], 4) if s.get("personal_accuracy") is not None else "",
            "up_kB_per_round": round(s["bytes_up"] / r / 1e3, 1), "down_kB_per_round": round(s["bytes_down"] / r / 1e3, 1),
            "rounds_wall_s": round(s["rounds_wall_s"], 1), "wall_s": round(s["wall_s"], 1),
        })
        print(rows[-1], flush=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
    md += ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows]
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
