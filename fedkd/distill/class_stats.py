"""Per-class, per-channel image statistics, and virtual images drawn from them (FedLGD's initialisation).

A FedLGD client discloses, once, for each class c it holds and each channel k: the mean and the
standard deviation of all pixel values of its (normalised) training images of class c in channel k,
plus which classes it holds. The server initialises the global virtual data from their average; each
client initialises its own local virtual data from its own statistics (the authors' ``init='normal'``):
every virtual image of class c is Gaussian noise with, per channel, that mean and standard deviation.

Deviation from the authors' code, which we read as a bug: their per-class mean and variance divide by
the number of pixels of *all* the client's images rather than of class c's images (so a class's mean
shrinks with its share of the data). Here they are the class's own pixel mean and (population) std.
Averaging over clients is unweighted, as the authors' 1/num_clients, but over the clients that hold
the class (under label skew a client may hold none of it; the authors' setting has every class on
every client). A class no client holds is initialised with standard normal noise (the authors'
``torch.randn`` before the statistics are applied).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ClassStats:
    mean: np.ndarray  # (K, C) float32, pixel mean per class and channel (0 where absent)
    std: np.ndarray  # (K, C) float32, pixel standard deviation per class and channel (0 where absent)
    present: np.ndarray  # (K,) bool, whether the class has any image

    def __post_init__(self) -> None:
        k, c = self.mean.shape
        if self.std.shape != (k, c) or self.present.shape != (k,):
            raise ValueError(f"class statistics of inconsistent shapes: mean {self.mean.shape}, std {self.std.shape}, present {self.present.shape}")

    @property
    def num_classes(self) -> int:
        return self.mean.shape[0]

    @property
    def channels(self) -> int:
        return self.mean.shape[1]


def class_channel_stats(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, num_classes: int) -> ClassStats:
    """Statistics of images ``x`` (N, C, H, W), already normalised the way training sees them, labels ``y`` (N,)."""
    x = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
    mean = np.zeros((num_classes, x.shape[1]))
    std = np.zeros((num_classes, x.shape[1]))
    present = np.zeros(num_classes, dtype=bool)
    for c in range(num_classes):
        xc = x[y == c]  # (n_c, C, H, W)
        if len(xc):
            present[c] = True
            mean[c] = xc.mean(axis=(0, 2, 3))
            std[c] = xc.std(axis=(0, 2, 3))
    return ClassStats(mean.astype(np.float32), std.astype(np.float32), present)


def average_stats(stats: Sequence[ClassStats]) -> ClassStats:
    """Per class: the unweighted mean, over the clients that hold it, of their means and of their stds."""
    if not stats:
        raise ValueError("no class statistics to average")
    present = np.stack([s.present for s in stats]).astype(np.float64)  # (M, K)
    holders = present.sum(0)  # (K,)
    w = present / np.where(holders > 0, holders, 1.0)  # (M, K): 1/holders for each holding client
    mean = np.einsum("mk,mkc->kc", w, np.stack([s.mean for s in stats]).astype(np.float64))
    std = np.einsum("mk,mkc->kc", w, np.stack([s.std for s in stats]).astype(np.float64))
    return ClassStats(mean.astype(np.float32), std.astype(np.float32), holders > 0)


def init_from_stats(stats: ClassStats, ipc: int, size: tuple[int, int], generator: torch.Generator,
                    classes: Sequence[int] | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Virtual images grouped by class: ``ipc`` per class of ``classes`` (default: all K), each channel
    N(mean[c, k], std[c, k]) per pixel; a class without statistics gets N(0, 1). Returns (images
    (len(classes) * ipc, C, H, W), labels (len(classes) * ipc,)), drawn from ``generator``."""
    classes = list(range(stats.num_classes)) if classes is None else [int(c) for c in classes]
    h, w = size
    noise = torch.randn((len(classes) * ipc, stats.channels, h, w), generator=generator, device=generator.device)
    mean = torch.tensor(np.stack([stats.mean[c] if stats.present[c] else np.zeros(stats.channels) for c in classes]), dtype=torch.float32)
    std = torch.tensor(np.stack([stats.std[c] if stats.present[c] else np.ones(stats.channels) for c in classes]), dtype=torch.float32)
    mean = mean.to(noise.device).repeat_interleave(ipc, 0)[:, :, None, None]  # (len * ipc, C, 1, 1)
    std = std.to(noise.device).repeat_interleave(ipc, 0)[:, :, None, None]
    images = (noise * std + mean).to(device if device is not None else noise.device)
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(ipc).to(images.device)
    return images, labels
