"""Datasets, partitioners and the federation a run trains on.

``load_federation(data_cfg, seed)`` is deterministic in its arguments and cached per process, so a
simulation actor loads and partitions the data once for all the clients it hosts.
"""

from __future__ import annotations

import functools

import numpy as np

from fedkd.config import ConfigError

from .arrays import ArrayDataset, ClientData, Federation
from .datasets import DATASETS
from .hub import load_hub
from .partition import PARTITIONERS

__all__ = ["ArrayDataset", "ClientData", "Federation", "DATASETS", "PARTITIONERS", "load_federation", "load_hub"]


def _split(n: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(n)
    k = int(round(n * fraction))
    if fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    return np.sort(perm[k:]), np.sort(perm[:k])


@functools.lru_cache(maxsize=4)
def load_federation(cfg, seed: int, public_fraction: float = 0.0) -> Federation:
    """Load ``cfg.dataset``, split off the server's test set, partition the rest into clients.

    ``public_fraction`` > 0 holds that share of the pool out as ``Federation.public`` (stratified,
    seeded) before partitioning, so no client's private data contains it (FedMD's public data).
    """
    try:
        pool, server_test, extras = DATASETS.get(cfg.dataset)(cfg, seed)
    except FileNotFoundError as e:
        raise ConfigError("data.data_dir", str(e)) from None
    rng = np.random.default_rng(seed)
    if cfg.max_samples and len(pool) > cfg.max_samples:
        pool = pool.take(np.sort(rng.choice(len(pool), cfg.max_samples, replace=False)))
    if server_test is None:
        from sklearn.model_selection import train_test_split

        idx = np.arange(len(pool))
        counts = np.bincount(pool.y)
        counts = counts[counts > 0]
        stratifiable = counts.min() >= 2 and round(len(pool) * cfg.server_test_fraction) >= len(counts)
        strat = pool.y if stratifiable else None
        keep, test = train_test_split(idx, test_size=cfg.server_test_fraction, random_state=seed, stratify=strat)
        server_test, pool = pool.take(np.sort(test)), pool.take(np.sort(keep))
    public = None
    if public_fraction > 0:
        from sklearn.model_selection import train_test_split

        idx = np.arange(len(pool))
        k = int(round(len(pool) * public_fraction))
        counts = np.bincount(pool.y)
        strat = pool.y if k >= len(counts[counts > 0]) and counts[counts > 0].min() >= 2 else None
        if 0 < k < len(pool):
            keep, pub = train_test_split(idx, test_size=k, random_state=seed + 1, stratify=strat)
            public, pool = pool.take(np.sort(pub)), pool.take(np.sort(keep))
        else:
            public = pool.take(np.arange(0))  # empty: the caller reports it
    if cfg.num_clients > len(pool):
        raise ConfigError("data.num_clients", f"{cfg.num_clients} clients but only {len(pool)} training samples")
    parts = PARTITIONERS.get(cfg.partitioner)(pool, cfg, seed)
    clients = []
    for pid, idx in enumerate(parts):
        if len(idx) == 0:
            raise ConfigError("data.partitioner", f"{cfg.partitioner} left client {pid} with no samples")
        tr, te = _split(len(idx), cfg.client_test_fraction, np.random.default_rng([seed, pid]))
        clients.append(ClientData(pid, pool.take(idx[tr]), pool.take(idx[te])))
    return Federation(
        name=cfg.dataset, clients=tuple(clients), server_test=server_test,
        num_classes=pool.num_classes, input_shape=pool.input_shape, extras=extras, public=public,
    )
