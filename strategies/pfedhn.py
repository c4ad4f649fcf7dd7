"""pFedHN and pFedHN-PC (Shamsian et al., ICML 2021, arXiv 2103.04628; code AvivSham/pFedHN).

The server holds the hypernetwork phi and one embedding v_i per client (``PFedHNHypernet``) and generates each
client's model theta_i = h(v_i; phi) (``model.name``; the paper's ``pfedhn-cnn`` for its experiments). Per round:

1. ``configure_train``: for each sampled node, a message carrying its own theta_i (per-node messages).
2. The client trains theta_i for ``pfedhn.inner_steps`` steps and returns ``delta_i = theta_new - theta_i``.
3. ``aggregate_train``: for every conforming reply, one server step (:func:`fedkd.hypernet.pfedhn_step`):
   ``autograd.grad(theta_i, (phi, v), grad_outputs = -delta_i)``, clipped to norm ``pfedhn.clip`` = 50 over all
   hypernetwork parameters, SGD (lr 1e-2; pFedHN-PC 5e-2; momentum 0.9, weight decay 1e-3).

How a Flower round maps to the paper's steps: the paper samples ONE client per step (5,000 steps). Here each reply is
one such step, applied one after another in node-id order, each with the Jacobian at the hypernetwork that generated
that client's theta_i (the round's start, kept as a copy), so the round's later steps use a Jacobian a few steps old
(as asynchronous SGD does). With ``strategy.fraction_train`` such that one node is sampled per round (e.g.
1/num_clients) a round is exactly the paper's step and ``run.rounds`` its step count. As in the authors' code, one SGD
optimiser holds every parameter, the whole embedding table included (its weight decay and momentum move the
embeddings of clients not sampled in a step too).

pFedHN-PC: the hypernetwork generates all but the target's last Linear layer; each client keeps that layer as its
personal classifier (trained in the same inner steps by its own optimiser whose momentum persists).

Embeddings belong to nodes: a node gets the next free row the first time the server sees it (at round 1 every
available node, in node-id order); more nodes than ``data.num_clients`` rows are refused.

Evaluation: the server sends each sampled node its current theta_i; the client evaluates it (pFedHN-PC: with its own
last layer) on its own test split and the server test set; ``accuracy`` = the clients' mean on the server test set and
``personal_accuracy_*`` as for every personalised strategy.

The arrays Flower carries between rounds (``aggregate_train``'s result) are the hypernetwork's state, embeddings
included (never sent to clients); ``configure_train`` loads arrays it did not produce itself (a resumed run restores
phi and every v_i; the optimiser's momentum restarts). Registered as ``pfedhn`` and ``pfedhn-pc``; the client side is
``clients/pfedhn.py``. Every privacy mechanism is refused (ConfigError on ``privacy.mechanism``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedkd import keys
from fedkd.config import ConfigError, register_section
from fedkd.hypernet import PFedHNHypernet, check_state, classifier_names, pfedhn_embed_dim, pfedhn_step, target_shapes
from fedkd.training import resolve_device

from . import STRATEGIES
from .base import StrategyEntry, StrategySpec
from .fedavg import sampling
from .hyperfl import HyperStrategy, check_hyper_combination, target_model
from .personal import mean_metrics

VARIANTS = ("pfedhn", "pfedhn-pc")


@register_section("pfedhn")
@dataclass(frozen=True)
class PFedHNConfig:
    """pFedHN's hyperparameters, the defaults of the authors' code (experiments/pfedhn*/trainer.py)."""

    embed_dim: int = 0  # 0 = the authors' automatic size int(1 + data.num_clients / 4)
    hidden_dim: int = 100
    n_hidden: int = 3  # hidden Linear(100, 100) layers after the first
    inner_steps: int = 50  # client: SGD steps per round, one fresh random batch each
    inner_lr: float = 5e-3
    inner_momentum: float = 0.9
    inner_weight_decay: float = 5e-5
    inner_clip: float = 50.0
    batch_size: int = 64
    lr: float | None = None  # server SGD; None = 1e-2 for pfedhn, 5e-2 for pfedhn-pc
    embed_lr: float | None = None  # None = lr
    momentum: float = 0.9
    weight_decay: float = 1e-3
    clip: float = 50.0  # grad-norm clip of the server's VJP gradient

    def server_lr(self, variant: str) -> float:
        if self.lr is not None:
            return self.lr
        return 5e-2 if variant == "pfedhn-pc" else 1e-2

    def embedding_size(self, num_clients: int) -> int:
        return self.embed_dim or pfedhn_embed_dim(num_clients)

    def validate(self, cfg) -> None:
        positive = ("hidden_dim", "inner_steps", "inner_lr", "inner_clip", "batch_size", "clip")
        for k in positive:
            v = getattr(self, k)
            if not (v > 0 and np.isfinite(v)):
                raise ConfigError(f"pfedhn.{k}", f"must be > 0 (got {v})")
        for k in ("embed_dim", "n_hidden", "inner_weight_decay", "weight_decay"):
            v = getattr(self, k)
            if not (v >= 0 and np.isfinite(v)):
                raise ConfigError(f"pfedhn.{k}", f"must be >= 0 (got {v})")
        for k in ("inner_momentum", "momentum"):
            v = getattr(self, k)
            if not 0 <= v < 1:
                raise ConfigError(f"pfedhn.{k}", f"must be in [0, 1) (got {v})")
        for k in ("lr", "embed_lr"):
            v = getattr(self, k)
            if v is not None and not (v > 0 and np.isfinite(v)):
                raise ConfigError(f"pfedhn.{k}", f"must be > 0 (got {v})")
        if cfg.strategy.name in VARIANTS:
            check_hyper_combination(cfg, cfg.strategy.name)


def generated_shapes(target: torch.nn.Module, personal_head: bool) -> dict[str, torch.Size]:
    """What the server generates: every target parameter (pFedHN) or all but the last Linear (pFedHN-PC)."""
    return target_shapes(target, exclude=classifier_names(target) if personal_head else ())


class PFedHN(HyperStrategy):
    """The server of pFedHN / pFedHN-PC: generates each sampled client's model, updates phi and v_i by the VJP."""

    def __init__(self, hnet: PFedHNHypernet, hp: PFedHNConfig, variant: str, device="cpu", **kwargs) -> None:
        super().__init__(**kwargs)
        self.device = torch.device(device)
        self.hnet = hnet.to(self.device)
        self.hp = hp
        self.variant = variant
        self.optimizer = hnet.optimizer(hp.server_lr(variant), hp.momentum, hp.weight_decay, hp.embed_lr)
        self.rows: dict[int, int] = {}  # node id -> embedding row
        self.generator_copy: PFedHNHypernet | None = None  # the hypernetwork that generated this round's thetas
        self.sent: dict[int, int] = {}  # node id -> row, of this round's train messages
        self._state = self.state()

    # -- server state
    def state(self) -> ArrayRecord:
        """The hypernetwork with every embedding (what Flower carries between rounds; never sent to clients)."""
        return ArrayRecord({k: v.detach().cpu() for k, v in self.hnet.state_dict().items()})

    def load(self, arrays: ArrayRecord) -> None:
        if arrays is self._state or not len(arrays):
            return
        self.hnet.load_state_dict({k: v.to(self.device) for k, v in arrays.to_torch_state_dict().items()})
        self._state = arrays

    def row(self, node_id: int) -> int:
        if node_id not in self.rows:
            if len(self.rows) >= self.hnet.embeddings.num_embeddings:
                raise RuntimeError(f"node {node_id}: all {self.hnet.embeddings.num_embeddings} embeddings (data.num_clients) are taken")
            self.rows[node_id] = len(self.rows)
        return self.rows[node_id]

    @torch.no_grad()
    def theta(self, node_id: int) -> ArrayRecord:
        """Node ``node_id``'s generated model theta_i (CPU, detached)."""
        return ArrayRecord({k: v.detach().cpu() for k, v in self.hnet(self.row(node_id)).items()})

    # -- Strategy API
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.load(arrays)
        if not self.rows:
            for n in sorted(grid.get_node_ids()):
                self.row(n)
        nodes, conf = self.sample(server_round, config, grid)
        self.generator_copy = copy.deepcopy(self.hnet)
        self.sent = {n: self.row(n) for n in nodes}
        return [self.message(n, conf, self.theta(n)) for n in nodes]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = sorted(self.valid(replies), key=lambda r: r.metadata.src_node_id)
        shapes = self.hnet.shapes
        accepted, norms = [], []
        for r in valid:
            node = r.metadata.src_node_id
            recs = r.content.array_records
            reason = None if node in self.sent else "was not sent a model this round"
            if reason is None and set(recs) != {self.arrayrecord_key}:
                reason = f"unexpected records {sorted(recs)}"
            delta = recs[self.arrayrecord_key].to_torch_state_dict() if reason is None else None
            if reason is None:
                reason = check_state(delta, shapes)
            if reason is not None:
                self.rejected.setdefault(server_round, []).append(f"node {node}: {reason}")
                continue
            norms.append(pfedhn_step(self.hnet, self.optimizer, self.sent[node], delta, self.hp.clip, jacobian_at=self.generator_copy))
            accepted.append(r)
        self.generator_copy = None
        stats = {keys.HYPER_REJECTED: len(valid) - len(accepted)}
        if norms:
            stats[keys.PFEDHN_GRAD_NORM] = float(np.mean(norms))
        self.train_stats[server_round] = stats
        self._state = self.state()
        return self._state, MetricRecord({**dict(mean_metrics(accepted) or {}), **stats})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.load(arrays)
        probe = list(FedAvg.configure_evaluate(self, server_round, ArrayRecord(), ConfigRecord(dict(config)), grid))
        conf = ConfigRecord({**dict(config), keys.SERVER_ROUND: server_round})
        return [self.message(m.metadata.dst_node_id, conf, self.theta(m.metadata.dst_node_id), MessageType.EVALUATE) for m in probe]


