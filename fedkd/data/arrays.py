"""In-memory datasets: images as float32 (N, C, H, W) in [0, 1], integer labels, optional subject ids."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ArrayDataset:
    x: np.ndarray  # (N, C, H, W) float32 in [0, 1]
    y: np.ndarray  # (N,) int64
    num_classes: int
    subject: np.ndarray | None = None  # (N,) int64 natural id (writer, person, ...)
    client: np.ndarray | None = None  # (N,) int64 client assignment made by a generator (-1 = none)
    domain: np.ndarray | None = None  # (N,) int64 index into the federation's domain names (domains.py)

    def __post_init__(self) -> None:
        if self.x.ndim != 4:
            raise ValueError(f"x must be (N, C, H, W), got shape {self.x.shape}")
        if len(self.x) != len(self.y):
            raise ValueError(f"{len(self.x)} inputs but {len(self.y)} labels")
        for name in ("subject", "client", "domain"):
            col = getattr(self, name)
            if col is not None and len(col) != len(self.y):
                raise ValueError(f"{name} has {len(col)} entries for {len(self.y)} samples")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def take(self, idx: np.ndarray) -> "ArrayDataset":
        idx = np.asarray(idx, dtype=np.int64)
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return ArrayDataset(self.x[idx], self.y[idx], self.num_classes, pick(self.subject), pick(self.client), pick(self.domain))


@dataclass(frozen=True)
class ClientData:
    partition_id: int
    train: ArrayDataset
    test: ArrayDataset


@dataclass(frozen=True)
class Federation:
    """What a simulated federation holds: one ClientData per partition and the server's test set."""

    name: str
    clients: tuple[ClientData, ...]
    server_test: ArrayDataset
    num_classes: int
    input_shape: tuple[int, int, int]
    extras: dict | None = None  # dataset-specific metadata (e.g. synthetic subjects' parameters)
    public: ArrayDataset | None = None  # held out before partitioning (load_federation's public_fraction)

    @property
    def num_clients(self) -> int:
        return len(self.clients)
