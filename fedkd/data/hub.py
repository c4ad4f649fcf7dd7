"""Datasets from the Hugging Face hub (or local parquet files) through flwr-datasets.

``FederatedDataset`` does the loading; fedkd then partitions the in-memory arrays itself, so hub
datasets and bundled ones go through the same partitioners. A ``data_dir`` holding ``*.parquet``
files (``train*.parquet``, ``test*.parquet``) loads offline through the same code path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .arrays import ArrayDataset


def _decode(im: Any) -> Any:
    """Parquet written without dataset features keeps images as {"bytes": ..., "path": ...}."""
    if isinstance(im, dict) and im.get("bytes") is not None:
        import io

        from PIL import Image

        return Image.open(io.BytesIO(im["bytes"]))
    return im


def _to_images(col: Any) -> np.ndarray:
    """A column of PIL images or nested lists -> float32 (N, C, H, W) in [0, 1]."""
    arrs = [np.asarray(_decode(im)) for im in col]
    x = np.stack(arrs)
    if x.ndim == 3:  # (N, H, W) grey
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)[:, :3]
    x = x.astype(np.float32)
    if x.max(initial=0.0) > 1.0:
        x /= 255.0
    return x


def parquet_files(data_dir: str | Path) -> dict[str, list[str]]:
    d = Path(data_dir)
    files: dict[str, list[str]] = {}
    for p in sorted(d.glob("*.parquet")):
        split = "test" if p.name.startswith("test") else "train"
        files.setdefault(split, []).append(str(p))
    return files


def load_hub(
    path: str,
    *,
    image_key: str,
    label_key: str,
    subject_key: str | None = None,
    num_classes: int | None = None,
    data_dir: str = "",
) -> tuple[ArrayDataset, ArrayDataset | None]:
    """Load the 'train' split (and 'test' when there is one) as arrays.

    ``path`` is a hub dataset id (e.g. ``ylecun/mnist``); with ``data_dir`` set to a folder of
    parquet files, the same loader reads those instead (no network).
    """
    from flwr_datasets import FederatedDataset

    kwargs: dict[str, Any] = {}
    if data_dir:
        files = parquet_files(data_dir)
        if "train" not in files:
            raise FileNotFoundError(f"no train*.parquet files in {data_dir}")
        path, kwargs = "parquet", {"data_files": files}
    fds = FederatedDataset(dataset=path, partitioners={"train": 1}, shuffle=False, **kwargs)
    splits = {}
    for split in ("train", "test"):
        try:
            ds = fds.load_split(split)
        except (KeyError, ValueError):
            continue
        x = _to_images(ds[image_key])
        y = np.asarray(ds[label_key], dtype=np.int64)
        subj = None
        if subject_key is not None:
            _, subj = np.unique(np.asarray(ds[subject_key]), return_inverse=True)
            subj = subj.astype(np.int64)
        splits[split] = (x, y, subj)
    if "train" not in splits:
        raise ValueError(f"{path} has no 'train' split")
    k = num_classes or int(max(s[1].max() for s in splits.values())) + 1
    train = ArrayDataset(*splits["train"][:2], k, subject=splits["train"][2])
    test = ArrayDataset(*splits["test"][:2], k, subject=splits["test"][2]) if "test" in splits else None
    return train, test
