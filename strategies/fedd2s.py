"""FedD2S: personalised data-free federated knowledge distillation with deep-to-shallow layer dropping
(Atapour, Seyedmohammadi, Abouei, Mohammadi, Plataniotis 2024, arXiv 2402.10846).

Clients keep their own models (any architecture; ``model.name`` as a list) and never send weights.
No public or proxy data is used. Each round is a two-way (mutual) distillation:

1. client -> server: each sampled client trains its personal model with CE on its private data plus
   ``beta * T^2 * KL`` towards the server's soft labels for its samples (from its previous round; plain
   CE the first time), then uploads, for every *shared* layer d, the flattened representation after
   layer d of each training sample, plus its logits and labels (clients/fedd2s.py).
2. server: for every (architecture, depth) the server keeps a head model (MLP ``dim -> head_hidden ->
   K``) that turns that layer's representations into class scores. Each head is trained on all clients'
   uploads for its (architecture, depth) with ``CE(y, h(z)) + beta * T^2 * KL(softmax(client logits/T)
   || softmax(h(z)/T))`` (Adam), i.e. the server distils the clients' knowledge into its heads.
3. server -> client: the soft labels for a client's samples are the heads' logits on that client's
   representations, averaged over its shared depths; they are sent in the client's next train message.
4. deep-to-shallow layer dropping: all of a model's layers (cut points after each activation block)
   share knowledge at first; every ``drop_every`` rounds the deepest still-shared layer is dropped, down
   to the ``keep_layers`` shallowest. Dropped (deep) layers keep only local knowledge, which is what
   personalises the clients' models; shallow layers keep being aligned through the global heads.

Our reading (see strategies/README.md): we could consult only the paper's abstract and a summary of
its method ("head models convert intermediate representations into soft labels", "KL-divergence and
cross-entropy on both distillation directions", "local models progressively drop deeper layers from
participating"), not its full text or code. The head shape, the schedule's form (one layer per
``drop_every`` rounds), averaging the heads' logits over shared depths, and the defaults (T = 3,
beta = 1, Adam 1e-3, 2 server epochs, drop every 5 rounds) are our choices, not the paper's numbers.

Evaluation is personalised and shared with FedMD, FD and local-only (``strategies/personal.py``):
each client reports its own model on its own test split (``accuracy``) and on the server's test set
(``global_accuracy``); the server writes ``personal_accuracy_mean/min/max`` and
``personal_global_accuracy_mean/min/max`` under node "server" each round. summary.json's ``accuracy`` is
the clients' mean on the server test set and ``personal_accuracy`` their mean on their own test
splits, with the same meaning as for every other strategy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from torch import nn
from torch.nn import functional as F

from fedkd import keys
from fedkd.clients.fedd2s import layer_drops
from fedkd.config import _require, register_section
from fedkd.data import Federation
from fedkd.training import resolve_device

from . import STRATEGIES
from .base import StrategyEntry, StrategySpec
from .fedavg import sampling
from .feddf import distill_kl, model_name_of
from .personal import PersonalStrategy


@register_section("fedd2s")
@dataclass(frozen=True)
class FedD2SConfig:
    temperature: float = 3.0  # distillation temperature, both directions
    beta: float = 1.0  # weight of the distillation term, both directions
    drop_every: int = 5  # rounds between two deep-to-shallow layer drops (0 = never drop)
    keep_layers: int = 1  # the shallowest layers that are never dropped
    head_hidden: int = 128  # hidden width of the server's head models
    server_epochs: int = 2  # epochs over the round's uploads, per head
    server_lr: float = 1e-3  # Adam learning rate of the heads
    server_batch_size: int = 64

    def validate(self, cfg) -> None:
        _require(self.temperature > 0, "fedd2s.temperature", f"must be > 0 (got {self.temperature})")
        _require(self.beta >= 0, "fedd2s.beta", f"must be >= 0 (got {self.beta})")
        _require(self.drop_every >= 0, "fedd2s.drop_every", f"must be >= 0 (got {self.drop_every})")
        for key in ("keep_layers", "head_hidden", "server_epochs", "server_batch_size"):
            v = getattr(self, key)
            _require(v >= 1, f"fedd2s.{key}", f"must be >= 1 (got {v})")
        _require(self.server_lr > 0, "fedd2s.server_lr", f"must be > 0 (got {self.server_lr})")


def head_model(dim: int, hidden: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


class FedD2S(PersonalStrategy):
    """Mutual distillation through per-(architecture, depth) server heads; no weights cross the wire.

    Sampling and personalised evaluation come from :class:`PersonalStrategy` (``evaluate_fn``)."""

    def __init__(self, cfg, fed: Federation, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cfg, self.hp, self.num_classes = cfg, cfg.fedd2s, fed.num_classes
        self.device = resolve_device(cfg.run.device)
        self.heads: dict[tuple[str, int], nn.Module] = {}
        self.soft_labels: dict[int, np.ndarray] = {}  # node id -> (N, K) server logits for its samples

    def _messages(self, messages, extra_for_node) -> list[Message]:
        out = []
        for m in messages:
            content = RecordDict({self.configrecord_key: m.content[self.configrecord_key], **extra_for_node(m.metadata.dst_node_id)})
            out.append(Message(content=content, message_type=m.metadata.message_type, dst_node_id=m.metadata.dst_node_id))
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        config[keys.FEDD2S_DROPS] = layer_drops(server_round, self.hp.drop_every)

        def extra(node_id: int) -> dict:
            soft = self.soft_labels.get(node_id)
            return {} if soft is None else {keys.FEDD2S_SOFT_LABELS: ArrayRecord({"soft-labels": Array(soft)})}

        return self._messages(super().configure_train(server_round, arrays, config, grid), extra)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return self._messages(super().configure_evaluate(server_round, arrays, config, grid), lambda node_id: {})

    def _head(self, arch: str, depth: int, dim: int) -> nn.Module:
        key = (arch, depth)
        if key not in self.heads:
            torch.manual_seed(self.cfg.run.seed * 7919 + depth * 31 + sum(map(ord, arch)))
            self.heads[key] = head_model(dim, self.hp.head_hidden, self.num_classes).to(self.device)
        return self.heads[key]

    def _train_head(self, head: nn.Module, z: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor, seed: int) -> float:
        """Server-side distillation: CE on labels + beta * KL towards the clients' logits. Returns the last epoch's mean loss."""
        hp = self.hp
        opt = torch.optim.Adam(head.parameters(), lr=hp.server_lr)
        g = torch.Generator().manual_seed(seed)
        head.train()
        mean = 0.0
        for _ in range(hp.server_epochs):
            perm = torch.randperm(len(y), generator=g).to(self.device)
            total = 0.0
            for start in range(0, len(y), hp.server_batch_size):
                idx = perm[start : start + hp.server_batch_size]
                out = head(z[idx])  # (B, K)
                loss = F.cross_entropy(out, y[idx]) + hp.beta * distill_kl(out, teacher[idx], hp.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            mean = total / max(len(y), 1)
        head.eval()
        return mean

    def aggregate_train(self, server_round: int, replies):
        valid, _ = self._check_and_log_replies(list(replies), is_train=False, validate=False)
        valid = [r for r in valid if keys.FEDD2S_KNOWLEDGE in r.content]
        if not valid:
            return None, None
        dev = self.device
        uploads = []  # (node id, arch, {depth: (N, dim)}, logits (N, K), labels (N,))
        for r in valid:
            rec = r.content[keys.FEDD2S_KNOWLEDGE]
            feats = {int(k.split("-", 1)[1]): torch.from_numpy(rec[k].numpy()).float().to(dev) for k in rec.keys() if k.startswith("features-")}
            logits = torch.from_numpy(rec["logits"].numpy()).float().to(dev)
            labels = torch.from_numpy(rec["labels"].numpy()).long().to(dev)
            uploads.append((r.metadata.src_node_id, model_name_of(r), feats, logits, labels))
        # server-side distillation: one head per (architecture, depth), on every client's upload for it
        metrics: dict[str, float] = {}
        pairs = sorted({(arch, d) for _, arch, feats, _, _ in uploads for d in feats})
        for i, (arch, d) in enumerate(pairs):
            rows = [(feats[d], logits, labels) for _, a, feats, logits, labels in uploads if a == arch and d in feats]
            z, t, y = (torch.cat(c) for c in zip(*rows))  # (M, dim), (M, K), (M,)
            head = self._head(arch, d, z.shape[1])
            metrics[f"head_loss_{arch}_{d}"] = self._train_head(head, z, y, t, seed=self.cfg.run.seed * 1000 + server_round * 10 + i)
        # server -> client knowledge: the heads' logits on each client's representations, averaged over its shared depths
        with torch.no_grad():
            for node_id, arch, feats, _, _ in uploads:
                outs = [self.heads[(arch, d)](z) for d, z in sorted(feats.items())]  # each (N, K)
                self.soft_labels[node_id] = torch.stack(outs).mean(0).cpu().numpy().astype(np.float32)
        contents = [r.content for r in valid]
        metrics.update(dict(self.train_metrics_aggr_fn(contents, self.weighted_by_key)))
        return None, MetricRecord(metrics)


def build_fedd2s(cfg, fed: Federation) -> StrategySpec:
    strategy = FedD2S(cfg, fed, **sampling(cfg))
    return StrategySpec(strategy, ArrayRecord(), strategy.evaluate_fn, client="fedd2s")


STRATEGIES.add("fedd2s", StrategyEntry(build_fedd2s, heterogeneous=True,
                                       description="FedD2S: personalised data-free mutual distillation with deep-to-shallow layer dropping"))
