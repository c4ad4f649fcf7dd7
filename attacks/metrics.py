"""Reconstruction quality: PSNR, SSIM, label accuracy, and the mean-image baseline.

- PSNR on images in [0, 1]: ``10 log10(1 / MSE)`` per image (reconstructions are clipped to [0, 1]).
- SSIM: scikit-image's ``skimage.metrics.structural_similarity`` (Wang et al. 2004, Gaussian-free
  7x7 uniform window, ``data_range=1``; ``channel_axis=0`` for colour), per image.
- Label accuracy: the share of true labels the attack guessed (as multisets for a batch).
- ``baseline_psnr`` / ``baseline_ssim``: the dataset's mean image (here: the mean of the federation's
  server test set, data the attacker could plausibly know) scored against the same targets.
- ``class_baseline_psnr`` / ``class_baseline_ssim``: the class-conditional mean image (the server test
  set's mean image of each class) of each label the *attack guessed*, matched to the targets like a
  reconstruction. Labels leak (iDLG's rule is exact for one image), so this is what an attacker gets
  for free without inverting anything: the fairer bar. A defence works when the attack's PSNR falls
  to it; an attack only shows image leakage beyond the label when it beats it.

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


def class_means(x: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, C, H, W): the mean image of each class (the overall mean for a class with no sample)."""
    overall = x.mean(0)
    return np.stack([x[y == k].mean(0) if np.any(y == k) else overall for k in range(num_classes)])


def score(recon: np.ndarray, labels, true_x: np.ndarray, true_y, mean_image: np.ndarray, class_mean_images: np.ndarray | None = None) -> dict:
    """Per-image and mean PSNR/SSIM of ``recon`` (N, C, H, W) against ``true_x``, plus both baselines.

    ``class_mean_images`` (K, C, H, W): the class-conditional baseline uses the rows of the guessed ``labels``.
    """
    order = match(recon, true_x)
    rec = np.clip(recon[order], 0, 1)
    p = [psnr(r, t) for r, t in zip(rec, true_x)]
    s = [ssim(r, t) for r, t in zip(rec, true_x)]
    base = [psnr(mean_image, t) for t in true_x]
    base_s = [ssim(mean_image, t) for t in true_x]
    out = {
        "psnr": float(np.mean(p)),
        "ssim": float(np.mean(s)),
        "label_acc": label_accuracy(labels, true_y),
        "baseline_psnr": float(np.mean(base)),
        "baseline_ssim": float(np.mean(base_s)),
        "per_image": [
            {"psnr": a, "ssim": b, "baseline_psnr": c, "true_label": int(y)} for a, b, c, y in zip(p, s, base, true_y)
        ],
        "matched": rec,
    }
    if class_mean_images is not None:
        guess = class_mean_images[np.asarray(labels, dtype=int)]  # (N, C, H, W): the guessed labels' class means
        cm = guess[match(guess, true_x)]
        cp = [psnr(r, t) for r, t in zip(cm, true_x)]
        cs = [ssim(r, t) for r, t in zip(cm, true_x)]
        out["class_baseline_psnr"], out["class_baseline_ssim"] = float(np.mean(cp)), float(np.mean(cs))
        for row, a, b in zip(out["per_image"], cp, cs):
            row["class_baseline_psnr"], row["class_baseline_ssim"] = a, b
    return out
