"""Dataset loaders, by name. Each returns (pool, server_test or None, extras or None)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from fedkd.registry import Registry

from .arrays import ArrayDataset
from .hub import load_hub
from .idx import find_idx, read_idx
from .synthetic import generate_subjects

Loaded = tuple[ArrayDataset, "ArrayDataset | None", "dict | None"]
DATASETS: Registry[Callable[..., Loaded]] = Registry("dataset")


@DATASETS.register("digits")
def load_digits(cfg, seed: int) -> Loaded:
    """scikit-learn's bundled 8x8 digits (1,797 images, offline)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    return ArrayDataset(x, d.target.astype(np.int64), 10), None, None


@DATASETS.register("mnist")
def load_mnist(cfg, seed: int) -> Loaded:
    """MNIST from IDX files in ``data.data_dir`` (train and/or t10k), else from the hub."""
    if cfg.data_dir and any(Path(cfg.data_dir).glob("*.parquet")):
        return (*load_hub("ylecun/mnist", image_key="image", label_key="label", num_classes=10, data_dir=cfg.data_dir), None)
    if cfg.data_dir:
        parts = {}
        for split, prefix in (("train", "train"), ("test", "t10k")):
            xi, yi = find_idx(cfg.data_dir, f"{prefix}-images-idx3-ubyte"), find_idx(cfg.data_dir, f"{prefix}-labels-idx1-ubyte")
            if xi and yi:
                x = read_idx(xi).astype(np.float32)[:, None] / 255.0
                parts[split] = ArrayDataset(x, read_idx(yi).astype(np.int64), 10)
        if not parts:
            raise FileNotFoundError(f"no MNIST IDX files (train-*/t10k-*-ubyte[.gz]) in {cfg.data_dir}")
        if "train" in parts:
            return parts["train"], parts.get("test"), None
        return parts["test"], None, None  # only the test set: fedkd splits a server test set off it
    return (*load_hub("ylecun/mnist", image_key="image", label_key="label", num_classes=10), None)


@DATASETS.register("cifar10")
def load_cifar10(cfg, seed: int) -> Loaded:
    return (*load_hub("uoft-cs/cifar10", image_key="img", label_key="label", num_classes=10, data_dir=cfg.data_dir), None)


@DATASETS.register("femnist")
def load_femnist(cfg, seed: int) -> Loaded:
    """FEMNIST (62 classes); the writer id is kept as the subject id."""
    return (
        *load_hub(
            "flwrlabs/femnist", image_key="image", label_key="character", subject_key="writer_id",
            num_classes=62, data_dir=cfg.data_dir,
        ),
        None,
    )


@DATASETS.register("synthetic-subjects")
def load_synthetic_subjects(cfg, seed: int) -> Loaded:
    """Members' records only (non-member subjects are held by no client); with ``partitioner =
    "subject"`` each client gets exactly the subjects the generator assigned it. extras:
    ``subject_model`` (the subjects' distributions), ``holders`` (subjects per client), ``members``
    (bool per subject)."""
    data, model, holders, members = generate_subjects(
        num_subjects=cfg.num_subjects,
        records_per_subject=cfg.records_per_subject,
        num_clients=cfg.num_clients,
        subjects_per_client=cfg.subjects_per_client,
        clients_per_subject=cfg.clients_per_subject,
        separation=cfg.subject_separation,
        seed=seed,
    )
    held = data.take(np.flatnonzero(data.client >= 0))
    # The server's test set: fresh records from the same subject distributions.
    rng = np.random.default_rng(seed + 1)
    per = max(1, round(cfg.records_per_subject * cfg.server_test_fraction))
    xs, ys, ss = [], [], []
    for s in range(cfg.num_subjects):
        x, y = model.sample(s, per, rng)
        xs.append(x)
        ys.append(y)
        ss.append(np.full(per, s))
    test = ArrayDataset(np.concatenate(xs), np.concatenate(ys), data.num_classes, subject=np.concatenate(ss))
    return held, test, {"subject_model": model, "holders": holders, "members": members}


# --------------------------------------------------------------------------- feature-shift domains
def _domain_federation(x28: np.ndarray, y: np.ndarray, cfg, seed: int) -> Loaded:
    """Base digits -> one transformed shard per ``data.domains`` entry; a server test set stratified by
    (domain, label). Samples carry their domain index; ``extras["domains"]`` names them."""
    from sklearn.model_selection import train_test_split

    from .domains import build_domains

    rng = np.random.default_rng(seed)
    if cfg.max_samples and len(y) > cfg.max_samples:  # subsample before the (slower) transforms
        keep = np.sort(rng.choice(len(y), cfg.max_samples, replace=False))
        x28, y = x28[keep], y[keep]
    x, y, dom = build_domains(x28, y, tuple(cfg.domains), seed)
    data = ArrayDataset(x, y, 10, domain=dom)
    idx = np.arange(len(y))
    strata = dom * 10 + y
    _, counts = np.unique(strata, return_counts=True)
    ok = counts.min() >= 2 and round(len(y) * cfg.server_test_fraction) >= len(counts)
    if cfg.server_test_fraction > 0:
        keep, test = train_test_split(idx, test_size=cfg.server_test_fraction, random_state=seed, stratify=strata if ok else None)
    else:
        keep, test = idx, idx[:0]
    return data.take(np.sort(keep)), data.take(np.sort(test)), {"domains": list(cfg.domains)}


@DATASETS.register("digits-domains")
def load_digits_domains(cfg, seed: int) -> Loaded:
    """Feature-shift federation from sklearn's digits (offline): see fedkd/data/domains.py."""
    from sklearn.datasets import load_digits as sk_digits

    from .domains import digits_28

    d = sk_digits()
    return _domain_federation(digits_28(d.images / 16.0), d.target.astype(np.int64), cfg, seed)


@DATASETS.register("mnist-domains")
def load_mnist_domains(cfg, seed: int) -> Loaded:
    """Feature-shift federation from MNIST IDX files (train and/or t10k) in ``data.data_dir``."""
    xs, ys = [], []
    if cfg.data_dir:
        for prefix in ("train", "t10k"):
            xi, yi = find_idx(cfg.data_dir, f"{prefix}-images-idx3-ubyte"), find_idx(cfg.data_dir, f"{prefix}-labels-idx1-ubyte")
            if xi and yi:
                xs.append(read_idx(xi).astype(np.float32) / 255.0)
                ys.append(read_idx(yi).astype(np.int64))
    if not xs:
        raise FileNotFoundError(f"mnist-domains needs MNIST IDX files (train-*/t10k-*-ubyte[.gz]) in data.data_dir (got {cfg.data_dir!r})")
    return _domain_federation(np.concatenate(xs), np.concatenate(ys), cfg, seed)
