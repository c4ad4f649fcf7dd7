"""Attack the observations of a run directory and score them: ``attack.json`` and ``attack.png``.

The attack gets each :class:`Observation` and nothing else. Only afterwards are the true images
recomputed from the federation (:func:`fedkd.clients.attacked.attacked_batch`) to score it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

# strategy name -> fn(cfg) -> Federation: the data its clients train on when that is not
# ``load_federation(cfg.data, seed)`` (FedDF holds its proxy pool out), to recompute the attacked images.
CLIENT_FEDERATIONS: dict = {}
# (defined before the fedkd imports below: strategies/feddf.py registers here while they load)

from fedkd.clients.attacked import attacked_batch  # noqa: E402
from fedkd.data import load_federation  # noqa: E402
from fedkd.training import resolve_device  # noqa: E402

from . import ATTACKS  # noqa: E402
from .gradients import find_batch_order  # noqa: E402
from .metrics import class_means, score  # noqa: E402
from .observation import Observation, load_observations  # noqa: E402


def client_federation(cfg):
    fn = CLIENT_FEDERATIONS.get(cfg.strategy.name)
    return fn(cfg) if fn is not None else load_federation(cfg.data, cfg.run.seed)


def attack_observations(observations: list[Observation], cfg, *, device=None, echo=print) -> tuple[dict, list]:
    """Run ``cfg.attack.name`` on each observation and score it. Returns (result dict, image rows)."""
    fed = client_federation(cfg)
    mean_image = fed.server_test.x.mean(0)  # (C, H, W): the baseline "reconstruction"
    class_mean_images = class_means(fed.server_test.x, fed.server_test.y, fed.num_classes)  # (K, C, H, W)
    device = resolve_device(cfg.run.device) if device is None else device
    entry = ATTACKS.get(cfg.attack.name)
    params = entry.params_for(cfg.attack, cfg.data.dataset)
    per_obs, rows = [], []
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)  # many tiny ops: one thread is much faster on a shared CPU (~10x measured under load)
    try:
        _attack_all(observations, cfg, fed, (mean_image, class_mean_images), device, entry, params, per_obs, rows, echo)
    finally:
        torch.set_num_threads(threads)
    imgs = [im for o in per_obs for im in o["per_image"]]
    first = observations[0]
    result = {
        "attack": cfg.attack.name,
        "params": dataclasses.asdict(params),
        "setting": first.training.setting,
        "defence": first.defence,
        "dataset": cfg.data.dataset,
        "model": first.model_name,
        "batch_size": first.training.num_examples,
        "strength": strength(entry, params),
        "batch_order": ORDER_NOTE[cfg.attack.order] if first.training.setting == "update" else "n/a (one step)",
        "psnr": float(np.mean([i["psnr"] for i in imgs])),
        "ssim": float(np.mean([i["ssim"] for i in imgs])),
        "label_acc": float(np.mean([o["label_acc"] for o in per_obs])),
        "baseline_psnr": float(np.mean([i["baseline_psnr"] for i in imgs])),
        "baseline_ssim": float(np.mean([o["baseline_ssim"] for o in per_obs])),
        "class_baseline_psnr": float(np.mean([i["class_baseline_psnr"] for i in imgs])),
        "class_baseline_ssim": float(np.mean([i["class_baseline_ssim"] for i in imgs])),
        "wall_s": float(sum(o["wall_s"] for o in per_obs)),
        "ssim_impl": "skimage.metrics.structural_similarity (data_range=1, 7x7 uniform window)",
        "observations": per_obs,
    }
    return result, rows


def strength(entry, params) -> str:
    """"full" when the attack runs its default (paper) step count and restarts, else "weakened (...)"."""
    full = entry.params()
    weak = [f"{k} {getattr(params, k)} < {getattr(full, k)}" for k in ("steps", "restarts") if hasattr(full, k) and getattr(params, k) < getattr(full, k)]
    return "full" if not weak else "weakened (" + ", ".join(weak) + ")"


ORDER_NOTE = {
    "unknown": "unknown: the client reshuffles every epoch; the attack assumes the same consecutive mini-batches every epoch",
    "known": "known (oracle): the attack is given the client's per-epoch order, which a real server never sees",
}


def _attack_all(observations, cfg, fed, baselines, device, entry, params, per_obs, rows, echo) -> None:
    for obs in observations:
        true = attacked_batch(cfg, fed, obs.server_round, obs.partition_id)  # metrics (and the oracle's order) only
        if cfg.attack.order == "known" and obs.training.setting == "update":
            order = find_batch_order(obs, true.x, true.y, device)  # evaluation side: needs the true images
            obs = dataclasses.replace(obs, training=dataclasses.replace(obs.training, batch_order=order))
        t0 = time.perf_counter()
        rec = entry.run(obs, params, device=device, seed=cfg.run.seed)  # the attack sees the observation only
        wall = time.perf_counter() - t0
        if len(true) != len(rec.images):
            raise ValueError(f"client {obs.partition_id} round {obs.server_round}: {len(rec.images)} reconstructions for {len(true)} images")
        sc = score(rec.images.numpy(), rec.labels.numpy(), true.x, true.y, *baselines)
        rows.append((obs, true.x, sc.pop("matched")))
        per_obs.append({
            "round": obs.server_round, "client": obs.partition_id, "setting": obs.training.setting,
            "local_steps": obs.training.steps if obs.training.setting == "update" else 1,
            "wall_s": wall, "attack_loss": rec.loss, "guessed_labels": [int(v) for v in rec.labels], **sc,
        })
        echo(f"  round {obs.server_round} client {obs.partition_id}: psnr {sc['psnr']:.2f} dB (baselines: mean image {sc['baseline_psnr']:.2f}, class mean {sc['class_baseline_psnr']:.2f}), "
             f"ssim {sc['ssim']:.3f}, label acc {sc['label_acc']:.2f}, {wall:.1f} s")


def save_grid(rows: list, path: str | Path, title: str = "") -> Path:
    """Originals above their matched reconstructions, two rows per observation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = max(len(t) for _, t, _ in rows)
    fig, axes = plt.subplots(2 * len(rows), ncol, figsize=(max(1.2 * ncol + 0.8, 5.0), 2.6 * len(rows)), squeeze=False)
    for i, (obs, true, rec) in enumerate(rows):
        for j in range(ncol):
            for k, imgs in enumerate((true, rec)):
                ax = axes[2 * i + k, j]
                ax.axis("off")
                if j < len(imgs):
                    im = np.clip(imgs[j], 0, 1)
                    ax.imshow(im[0] if im.shape[0] == 1 else im.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1)
        axes[2 * i, 0].set_title(f"r{obs.server_round} c{obs.partition_id}: true", fontsize=7, loc="left")
        axes[2 * i + 1, 0].set_title("reconstructed", fontsize=7, loc="left")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def attack_run_dir(run_dir: str | Path, cfg, out: str | Path | None = None, *, device=None, echo=print) -> dict:
    """Attack every observation in ``run_dir``; write ``attack.json`` and ``attack.png`` to ``out`` (default run_dir)."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir
    out.mkdir(parents=True, exist_ok=True)
    observations = load_observations(run_dir)
    echo(f"{cfg.attack.name}: {len(observations)} observation(s) in {run_dir}")
    result, rows = attack_observations(observations, cfg, device=device, echo=echo)
    result["run_dir"] = str(run_dir)
    title = f"{result['attack']} vs {result['defence']} ({result['setting']}, {result['model']}, batch {result['batch_size']}): PSNR {result['psnr']:.1f} dB"
    result["png"] = str(save_grid(rows, out / "attack.png", title))
    (out / "attack.json").write_text(json.dumps(result, indent=2))
    return result
