"""Defence grid (issue 14, first part): rows = defences, columns = utility, privacy and cost, several seeds.

Each cell is (dataset, defence, seed):

- utility: one federation (``--rounds`` rounds) on the in-process grid; summary.json's ``accuracy`` and
  ``personal_accuracy`` (the common meanings, README "Metrics"), bytes up/down, wall time, the claimed
  epsilon (``epsilon``, with its unit) where the defence has one;
- privacy: a separate one-round federation in which client 0 is attacked (``attack.setting``, batch
  ``--attack-batch``) and IG runs on the server's observation: PSNR/SSIM beside both baselines (mean
  image, class-conditional mean). Defences that send no weights (FD, FedMD) have no IG row (``n/a``).

Every finished cell is a JSON file under ``OUT/cells/``; a rerun skips it (resumable). The tidy CSV
(``defenses.csv``: dataset, defence, seed, metric, value) and the markdown table (mean and 95% t-interval
over seeds, ``defenses.md``) are rebuilt from those files. ``--quick`` runs weakened attacks (100 IG
steps, 2 restarts) and says so in the table.

Not yet here (rows and columns come as their pillars land): subject-level DP, HyperFL, pFedHN, FedLGD;
membership-inference AUC and TPR at 1% FPR; audited epsilon lower bounds; cells in parallel on Ray;
plots and the HTML report; ``fedkd bench defenses``.

    python benchmarks/defenses.py --quick --seeds 0 1 2                 # small, weakened attacks
    python benchmarks/defenses.py --defences none dp-sgd-eps8 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"

# defence -> (overrides, weights on the wire: the IG attack applies)
DEFENCES: dict[str, tuple[list[str], bool]] = {
    "none": ([], True),
    "dp-sgd-eps1": (["privacy.mechanism=dp-sgd", "privacy.target_epsilon=1.0"], True),
    "dp-sgd-eps8": (["privacy.mechanism=dp-sgd", "privacy.target_epsilon=8.0"], True),
    "gaussian-eps1": (["privacy.mechanism=gaussian", "privacy.target_epsilon=1.0"], True),
    "gaussian-eps8": (["privacy.mechanism=gaussian", "privacy.target_epsilon=8.0"], True),
    "rqm": (["privacy.mechanism=rqm"], True),
    "pbm": (["privacy.mechanism=pbm"], True),
    "fd": (["strategy.name=fd"], False),
    "fedmd": (["strategy.name=fedmd", "fedmd.alignment_size=100", "fedmd.public_epochs=5", "fedmd.private_epochs=5"], False),
    "feddf": (["strategy.name=feddf", "feddf.max_steps=200", "feddf.eval_every=20", "feddf.patience=60"], True),
}
UTILITY = ["accuracy", "personal_accuracy", "epsilon", "bytes_up", "bytes_down", "wall_s"]
PRIVACY = ["psnr", "ssim", "baseline_psnr", "baseline_ssim", "class_baseline_psnr", "class_baseline_ssim", "label_acc"]


def dataset_args(name: str) -> list[str]:
    if name == "mnist":
        return ["data.dataset=mnist", f"data.data_dir={MNIST_DIR}", "data.max_samples=3000"]
    return ["data.dataset=digits"]


def base_args(args, dataset: str, defence: str, seed: int) -> list[str]:
    return dataset_args(dataset) + DEFENCES[defence][0] + [
        f"run.seed={seed}", f"data.num_clients={args.clients}", f"model.name={args.model}", "run.device=cpu",
        f"train.local_epochs={args.local_epochs}",
    ]


def run_cell(args, dataset: str, defence: str, seed: int, work: Path) -> dict:
    """Utility run + attack run of one cell. Returns {metric: value} (None where it does not apply)."""
    from fedkd.attacks.inline import run_inline
    from fedkd.attacks.runner import attack_run_dir
    from fedkd.config import load_config

    name = f"{dataset}-{defence}-s{seed}"
    out: dict = {}
    cfg = load_config(None, base_args(args, dataset, defence, seed) + [f"run.rounds={args.rounds}"])
    s = run_inline(cfg, work / f"{name}-utility")
    for k in UTILITY:
        out[k] = s.get(k)
    out["privacy_unit"] = s.get("privacy_unit")
    if DEFENCES[defence][1]:
        acfg = load_config(None, base_args(args, dataset, defence, seed) + [
            "run.rounds=1", "attack.name=ig", f"attack.setting={args.attack_setting}", f"attack.batch_size={args.attack_batch}",
            "attack.rounds=[1]", "attack.clients=[0]", "train.batch_size=2",
            *(["attack.steps=100", "attack.restarts=2"] if args.quick else []),
        ])
        run_dir = work / f"{name}-attack"
        run_inline(acfg, run_dir)
        res = attack_run_dir(run_dir, acfg, echo=lambda s: None)
        for k in PRIVACY:
            out[k] = res.get(k)
        out["attack_steps"], out["attack_restarts"] = res["params"]["steps"], res["params"]["restarts"]
    return out


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95% Student-t interval (0 for one value)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n))


def tidy(cells: Path):
    import pandas as pd

    rows = []
    for f in sorted(cells.glob("*.json")):
        c = json.loads(f.read_text())
        for k, v in c["metrics"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                rows.append({"dataset": c["dataset"], "defence": c["defence"], "seed": c["seed"], "metric": k, "value": float(v)})
    return pd.DataFrame(rows, columns=["dataset", "defence", "seed", "metric", "value"])


def markdown(df, quick: bool) -> str:
    cols = ["accuracy", "personal_accuracy", "epsilon", "psnr", "class_baseline_psnr", "baseline_psnr", "ssim", "bytes_up", "wall_s"]
    lines = (["**WEAKENED ATTACKS (--quick): PSNR/SSIM are not what IG can do.**", ""] if quick else [])
    lines += ["| dataset | defence | seeds | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 3)]
    for (ds, de), g in df.groupby(["dataset", "defence"], sort=False):
        cells = []
        for m in cols:
            vals = g[g["metric"] == m]["value"].tolist()
            if not vals:
                cells.append("n/a")
                continue
            mean, half = interval(vals)
            fmt = ".0f" if m in ("bytes_up", "wall_s") else ".3f" if "accuracy" in m or m == "ssim" else ".2f"
            cells.append(f"{mean:{fmt}} ± {half:{fmt}}" if len(vals) > 1 else f"{mean:{fmt}}")
        lines.append(f"| {ds} | {de} | {g['seed'].nunique()} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["digits"])
    ap.add_argument("--defences", nargs="+", default=list(DEFENCES), choices=list(DEFENCES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--model", default="lenet")
    ap.add_argument("--attack-setting", default="gradient", choices=["gradient", "update"])
    ap.add_argument("--attack-batch", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="WEAKENED attacks (100 IG steps, 2 restarts)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "defenses"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    cells, work = out / "cells", out / "runs"
    cells.mkdir(parents=True, exist_ok=True)
    datasets = [d for d in args.datasets if d != "mnist" or MNIST_DIR.is_dir()]
    for dataset in datasets:
        for defence in args.defences:
            for seed in args.seeds:
                path = cells / f"{dataset}-{defence}-s{seed}.json"
                if path.exists():
                    print(f"skip {path.name} (done)", flush=True)
                    continue
                t0 = time.perf_counter()
                metrics = run_cell(args, dataset, defence, seed, work)
                cell = {"dataset": dataset, "defence": defence, "seed": seed, "quick": args.quick, "cell_s": time.perf_counter() - t0, "metrics": metrics}
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(cell, indent=1))
                tmp.replace(path)  # a cell is done only once its file is complete
                print(f"{path.name}: " + ", ".join(f"{k} {v:.3g}" for k, v in metrics.items() if isinstance(v, float)), flush=True)
    df = tidy(cells)
    df.to_csv(out / "defenses.csv", index=False)
    md = markdown(df, any(json.loads(f.read_text())["quick"] for f in cells.glob("*.json")))
    (out / "defenses.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
