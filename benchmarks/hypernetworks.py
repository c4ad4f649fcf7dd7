"""FedAvg, HyperFL, pFedHN and pFedHN-PC on label-skewed digits and MNIST: accuracy, bytes, time; and IG against them.

    .venv/bin/python benchmarks/hypernetworks.py --quick     # 2 rounds, digits only, 1 IG image: a smoke check
    .venv/bin/python benchmarks/hypernetworks.py             # the README's table (reduced, see below)

Federated part: 20 clients, Dirichlet(0.3) label skew, seed 0, every client trains and evaluates every round. Each
strategy runs its paper's target network and local procedure: FedAvg and HyperFL ``hyperfl-cnn`` (FedAvg trains the
whole CNN: ``train.local_epochs`` epochs, batch 50, SGD lr 0.05, momentum 0.9; HyperFL the authors' two stages, 1 head
epoch + ``hyperfl.hnet_epochs``), pFedHN and pFedHN-PC ``pfedhn-cnn`` (``pfedhn.inner_steps`` steps of batch 64 per
client and round, one server VJP step per reply). Runs go through the real ServerApp logic, strategies, ClientApp and
client logics on an in-process Grid (``fedkd.attacks.inline``, no Ray: one process, one thread).

Columns: ``accuracy`` = summary.json's ``accuracy``, the deployed models on the server test set (FedAvg: the global
model; the hypernetwork strategies: the mean over clients of each client's personalised model on it);
``personal_accuracy`` = the mean over clients, at the last round, of the model each client ends with on its own test
split (FedAvg: the global model); ``up_kb``/``down_kb`` = array payload per round, all clients together (downlink
includes the evaluation messages); ``rounds_s`` = the rounds' wall time.

Inversion part (``benchmarks/hyperfl_inversion.py``'s ``run``): on the same images, FedAvg's client and HyperFL's
client each take one local step on ONE image (the ``gradient`` threat setting); FedAvg is attacked by ``ig``, HyperFL
by ``hyperfl-ig``, ``hyperfl-dia`` and ``hyperfl-rank1``. PSNR/SSIM against the true image.

Reduced settings (a shared 2-core CPU), all printed with the results: ``--rounds`` (default 15; the papers: 200
rounds, pFedHN 5,000 one-client steps), ``--hnet-epochs`` (HyperFL's stage 2, default 2; paper 5), ``--local-epochs``
(FedAvg, default 2), ``--inner-steps`` (pFedHN, default 20; paper 50), MNIST = ``--mnist-samples`` (default 4000) of the
10,000 t10k images, IG ``--ig-steps``/``--ig-restarts`` on ``--ig-images``. Writes ``benchmarks/results/hypernetworks.csv``
and ``hypernetworks_inversion.csv`` (``--out-dir``) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from fedkd.attacks.inline import run_inline  # noqa: E402
from fedkd.config import DataConfig, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"
PLAN = [("fedavg", "hyperfl-cnn"), ("hyperfl", "hyperfl-cnn"), ("pfedhn", "pfedhn-cnn"), ("pfedhn-pc", "pfedhn-cnn")]


def data_overrides(dataset: str, mnist_samples: int) -> list[str]:
    if dataset == "digits":
        return ["data.dataset=digits"]
    return ["data.dataset=mnist", f"data.data_dir={MNIST}", f"data.max_samples={mnist_samples}"]


def overrides(a, dataset: str, strategy: str, model: str) -> list[str]:
    return [
        "data.num_clients=20", "data.partitioner=dirichlet", "data.alpha=0.3", "run.seed=0", f"run.rounds={a.rounds}",
        *data_overrides(dataset, a.mnist_samples), f"strategy.name={strategy}", f"model.name={model}", f"run.name={strategy}",
        f"train.local_epochs={a.local_epochs}", "train.batch_size=50", "train.lr=0.05", "train.momentum=0.9",
        f"hyperfl.hnet_epochs={a.hnet_epochs}", f"pfedhn.inner_steps={a.inner_steps}",
    ]


def run_one(a, dataset: str, strategy: str, model: str, out: Path, echo=print) -> dict:
    cfg = load_config(None, overrides(a, dataset, strategy, model))
    t = time.perf_counter()
    s = run_inline(cfg, out)
    wall = time.perf_counter() - t
    df = pd.read_csv(out / "metrics.csv", dtype={"node": str})
    last = df["round"].max()
    own = df[(df["node"] != "server") & (df["round"] == last) & (df["split"] == "test") & (df["metric"] == "accuracy")]
    rounds = cfg.run.rounds
    row = {
        "dataset": dataset, "strategy": strategy, "model": model, "rounds": rounds, "clients": cfg.data.num_clients,
        "accuracy": round(s["accuracy"], 4), "personal_accuracy": round(float(own["value"].mean()), 4),
        "up_kb": round(s["bytes_up"] / rounds / 1e3, 1), "down_kb": round(s["bytes_down"] / rounds / 1e3, 1),
        "rounds_s": round(s["rounds_wall_s"] or 0.0, 1), "wall_s": round(wall, 1),
        "settings": f"local_epochs={a.local_epochs} hnet_epochs={a.hnet_epochs} inner_steps={a.inner_steps}"
                    + (f" mnist_samples={a.mnist_samples}" if dataset == "mnist" else ""),
    }
    echo(row)
    return row


def inversion(a, datasets: list[str], echo=print) -> pd.DataFrame:
    spec = importlib.util.spec_from_file_location("hyperfl_inversion_bench", ROOT / "benchmarks" / "hyperfl_inversion.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    frames = []
    for ds in datasets:
        data = DataConfig(partitioner="iid", num_clients=2) if ds == "digits" else DataConfig(
            dataset="mnist", data_dir=str(MNIST), max_samples=a.mnist_samples, partitioner="iid", num_clients=2)
        images = [int(v) for v in a.ig_images.split(",")]
        df = mod.run(images, [a.ig_warm], a.ig_steps, a.ig_restarts, seed=6, echo=echo, data=data)
        frames.append(df.assign(dataset=ds))
    return pd.concat(frames, ignore_index=True)


def markdown(df: pd.DataFrame, cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df[cols].itertuples(index=False)]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds, digits only, 1 IG image with 30 steps")
    ap.add_argument("--datasets", default="digits,mnist")
    ap.add_argument("--only", default="", help="comma-separated strategies (default: all four)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--hnet-epochs", type=int, default=2)
    ap.add_argument("--inner-steps", type=int, default=20)
    ap.add_argument("--mnist-samples", type=int, default=4000)
    ap.add_argument("--ig-images", default="0,1")
    ap.add_argument("--ig-warm", type=int, default=3, help="HyperFL/FedAvg local rounds on other images before the attacked step")
    ap.add_argument("--ig-steps", type=int, default=200)
    ap.add_argument("--ig-restarts", type=int, default=1)
    ap.add_argument("--ig-datasets", default="digits")
    ap.add_argument("--no-ig", action="store_true")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default="", help="suffix of the CSV names (e.g. one per dataset when run in parallel)")
    a = ap.parse_args(argv)
    if a.quick:
        a.rounds, a.datasets, a.ig_images, a.ig_steps, a.ig_datasets = 2, "digits", "0", 30, "digits"
    datasets = [d for d in a.datasets.split(",") if d]
    if "mnist" in datasets and not MNIST.is_dir():
        print(f"no {MNIST}: MNIST skipped", file=sys.stderr)
        datasets.remove("mnist")
    only = set(a.only.split(",")) if a.only else None
    torch.set_num_threads(1)
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if a.quick else (f"-{a.tag}" if a.tag else "")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ds in datasets:
            for strategy, model in PLAN:
                if only is None or strategy in only:
                    rows.append(run_one(a, ds, strategy, model, Path(tmp) / f"{ds}-{strategy}"))
                    torch.set_num_threads(1)
    if rows:
        fl = pd.DataFrame(rows)
        fl.to_csv(out_dir / f"hypernetworks{suffix}.csv", index=False)
        print(markdown(fl, ["dataset", "strategy", "model", "rounds", "accuracy", "personal_accuracy", "up_kb", "down_kb", "rounds_s"]))
    if not a.no_ig:
        ig = inversion(a, [d for d in a.ig_datasets.split(",") if d and (d != "mnist" or MNIST.is_dir())])
        ig.to_csv(out_dir / f"hypernetworks_inversion{suffix}.csv", index=False)
        table = ig.groupby(["dataset", "framework", "attack"], sort=False)[["psnr", "ssim", "baseline_psnr"]].mean().round(2).reset_index()
        print(markdown(table, ["dataset", "framework", "attack", "psnr", "ssim", "baseline_psnr"]))
    print(f"wrote {out_dir}/hypernetworks{suffix}.csv" + ("" if a.no_ig else f", hypernetworks_inversion{suffix}.csv"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
