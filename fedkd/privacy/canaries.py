"""Canaries for audits: records or subjects the auditor may add to the training data, each with
probability 1/2, and the ``[audit]`` config section that tells the clients where they are.

- **Record canaries** (unit "record"): one input with a random eighth of its pixels at 1 and the rest at 0,
  and a random label, each placed on one random client. Out of distribution and mislabelled, the easiest
  records to memorise; sparse, so two canaries' inputs (and gradients) overlap little.
- **Subject canaries** (unit "subject"): each canary subject has its own distribution, such a sparse
  prototype plus Gaussian noise (std 0.1, clipped to [0, 1]) with one random label; ``records_per_canary`` records of
  it are spread over ``clients_per_canary`` random clients. The adversary later gets fresh samples of
  that distribution, never the training records (Suri et al.'s threat model).

The auditor writes the canaries and their coin flips to ``canaries.npz`` (:func:`make_canaries`) and sets
``audit.canary_file``. The clients then train on the partitions plus the included canaries that sit on
them (:func:`with_canaries`, an ``ENV_HOOKS`` entry); the server's accounting sees the same federation.
The coin flips come from OS entropy (``secrets``) unless a debug seed is given.

Canary subject ids start at ``CANARY_SUBJECT_BASE`` so they never collide with the dataset's subjects.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedkd.config import ConfigError, register_section
from fedkd.data import ArrayDataset
from fedkd.privacy.entropy import numpy_generator

KINDS = ("auto", "record", "subject")
CANARY_SUBJECT_BASE = 1_000_000
PROTOTYPE_NOISE = 0.1


@dataclass(frozen=True)
class AuditConfig:
    canaries: int = 200  # m: canaries (records or subjects), each included with probability 1/2
    kind: str = "auto"  # auto: subject for privacy.mechanism = "subject-dp", else record
    records_per_canary: int = 4  # subject canaries: training records per canary subject
    clients_per_canary: int = 1  # subject canaries: over how many clients those records are spread
    canary_file: str = ""  # set by `fedkd audit`: the canaries and their coin flips (empty = no canaries)

    def validate(self, cfg) -> None:
        if self.canaries < 2:
            raise ConfigError("audit.canaries", f"must be >= 2 (got {self.canaries})")
        if self.kind not in KINDS:
            raise ConfigError("audit.kind", f"unknown value {self.kind!r}; valid: {', '.join(KINDS)}")
        if self.records_per_canary < 1:
            raise ConfigError("audit.records_per_canary", f"must be >= 1 (got {self.records_per_canary})")
        if not 1 <= self.clients_per_canary <= cfg.data.num_clients:
            raise ConfigError("audit.clients_per_canary", f"must be in 1..data.num_clients={cfg.data.num_clients} (got {self.clients_per_canary})")

    def resolved_kind(self, cfg) -> str:
        if self.kind != "auto":
            return self.kind
        return "subject" if cfg.privacy.mechanism == "subject-dp" else "record"


register_section("audit")(AuditConfig)


@dataclass(frozen=True)
class Canaries:
    kind: str
    x: np.ndarray  # (n, C, H, W) training records of all canaries (included or not)
    y: np.ndarray  # (n,)
    canary: np.ndarray  # (n,) which canary each record belongs to
    client: np.ndarray  # (n,) the client that holds it when its canary is included
    included: np.ndarray  # (m,) bool: the coin flips (ground truth; only the audit's bounds read them)
    prototypes: np.ndarray  # (m, C, H, W) subject canaries' distributions (record canaries: the record)
    labels: np.ndarray  # (m,) each canary's label

    @property
    def m(self) -> int:
        return len(self.included)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        np.savez_compressed(path, kind=np.array(self.kind), **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "kind"})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Canaries":
        with np.load(Path(path)) as z:
            return cls(str(z["kind"]), *(z[f.name] for f in dataclasses.fields(cls) if f.name != "kind"))

    def fresh_samples(self, n: int, rng: np.random.Generator):
        """The adversary's view: n fresh samples of every canary's distribution (records: the record
        itself, n = 1). Returns x (m n, ...), y, canary index."""
        if self.kind == "record":
            return self.prototypes, self.labels, np.arange(self.m)
        x = np.clip(np.repeat(self.prototypes, n, 0) + PROTOTYPE_NOISE * rng.standard_normal((self.m * n,) + self.prototypes.shape[1:]), 0, 1)
        return x.astype(np.float32), np.repeat(self.labels, n), np.repeat(np.arange(self.m), n)


def make_canaries(kind: str, m: int, input_shape, num_classes: int, num_clients: int, *, records_per_canary: int = 4,
                  clients_per_canary: int = 1, seed: int | None = None) -> Canaries:
    """m canaries with coin flips from OS entropy (``seed`` only for reproducible debugging)."""
    rng = numpy_generator(seed)
    shape = tuple(input_shape)
    dim = int(np.prod(shape))
    lit = max(2, dim // 8)  # sparse binary prototypes: different canaries' inputs (and gradients) overlap little
    protos = np.zeros((m, dim), np.float32)
    protos[np.arange(m)[:, None], np.argsort(rng.random((m, dim)), axis=1)[:, :lit]] = 1.0
    protos = protos.reshape((m,) + shape)
    labels = rng.integers(0, num_classes, m)
    included = rng.random(m) < 0.5
    if kind == "record":
        return Canaries(kind, protos, labels, np.arange(m), rng.integers(0, num_clients, m), included, protos, labels)
    if kind != "subject":
        raise ValueError(f"unknown canary kind {kind!r}")
    r = records_per_canary
    x = np.clip(np.repeat(protos, r, 0) + PROTOTYPE_NOISE * rng.standard_normal((m * r,) + shape), 0, 1).astype(np.float32)
    owners = np.stack([rng.choice(num_clients, clients_per_canary, replace=False) for _ in range(m)])  # (m, k)
    client = owners[np.repeat(np.arange(m), r), np.tile(np.arange(r), m) % clients_per_canary]
    return Canaries(kind, x, np.repeat(labels, r), np.repeat(np.arange(m), r), client, included, protos, labels)


@functools.lru_cache(maxsize=4)
def _load(path: str) -> Canaries:
    return Canaries.load(path)


def _concat(a: ArrayDataset, x, y, subject) -> ArrayDataset:
    return ArrayDataset(
        np.concatenate([a.x, x]), np.concatenate([a.y, y]), a.num_classes,
        subject=None if a.subject is None and subject is None else np.concatenate([a.subject if a.subject is not None else np.full(len(a), -1), subject]),
        client=None if a.client is None else np.concatenate([a.client, np.full(len(y), -1)]),
        domain=None if a.domain is None else np.concatenate([a.domain, np.zeros(len(y), a.domain.dtype)]),
    )


_WITH: dict = {}


def with_canaries(fed, cfg):
    """The federation plus the included canaries on the clients that hold them (unchanged without ``audit.canary_file``)."""
    audit = getattr(cfg, "audit", None)
    if audit is None or not audit.canary_file:
        return fed
    key = (id(fed), str(audit.canary_file))
    if key not in _WITH:
        if len(_WITH) > 8:
            _WITH.clear()
        _WITH[key] = (fed, _add(fed, _load(str(audit.canary_file))))  # keeps fed alive so its id stays unique
    return _WITH[key][1]


def _add(fed, c: Canaries):
    keep = c.included[c.canary]
    clients = []
    for cd in fed.clients:
        mine = keep & (c.client == cd.partition_id)
        sid = CANARY_SUBJECT_BASE + c.canary[mine]
        clients.append(dataclasses.replace(cd, train=_concat(cd.train, c.x[mine], c.y[mine], sid)))
    return dataclasses.replace(fed, clients=tuple(clients))


def canary_hook(msg, env):
    """ENV_HOOKS entry: clients train on their partition plus their included canaries."""
    audit = getattr(env.cfg, "audit", None)
    if audit is None or not audit.canary_file:
        return env
    return dataclasses.replace(env, federation=with_canaries(env.federation, env.cfg))


from fedkd.clients.base import ENV_HOOKS  # noqa: E402

ENV_HOOKS.append(canary_hook)


def canary_records(cfg) -> int:
    """At most how many canary records an audit adds to the clients (the reply validator's bound)."""
    a = getattr(cfg, "audit", None)
    if a is None or not a.canary_file:
        return 0
    return int(a.canaries) * int(a.records_per_canary) * max(int(a.clients_per_canary), 1)


from fedkd.server import EXTRA_CLIENT_RECORDS  # noqa: E402

EXTRA_CLIENT_RECORDS.append(canary_records)
