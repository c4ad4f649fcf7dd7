"""Tune IG's total-variation weight for a dataset at full strength (4800 steps, 4 restarts).

One one-round federation (4 IID clients, sigmoid LeNet, in-process grid) records client 0's gradient on
``--batch`` images; IG runs on that observation once per TV weight. Appends rows (dataset, batch, tv, client,
psnr, ssim, baseline_psnr, attack_s) to ``--out``. The weight with the best PSNR goes into
``attacks/ig.py`` ``TUNED_TV`` (attacks/README.md "Attack strength").

    python benchmarks/ig_tv.py --dataset digits --tv 0 1e-8 1e-7 1e-6 1e-5
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--tv", nargs="+", type=float, default=[0.0, 1e-8, 1e-7, 1e-6, 1e-5])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--clients", nargs="+", type=int, default=[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "attack-strength" / "ig_tv_sweep.csv"))
    args = ap.parse_args(argv)

    import torch

    from fedkd.attacks.ig import IGParams, ig
    from fedkd.attacks.inline import run_inline
    from fedkd.attacks.metrics import score
    from fedkd.attacks.observation import load_observations
    from fedkd.clients.attacked import attacked_batch
    from fedkd.data import load_federation
    from inversion import cell_config

    torch.set_num_threads(1)
    out = Path(args.out)
    runs = out.parent / "runs"
    cfg = cell_config(args.dataset, "lenet", args.batch, "gradient", "none", runs, tuple(args.clients))
    run_dir = runs / cfg.run.name
    if not (run_dir / "observations").is_dir():
        shutil.rmtree(run_dir, ignore_errors=True)
        run_inline(cfg, run_dir)
    fed = load_federation(cfg.data, cfg.run.seed)
    mean = fed.server_test.x.mean(0)
    new = not out.exists()
    with out.open("a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(["dataset", "batch", "tv", "client", "psnr", "ssim", "baseline_psnr", "attack_s"])
        for tv in args.tv:
            for obs in load_observations(run_dir):
                t0 = time.perf_counter()
                rec = ig(obs, IGParams(steps=4800, restarts=4, tv=tv), seed=0)
                true = attacked_batch(cfg, fed, obs.server_round, obs.partition_id)
                sc = score(rec.images.numpy(), rec.labels.numpy(), true.x, true.y, mean)
                row = [args.dataset, args.batch, tv, obs.partition_id, round(sc["psnr"], 2), round(sc["ssim"], 3), round(sc["baseline_psnr"], 2), round(time.perf_counter() - t0, 1)]
                w.writerow(row)
                fh.flush()
                print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
