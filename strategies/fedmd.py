"""FedMD: heterogeneous federated learning via model distillation (Li & Wang 2019, arXiv 1910.03581).

Clients keep their own models (any architecture) and share class scores on public labelled data.

- Transfer-learning start (client side, the first time a client is asked anything): train the fresh
  model on the public data for ``fedmd.public_epochs``, then on its private data for
  ``fedmd.private_epochs`` (the paper trains each "to convergence").
- Every round, two exchanges inside one Flower round (``configure_train`` runs the first itself
  on the Grid it is handed, so every runtime and the byte counters see both):

  1. *communicate*: the server sends a seed that fixes this round's alignment subset (a random
     ``fedmd.alignment_size`` subset of the public data; the paper uses 5,000 of MNIST/CIFAR-10,
     capped here at the public set's size); each client replies with its class scores (logits)
     on that subset: exactly alignment_size x K float32 values, no weights.
  2. *aggregate / distribute*: the server averages the scores into the consensus and sends it to
     the clients that answered; each client *digests* (trains to approach the consensus on the
     alignment subset: L1 loss on the logits, as the authors' code does, ``fedmd.digest_epochs`` = 1,
     batch ``fedmd.digest_batch_size`` = 256) and *revisits* (trains on its private data for
     ``fedmd.revisit_epochs``), then replies with metrics only.

Public data: ``fedmd.public_dataset = ""`` (default) holds ``fedmd.public_fraction`` of
``data.dataset`` out before partitioning (stratified), so it is in no client's private data; or
name a second dataset with the same input shape (its labels must fit the federation's K classes).
A second dataset equal to ``data.dataset``, or with any input identical to one of the federation's
(clients' splits, server test set), is refused before the run starts.
Deviation: the paper's public and private tasks have different label sets; on one dataset they share
the K labels. On digits (1,437 training images after the server's test split) the default 10%
public split holds 144 images, so each round aligns on all of them unless ``alignment_size`` is
set lower (the benchmark uses 100: a random 70% per round).

Clients report ``pre_accuracy``/``pre_global_accuracy`` (their model before this round's digest) with
their scores; round 1's values are the transfer-learning baseline the paper compares against.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedkd import keys
from fedkd.config import ConfigError, register_section
from fedkd.data import ArrayDataset, DATASETS, Federation, load_federation

from . import STRATEGIES
from .base import StrategyEntry, StrategySpec
from .fedavg import sampling
from .personal import PersonalStrategy

SCORE, DIGEST = "score", "digest"  # keys.PHASE values


@register_section("fedmd")
@dataclass(frozen=True)
class FedMDConfig:
    public_dataset: str = ""  # "" = a held-out split of data.dataset; else a dataset name
    public_fraction: float = 0.1  # share of data.dataset's training pool held out as public data
    alignment_size: int = 5000  # paper: 5,000 public samples per round (capped at the public set)
    public_epochs: int = 20  # transfer-learning start: epochs on the public data
    private_epochs: int = 10  # ... then on the private data
    digest_epochs: int = 1  # paper: 1
    digest_batch_size: int = 256  # paper: 256
    revisit_epochs: int = 2  # paper: "a few"

    def validate(self, cfg) -> None:
        if self.public_dataset:
            if self.public_dataset == cfg.data.dataset:
                raise ConfigError("fedmd.public_dataset", f"{self.public_dataset!r} is data.dataset: the public set would overlap the clients' "
                                  "private data and the server's test set; use \"\" (a held-out split of data.dataset) or another dataset")
            if self.public_dataset not in DATASETS:
                raise ConfigError("fedmd.public_dataset", f"unknown value {self.public_dataset!r}; valid: \"\" (a split of data.dataset), {', '.join(DATASETS.names())}")
        elif not 0 < self.public_fraction < 1:
            raise ConfigError("fedmd.public_fraction", f"must be in (0, 1): the public split would be empty (got {self.public_fraction})")
        for key in ("alignment_size", "digest_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"fedmd.{key}", f"must be >= 1 (got {getattr(self, key)})")
        for key in ("public_epochs", "private_epochs", "digest_epochs", "revisit_epochs"):
            if getattr(self, key) < 0:
                raise ConfigError(f"fedmd.{key}", f"must be >= 0 (got {getattr(self, key)})")


@functools.lru_cache(maxsize=2)
def _second_dataset(name: str, data_cfg, seed: int) -> ArrayDataset:
    pool, _, _ = DATASETS.get(name)(dataclasses.replace(data_cfg, dataset=name), seed)
    return pool


def fedmd_data(cfg) -> tuple[Federation, ArrayDataset]:
    """The federation FedMD's clients train on and its public labelled data (never a client's)."""
    hp = cfg.fedmd
    if hp.public_dataset:
        fed = load_federation(cfg.data, cfg.run.seed)
        try:
            public = _second_dataset(hp.public_dataset, cfg.data, cfg.run.seed)
        except FileNotFoundError as e:
            raise ConfigError("fedmd.public_dataset", str(e)) from None
        if public.input_shape != fed.input_shape:
            raise ConfigError("fedmd.public_dataset", f"{hp.public_dataset} has inputs {public.input_shape}, the federation {fed.input_shape}")
        if int(public.y.max(initial=0)) >= fed.num_classes:
            raise ConfigError("fedmd.public_dataset", f"{hp.public_dataset}'s labels do not fit the federation's {fed.num_classes} classes")
        shared = overlap(public, fed)
        if shared:
            raise ConfigError("fedmd.public_dataset", f"{shared} of {hp.public_dataset}'s {len(public)} samples are also in the federation "
                              "(clients' data or the server's test set); the public set must be disjoint from it")
    else:
        fed = load_federation(cfg.data, cfg.run.seed, hp.public_fraction)
        public = fed.public
    if public is None or len(public) == 0:
        raise ConfigError("fedmd.public_fraction", f"{hp.public_fraction} of {cfg.data.dataset}'s training pool is an empty public split; raise it")
    return fed, public


def overlap(public: ArrayDataset, fed: Federation) -> int:
    """How many public samples have an input identical to one in the federation (any client's train or
    test split, the server's test set)."""
    import hashlib

    def digests(x: np.ndarray) -> set[bytes]:
        return {hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=16).digest() for row in x}

    held = set()
    for c in fed.clients:
        held |= digests(c.train.x) | digests(c.test.x)
    held |= digests(fed.server_test.x)
    return sum(d in held for d in (hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=16).digest() for row in public.x))


