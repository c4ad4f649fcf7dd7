"""Reconstruction quality: PSNR, SSIM, label accuracy, and the mean-image baseline.

- PSNR on images in [0, 1]: ``10 log10(1 / MSE)`` per image (reconstructions are clipped to [0, 1]).
- SSIM: scikit-image's ``skimage.metrics.structural_similarity`` (Wang et al. 2004, Gaussian-free
  7x7 uniform window, ``data_range=1``; ``channel_axis=0`` for colour), per image.
- Label accuracy: the share of true labels the attack guessed (as multisets for a batch).
- ``baseline_psnr``: the PSNR of the dataset's mean image (here: the mean of the federation's server
  test set, data the attacker could plausibly know) against the same targets. A defence works when
  the attack's PSNR falls to this baseline.

Images of a batch have no order, so reconstructions are matched to originals one to one by
minimum total MSE (Hungarian assignment, scipy's ``linear_sum_assignment``) before scoring.
"""

from __future__ import annotations

from collections import Counter

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of one image against another, both in [0, 1]."""
    mse = float(np.mean((np.clip(a, 0, 1) - np.clip(b, 0, 1)) ** 2))
    return 10.0 * np.log10(1.0 / max(mse, 1e-10))  # capped at 100 dB (identical images)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """scikit-image's SSIM of two (C, H, W) images in [0, 1]."""
    from skimage.metrics import structural_similarity

    a, b = np.clip(a, 0, 1).astype(np.float64), np.clip(b, 0, 1).astype(np.float64)
    win = min(7, a.shape[-1], a.shape[-2])
    win -= 1 - win % 2  # odd
    if a.shape[0] == 1:
        return float(structural_similarity(a[0], b[0], data_range=1.0, win_size=win))
    return float(structural_similarity(a, b, data_range=1.0, channel_axis=0, win_size=win))


def match(recon: np.ndarray, true: np.ndarray) -> np.ndarray:
    """``order`` such that ``recon[order[i]]`` is matched to ``true[i]`` (min total MSE)."""
    from scipy.optimize import linear_sum_assignment

    cost = ((true[:, None] - np.clip(recon, 0, 1)[None]) ** 2).reshape(len(true), len(recon), -1).mean(-1)
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)]


def label_accuracy(guess, true) -> float:
    """Share of the true labels present in the guess, as multisets (order-free)."""
    g, t = Counter(int(v) for v in guess), Counter(int(v) for v in true)
    return sum(min(g[k], n) for k, n in t.items()) / max(len(true), 1)


def score(recon: np.ndarray, labels, true_x: np.ndarray, true_y, mean_image: np.ndarray) -> dict:
    """Per-image and mean PSNR/SSIM of ``recon`` (N, C, H, W) against ``true_x``, plus baselines."""
    order = match(recon, true_x)
    rec = np.clip(recon[order], 0, 1)
    p = [psnr(r, t) for r, t in zip(rec, true_x)]
    s = [ssim(r, t) for r, t in zip(rec, true_x)]
    base = [psnr(mean_image, t) for t in true_x]
    return {
        "psnr": float(np.mean(p)),
        "ssim": float(np.mean(s)),
        "label_acc": label_accuracy(labels, true_y),
        "baseline_psnr": float(np.mean(base)),
        "per_image": [
            {"psnr": a, "ssim": b, "baseline_psnr": c, "true_label": int(y)} for a, b, c, y in zip(p, s, base, true_y)
        ],
        "matched": rec,
    }
