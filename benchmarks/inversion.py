"""Gradient inversion benchmark: attack x defence on real (in-process) fedkd federations.

For every (dataset, model, batch size, threat setting, defence) it runs a one-round federation of
4 clients on :class:`fedkd.attacks.inline.InlineGrid` (the real strategy, ClientApp and client
logic; no Ray), records the replies of the attacked clients, and runs each attack on those
observations only. Writes ``inversion.csv`` (one row per cell, attack and batch order: PSNR, SSIM,
label accuracy, both baselines (mean image, class-conditional mean image of the guessed labels),
seconds, strength), one PNG grid per cell and attack, ``ig_restarts.csv`` (IG with batched restarts
versus the same restarts one after another) and prints a Markdown table.

By default every attack runs at FULL strength: its paper's step counts and restarts and, for IG, the
TV weight tuned for the dataset (``attacks/ig.py``: ``TUNED_TV``). ``--quick`` is a WEAKENED smoke
run (L-BFGS 10 iterations, IG/DIA 100 steps, 2 restarts): its rows say ``strength = weakened`` and
must not be read as what the attacks can do. In the ``update`` setting each attack runs twice: with
the client's mini-batch order unknown (what a server sees: the client reshuffles every epoch) and
known (an oracle upper bound), column ``order``.

    python benchmarks/inversion.py --datasets digits --models lenet --defences none --attacks ig
    python benchmarks/inversion.py --quick            # weakened: digits + MNIST (if ../shared/data/mnist exists)
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from fedkd.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"

DEFENCES = {
    "none": [],
    "dp-sgd": ["privacy.mechanism=dp-sgd", "privacy.noise_multiplier=1.0", "privacy.max_grad_norm=1.0"],
    "dropout": ["model.dropout=0.3"],
}
ATTACKS_FOR = {"none": ["dlg", "idlg", "ig"], "dp-sgd": ["idlg", "ig"], "dropout": ["ig", "dia"]}


def dataset_args(name: str) -> list[str]:
    if name == "mnist":
        return ["data.dataset=mnist", f"data.data_dir={MNIST_DIR}", "data.max_samples=2000"]
    return ["data.dataset=digits"]


def cell_config(dataset, model, batch, setting, defence, out_root, clients=(0,)):
    over = dataset_args(dataset) + DEFENCES[defence] + [
        "run.rounds=1", "data.num_clients=4", "data.partitioner=iid", f"model.name={model}",
        "train.lr=0.05", "train.momentum=0.9", "train.batch_size=2", "train.local_epochs=2",
        f"attack.setting={setting}", f"attack.batch_size={batch}", "attack.rounds=[1]", f"attack.clients={list(clients)}",
        "run.device=cpu", f"run.out_dir={out_root}", f"run.name={dataset}-{model}-b{batch}-{setting}-{defence}",
    ]
    return load_config(None, over)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="WEAKENED attacks for a smoke run (L-BFGS 10 iterations, IG/DIA 100 steps, 2 restarts)")
    ap.add_argument("--steps", type=int, default=0, help="IG/DIA steps (0 = the paper's 4800); fewer = WEAKENED, and the rows say so")
    ap.add_argument("--attacks", nargs="+", default=None, help="only these attacks (default: every attack that fits the defence)")
    ap.add_argument("--orders", nargs="+", default=["unknown", "known"], help="update setting: the client's batch order unknown to the attack, and/or known (oracle)")
    ap.add_argument("--datasets", nargs="+", default=["digits", "mnist"])
    ap.add_argument("--models", nargs="+", default=["cnn", "lenet"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--settings", nargs="+", default=["gradient", "update"])
    ap.add_argument("--defences", nargs="+", default=list(DEFENCES))
    ap.add_argument("--clients", nargs="+", type=int, default=[0, 1], help="attacked partitions (one observation each)")
    ap.add_argument("--tv", type=float, default=None, help="attack.tv for ig and dia (default: the attack's, tuned per dataset for ig)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "inversion"))
    ap.add_argument("--skip-timing", action="store_true", help="no IG restart timing")
    ap.add_argument("--skip-table", action="store_true", help="only the IG restart timing")
    args = ap.parse_args(argv)

    from fedkd.attacks import ATTACKS
    from fedkd.attacks.inline import run_inline
    from fedkd.attacks.runner import attack_run_dir

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    datasets = [d for d in args.datasets if d != "mnist" or MNIST_DIR.is_dir()]
    if "mnist" in args.datasets and "mnist" not in datasets:
        print(f"skipping mnist: {MNIST_DIR} not found", file=sys.stderr)
    steps = {"dlg": 10, "idlg": 10, "ig": 100, "dia": 100} if args.quick else {"ig": args.steps, "dia": args.steps}
    restarts = 2 if args.quick else 0
    runs = out / "runs"
    rows = []
    csv_path = out / "inversion.csv"
    strength = "weakened" if args.quick or 0 < args.steps < 4800 else "full"
    fields = ["dataset", "model", "batch", "setting", "order", "defence", "attack", "psnr", "ssim", "label_acc", "baseline_psnr", "class_baseline_psnr",
              "baseline_ssim", "class_baseline_ssim", "attack_s", "strength", "steps", "restarts", "tv", "observations", "png"]
    if not args.skip_table:
        with csv_path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            for dataset, model, batch, setting, defence in itertools.product(datasets, args.models, args.batches, args.settings, args.defences):
                cfg = cell_config(dataset, model, batch, setting, defence, runs, args.clients)
                run_dir = runs / cfg.run.name
                if not (run_dir / "observations").is_dir():
                    if run_dir.exists():
                        import shutil

                        shutil.rmtree(run_dir)
                    run_inline(cfg, run_dir)
                orders = args.orders if setting == "update" else ["unknown"]
                for attack, order in itertools.product([a for a in ATTACKS_FOR[defence] if not args.attacks or a in args.attacks], orders):
                    acfg = cfg.replace(**{"attack.name": attack, "attack.steps": steps.get(attack, 0), "attack.restarts": restarts, "attack.tv": args.tv, "attack.order": order})
                    cell_out = out / "grids" / f"{cfg.run.name}-{attack}-{order}"
                    res = attack_run_dir(run_dir, acfg, cell_out, echo=lambda s: None)
                    row = {
                        "dataset": dataset, "model": model, "batch": batch, "setting": setting, "order": order if setting == "update" else "-",
                        "defence": res["defence"], "attack": attack,
                        "psnr": round(res["psnr"], 2), "ssim": round(res["ssim"], 3), "label_acc": round(res["label_acc"], 2),
                        "baseline_psnr": round(res["baseline_psnr"], 2), "class_baseline_psnr": round(res["class_baseline_psnr"], 2),
                        "baseline_ssim": round(res["baseline_ssim"], 3), "class_baseline_ssim": round(res["class_baseline_ssim"], 3),
                        "attack_s": round(res["wall_s"], 1), "strength": strength,
                        "steps": res["params"]["steps"], "restarts": res["params"]["restarts"], "tv": res["params"].get("tv", ""), "observations": len(res["observations"]),
                        "png": str(Path(res["png"]).relative_to(out)),
                    }
                    rows.append(row)
                    w.writerow(row)
                    fh.flush()
                    print(" | ".join(str(row[k]) for k in fields[:15]), flush=True)
        print(f"\nwrote {csv_path}")
        print(markdown(rows))
    if args.skip_timing:
        return 0
    timing = time_restarts(out, runs, datasets)
    print(json.dumps(timing, indent=1))
    return 0


def time_restarts(out: Path, runs: Path, datasets) -> list[dict]:
    """IG with R restarts as one vmapped optimisation versus the same R restarts one after another."""
    from fedkd.attacks.ig import IGParams, ig
    from fedkd.attacks.inline import run_inline
    from fedkd.attacks.observation import load_observations

    results = []
    for dataset, model in [(d, m) for d in datasets for m in ("lenet", "cnn")]:
        cfg = cell_config(dataset, model, 1, "gradient", "none", runs, (0,))
        run_dir = runs / cfg.run.name
        if not (run_dir / "observations").is_dir():
            run_inline(cfg, run_dir)
        obs = load_observations(run_dir)[0]
        for restarts in (4, 8):
            t = {}
            for batched in (True, False):
                t0 = time.perf_counter()
                rec = ig(obs, IGParams(steps=100, restarts=restarts, batched=batched), seed=0)
                t[batched] = time.perf_counter() - t0
            results.append({"dataset": dataset, "model": model, "restarts": restarts, "steps": 100, "batched_s": round(t[True], 2),
                            "sequential_s": round(t[False], 2), "speedup": round(t[False] / t[True], 2), "threads": torch.get_num_threads()})
            print(results[-1], flush=True)
    with (out / "ig_restarts.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(results[0]))
        w.writeheader()
        w.writerows(results)
    return results


def markdown(rows: list[dict]) -> str:
    weak = any(r["strength"] != "full" for r in rows)
    head = "| dataset | model | batch | setting | order | defence | attack | PSNR dB | SSIM | label acc | mean-image PSNR / SSIM | class-mean PSNR / SSIM | steps x restarts, TV | s |"
    lines = (["**WEAKENED ATTACKS (--quick): not what these attacks can do.**", ""] if weak else []) + [head, "|" + "---|" * 14]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['model']} | {r['batch']} | {r['setting']} | {r['order']} | {r['defence']} | {r['attack']} | {r['psnr']:.1f} | {r['ssim']:.2f} | "
                     f"{r['label_acc']:.2f} | {r['baseline_psnr']:.1f} / {r['baseline_ssim']:.2f} | {r['class_baseline_psnr']:.1f} / {r['class_baseline_ssim']:.2f} | "
                     f"{r['steps']} x {r['restarts']}, {r['tv']} | {r['attack_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
