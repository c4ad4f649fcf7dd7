"""FedAvg's IG against HyperFL's attacks on the same images, from local observations (no federation).

For each image: one client, the same initial ``hyperfl-cnn`` for both frameworks; optionally ``--warm`` local rounds
on 200 other images of the client first (HyperFL's two-stage round; FedAvg: as many epochs of SGD, batch 50, lr 0.05,
momentum 0.9). Then the ``gradient`` threat setting on ONE image: FedAvg's client takes one SGD step (lr 0.1) and is
attacked by ``ig``; HyperFL's client runs one head step and one hypernetwork step and is attacked by ``hyperfl-ig``,
``hyperfl-dia`` and ``hyperfl-rank1``. PSNR/SSIM against the true image, next to the mean-image baseline.
``hyper_target_norm`` is the norm of the clipped hypernetwork gradient the server recovers (near 0: the client's head
stage memorised the image and the hypernetwork step carries almost nothing).

    python benchmarks/hyperfl_inversion.py                       # images 0,1,2; warm 0 and 3; 300 steps, 2 restarts
    python benchmarks/hyperfl_inversion.py --quick               # 1 image, warm 3, 60 steps, 1 restart

Writes ``benchmarks/results/hyperfl_inversion.csv`` (``--out``) and prints a markdown table. One thread (the attacks'
many small ops run faster that way on a shared CPU). The integrator's ``benchmarks/hypernetworks.py`` covers the
federated runs; this script is the attack side on its own.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import pandas as pd
import torch

from fedkd.attacks.hyperfl_inversion import (
    HyperFLDIAParams, HyperFLIGParams, HyperFLRank1Params, HyperFLReplay, hyperfl_dia, hyperfl_ig, hyperfl_local_observation,
    hyperfl_rank1,
)
from fedkd.attacks.ig import IGParams, ig
from fedkd.attacks.metrics import score
from fedkd.attacks.observation import local_observation
from fedkd.config import DataConfig, load_config
from fedkd.data import load_federation
from fedkd.hyper_local import hyperfl_local_update
from fedkd.hypernet import hyperfl_model
from fedkd.models import build_model
from fedkd.training import train


def run(images, warms, steps, restarts, seed, echo=print, data: DataConfig | None = None) -> pd.DataFrame:
    """``data``: the dataset the images come from (default sklearn's digits); client 0's training images."""
    hp = load_config(None, []).hyperfl
    fed = load_federation(data or DataConfig(partitioner="iid", num_clients=2), 0)
    data, mean = fed.clients[0].train, fed.server_test.x.mean(0)
    pool = data.take(list(range(40, 240)))
    rows = []
    for warm in warms:
        torch.manual_seed(seed)
        target = build_model("hyperfl-cnn", fed.input_shape, fed.num_classes)
        model = hyperfl_model(target, hp, torch.Generator().manual_seed(100 + seed))
        fedavg = copy.deepcopy(target)
        g = torch.Generator().manual_seed(200 + seed)
        for _ in range(warm):
            hyperfl_local_update(model, torch.from_numpy(pool.x), torch.from_numpy(pool.y), hp, generator=g)
        if warm:
            train(fedavg, pool, epochs=warm, batch_size=50, lr=0.05, momentum=0.9)
        for i in images:
            one = data.take([i])
            obs = local_observation(fedavg, one, model_name="hyperfl-cnn", lr=0.1)
            hobs = hyperfl_local_observation(model, one, hp, model_name="hyperfl-cnn", generator=torch.Generator().manual_seed(5))
            norm = float(torch.sqrt(sum((t * t).sum() for t in HyperFLReplay(hobs, "cpu").target)))
            runs = [
                ("fedavg", "ig", lambda: ig(obs, IGParams(steps=steps, restarts=restarts), seed=0)),
                ("hyperfl", "hyperfl-ig", lambda: hyperfl_ig(hobs, HyperFLIGParams(steps=steps, restarts=restarts), seed=0)),
                ("hyperfl", "hyperfl-dia", lambda: hyperfl_dia(hobs, HyperFLDIAParams(steps=steps, restarts=restarts), seed=0)),
                ("hyperfl", "hyperfl-rank1", lambda: hyperfl_rank1(hobs, HyperFLRank1Params(steps=steps, restarts=restarts), seed=0)),
            ]
            for framework, attack, fn in runs:
                t0 = time.perf_counter()
                rec = fn()
                sc = score(rec.images.numpy(), rec.labels.numpy(), one.x, one.y, mean)
                rows.append({"warm_rounds": warm, "image": i, "framework": framework, "attack": attack, "psnr": sc["psnr"], "ssim": sc["ssim"],
                             "baseline_psnr": sc["baseline_psnr"], "attack_loss": rec.loss, "hyper_target_norm": norm,
                             "steps": steps, "restarts": restarts, "seconds": time.perf_counter() - t0})
                echo(f"warm {warm} image {i} {attack:>13}: psnr {sc['psnr']:5.1f} ssim {sc['ssim']:5.2f} (baseline {sc['baseline_psnr']:.1f}, loss {rec.loss:.3f}, {rows[-1]['seconds']:.0f} s)")
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", default="0,1,2")
    ap.add_argument("--warm", default="0,3", help="local rounds before the attacked one, comma-separated")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--seed", type=int, default=6)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/hyperfl_inversion.csv")
    a = ap.parse_args()
    if a.quick:
        a.images, a.warm, a.steps, a.restarts = "0", "3", 60, 1
    torch.set_num_threads(1)
    df = run([int(v) for v in a.images.split(",")], [int(v) for v in a.warm.split(",")], a.steps, a.restarts, a.seed)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(a.out, index=False)
    table = df.groupby(["warm_rounds", "attack"], sort=False)[["psnr", "ssim", "baseline_psnr", "hyper_target_norm"]].mean().round(2)
    print(table.to_string())
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