def build_pfedhn(cfg, fed, variant: str = "pfedhn") -> StrategySpec:
    check_hyper_combination(cfg, variant)
    hp = cfg.pfedhn
    target = target_model(cfg, fed)
    try:
        shapes = generated_shapes(target, variant == "pfedhn-pc")
    except ValueError as e:
        raise ConfigError("model.name", f"{cfg.model.name[0]}: {e}") from None
    torch.manual_seed(cfg.run.seed)
    hnet = PFedHNHypernet(cfg.data.num_clients, shapes, hp.embedding_size(cfg.data.num_clients), hp.hidden_dim, hp.n_hidden)
    strategy = PFedHN(hnet, hp, variant, resolve_device(cfg.run.device), **sampling(cfg))
    return StrategySpec(strategy, strategy._state, strategy.evaluate_fn, client=variant)


def build_pfedhn_pc(cfg, fed) -> StrategySpec:
    return build_pfedhn(cfg, fed, "pfedhn-pc")


ENTRY = StrategyEntry(build_pfedhn, description="pFedHN (Shamsian et al. 2021): server hypernetwork, VJP update")
ENTRY_PC = StrategyEntry(build_pfedhn_pc, description="pFedHN-PC: pFedHN with a personal classifier per client")
STRATEGIES.add("pfedhn", ENTRY)
STRATEGIES.add("pfedhn-pc", ENTRY_PC)