def alignment_indices(num_public: int, size: int, seed: int) -> np.ndarray:
    """This round's alignment subset: ``min(size, num_public)`` public indices drawn by ``seed``."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_public, size=min(size, num_public), replace=False))


class FedMD(PersonalStrategy):
    """Class scores up on a public alignment subset, their average (the consensus) down."""

    def __init__(self, run_seed: int, timeout: float = 3600, **kwargs) -> None:
        super().__init__(**kwargs)
        self.run_seed = run_seed
        self.timeout = timeout

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        nodes, conf = self.sample(server_round, config, grid)
        seed = zlib.crc32(f"fedmd-alignment,{self.run_seed},{server_round}".encode())
        # 1. communicate: every sampled client's class scores on the alignment subset
        ask = ConfigRecord({**dict(conf), keys.PHASE: SCORE, keys.ALIGNMENT_SEED: seed})
        replies = self.valid(grid.send_and_receive([self.message(n, ask) for n in nodes], timeout=self.timeout))
        if not replies:
            return []
        scores = np.stack([r.content[self.arrayrecord_key][keys.LOGITS].numpy() for r in replies])  # (M, A, K)
        consensus = scores.mean(0).astype(np.float32)  # (A, K)
        # 2. distribute: the consensus to the clients that answered; they digest and revisit
        digest = ConfigRecord({**dict(conf), keys.PHASE: DIGEST, keys.ALIGNMENT_SEED: seed})
        down = ArrayRecord({keys.LOGITS: Array(consensus)})
        return [self.message(r.metadata.src_node_id, digest, down) for r in replies]


def build_fedmd(cfg, fed) -> StrategySpec:
    fedmd_data(cfg)  # a missing or empty public set stops the run before it starts
    strategy = FedMD(cfg.run.seed, **sampling(cfg))
    return StrategySpec(strategy, ArrayRecord(), strategy.evaluate_fn, client="fedmd")


STRATEGIES.add("fedmd", StrategyEntry(build_fedmd, heterogeneous=True, mechanisms=("none", "dp-sgd"), description="FedMD (Li & Wang 2019): class scores on public data, consensus distillation"))
