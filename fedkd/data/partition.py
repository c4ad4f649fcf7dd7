"""Partitioners from flwr-datasets, applied to in-memory arrays.

The arrays become a ``datasets.Dataset`` of (label, subject, group, index) columns; a flwr-datasets
partitioner splits it; the ``index`` column of each partition selects the client's samples.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from fedkd.config import ConfigError
from fedkd.registry import Registry

from .arrays import ArrayDataset

PARTITIONERS: Registry[Callable[..., list[np.ndarray]]] = Registry("partitioner")


def _table(data: ArrayDataset, group: np.ndarray | None = None):
    import datasets

    cols = {"label": data.y, "index": np.arange(len(data))}
    if group is not None:
        cols["group"] = group
    return datasets.Dataset.from_dict(cols)


def _run(partitioner, table, n: int) -> list[np.ndarray]:
    partitioner.dataset = table
    return [np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64) for i in range(n)]


@PARTITIONERS.register("iid")
def iid(data: ArrayDataset, cfg, seed: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import IidPartitioner

    return _run(IidPartitioner(num_partitions=cfg.num_clients), _table(data).shuffle(seed=seed), cfg.num_clients)


@PARTITIONERS.register("dirichlet")
def dirichlet(data: ArrayDataset, cfg, seed: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import DirichletPartitioner

    p = DirichletPartitioner(
        num_partitions=cfg.num_clients, partition_by="label", alpha=cfg.alpha,
        min_partition_size=cfg.min_partition_size, self_balancing=False, seed=seed,
    )
    try:
        return _run(p, _table(data), cfg.num_clients)
    except ValueError as e:
        raise ConfigError(
            "data.min_partition_size",
            f"dirichlet(alpha={cfg.alpha}) could not give each of {cfg.num_clients} clients "
            f"{cfg.min_partition_size} samples ({e}); lower it, raise data.alpha or use fewer clients",
        ) from None


@PARTITIONERS.register("pathological")
def pathological(data: ArrayDataset, cfg, seed: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import PathologicalPartitioner

    if cfg.classes_per_client > data.num_classes:
        raise ConfigError("data.classes_per_client", f"must be <= {data.num_classes} classes (got {cfg.classes_per_client})")
    p = PathologicalPartitioner(
        num_partitions=cfg.num_clients, partition_by="label",
        num_classes_per_partition=cfg.classes_per_client, class_assignment_mode="first-deterministic", seed=seed,
    )
    return _run(p, _table(data), cfg.num_clients)


@PARTITIONERS.register("subject")
def subject(data: ArrayDataset, cfg, seed: int) -> list[np.ndarray]:
    """By natural id: a generator's client assignment if it made one, else subjects spread round-robin."""
    from flwr_datasets.partitioner import NaturalIdPartitioner

    if data.client is not None:
        group = data.client
    elif data.subject is not None:
        subjects = np.unique(data.subject)
        if len(subjects) < cfg.num_clients:
            raise ConfigError("data.num_clients", f"{cfg.num_clients} clients but only {len(subjects)} subjects")
        rank = np.searchsorted(subjects, data.subject)
        group = np.random.default_rng(seed).permutation(len(subjects))[rank] % cfg.num_clients
    else:
        raise ConfigError("data.partitioner", f"'subject' needs a dataset with subject ids (femnist, synthetic-subjects)")
    found = np.unique(group)
    if len(found) != cfg.num_clients or found.min() != 0:
        raise ConfigError("data.num_clients", f"the dataset's natural ids form {len(found)} clients, not {cfg.num_clients}")
    p = NaturalIdPartitioner(partition_by="group")
    p.dataset = _table(data, group)
    out: list[np.ndarray] = [np.empty(0, np.int64)] * cfg.num_clients
    for pid in range(cfg.num_clients):
        part = p.load_partition(pid)
        out[int(part["group"][0])] = np.asarray(part["index"], dtype=np.int64)  # client i = group i
    return out


@PARTITIONERS.register("domain")
def domain(data: ArrayDataset, cfg, seed: int) -> list[np.ndarray]:
    """One domain per client (fedkd/data/domains.py): client i holds domain i % len(data.domains).

    A domain with several clients is split among them IID, or with Dirichlet(``data.domain_alpha``) label
    skew when that is > 0 (flwr-datasets' DirichletPartitioner inside the domain). The resulting client
    ids are the natural ids of flwr-datasets' NaturalIdPartitioner.
    """
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    from .domains import client_domains

    if data.domain is None:
        raise ConfigError("data.partitioner", "'domain' needs a dataset with domain ids (digits-domains, mnist-domains)")
    num_domains = len(cfg.domains)
    owner = client_domains(cfg.num_clients, num_domains)  # (num_clients,) domain of each client
    group = np.full(len(data), -1, dtype=np.int64)
    for d in range(num_domains):
        clients = np.flatnonzero(owner == d)
        idx = np.flatnonzero(data.domain == d)
        if len(clients) == 1:
            group[idx] = clients[0]
            continue
        sub = data.take(idx)
        if cfg.domain_alpha > 0:
            p = DirichletPartitioner(
                num_partitions=len(clients), partition_by="label", alpha=cfg.domain_alpha,
                min_partition_size=min(cfg.min_partition_size, len(idx) // len(clients)), self_balancing=False, seed=seed + d,
            )
            try:
                parts = _run(p, _table(sub), len(clients))
            except ValueError as e:
                raise ConfigError(
                    "data.domain_alpha",
                    f"dirichlet({cfg.domain_alpha}) could not split domain {cfg.domains[d]!r} ({len(idx)} samples) over "
                    f"{len(clients)} clients with {cfg.min_partition_size} samples each ({e}); raise it or lower data.min_partition_size",
                ) from None
        else:
            parts = _run(IidPartitioner(num_partitions=len(clients)), _table(sub).shuffle(seed=seed + d), len(clients))
        for c, part in zip(clients, parts):
            group[idx[part]] = c
    p = NaturalIdPartitioner(partition_by="group")
    p.dataset = _table(data, group)
    out: list[np.ndarray] = [np.empty(0, np.int64)] * cfg.num_clients
    for pid in range(p.num_partitions):
        part = p.load_partition(pid)
        out[int(part["group"][0])] = np.asarray(part["index"], dtype=np.int64)  # client i = group i
    return out
