"""PNG grids of virtual images: one row per class, images de-normalised to [0, 1] (matplotlib, Agg).

File layout inside a run directory (``fedkd report`` lists what it finds there)::

    <run dir>/virtual/global-v<version>-round<r>.png      global virtual data (server), as sent in round r
    <run dir>/virtual/client<pid>-round<r>.png             a client's local virtual data after its DM in round r
                                                           (written only where the client can reach the run dir)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

VIRTUAL_DIR = "virtual"


def grid_path(out_dir: str | Path, who: str, server_round: int, version: int | None = None) -> Path:
    """``<out_dir>/virtual/<who>[-v<version>]-round<r>.png`` (``who``: "global" or "client<pid>")."""
    tag = f"{who}-v{version:03d}" if version is not None else who
    return Path(out_dir) / VIRTUAL_DIR / f"{tag}-round{server_round:04d}.png"


def image_grid(images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, mean: float = 0.5, std: float = 0.5,
               pad: int = 2, max_per_class: int | None = None) -> np.ndarray:
    """(N, C, H, W) normalised images -> one (rows, cols, 3) float array in [0, 1]: a row per class."""
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    x = np.clip(x.astype(np.float32) * std + mean, 0.0, 1.0)
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    classes = np.unique(y)
    per = max(int((y == c).sum()) for c in classes) if len(classes) else 0
    if max_per_class is not None:
        per = min(per, max_per_class)
    n, _, h, w = x.shape
    grid = np.ones((len(classes) * (h + pad) + pad, per * (w + pad) + pad, 3), dtype=np.float32)  # white gutters
    for row, c in enumerate(classes):
        for col, img in enumerate(x[y == c][:per]):
            r0, c0 = pad + row * (h + pad), pad + col * (w + pad)
            grid[r0 : r0 + h, c0 : c0 + w] = img.transpose(1, 2, 0)
    return grid


def save_virtual_grid(images, labels, path: str | Path, mean: float = 0.5, std: float = 0.5, max_per_class: int | None = None,
                      scale: int = 2) -> Path:
    """Write :func:`image_grid` to ``path`` as a PNG, each pixel ``scale`` x ``scale``, and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = image_grid(images, labels, mean, std, max_per_class=max_per_class)
    plt.imsave(path, grid.repeat(scale, axis=0).repeat(scale, axis=1))
    return path


def list_grids(run_dir: str | Path) -> list[Path]:
    """The virtual-image grids of a run directory, sorted by name."""
    d = Path(run_dir) / VIRTUAL_DIR
    return sorted(d.glob("*.png")) if d.is_dir() else []
