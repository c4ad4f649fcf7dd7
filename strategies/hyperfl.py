"""HyperFL (Guo et al., AAAI 2025, arXiv 2412.07187; code Pengxin-Guo/HyperFL): only a hypernetwork travels.

Each client holds a private embedding v_i, the hypernetwork h(.; phi) and a private classifier head; the hypernetwork
generates the client's feature extractor theta_i = h(v_i; phi) (``fedkd/hypernet.py``: the body of ``model.name``,
the paper's ``hyperfl-cnn`` for its experiments). Per round:

1. The server sends the aggregated hypernetwork phi to the sampled clients (FedAvg's ``configure_train``).
2. Each client trains its head for ``hyperfl.head_epochs`` on the generated extractor, then the hypernetwork and its
   embedding for ``hyperfl.hnet_epochs`` through the generated weights (grad-norm clip 50), and returns phi_i only.
3. The server averages the returned hypernetworks weighted by the clients' training-set sizes (FedAvg over phi).

Replies whose arrays are not exactly the hypernetwork's tensors (a leaked embedding or head, a wrong shape, NaN) are
refused and counted in the round's ``hyper_rejected`` train metric; the rest are averaged.

Evaluation: there is no global model. The evaluate message carries the aggregated hypernetwork; each client generates
its extractor with its own embedding, adds its own head and reports ``accuracy``/``loss`` on its own test split and
``global_accuracy``/``global_loss`` on the server test set; ``PersonalStrategy`` turns those into
``personal_accuracy_*`` and ``accuracy`` = the clients' mean on the server test set (as for every personalised strategy).

Registered as ``hyperfl``; the client side is ``clients/hyperfl.py``. Every privacy mechanism is refused (ConfigError on
``privacy.mechanism``): none of fedkd's accountants covers a hypernetwork upload, and running without it would be silent.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedkd import keys
from fedkd.config import ConfigError, register_section
from fedkd.hypernet import HyperFLHypernet, check_state, classifier_names, target_shapes
from fedkd.models import model_from_config

from . import STRATEGIES
from .base import StrategyEntry, StrategySpec
from .fedavg import sampling
from .personal import PersonalStrategy


@register_section("hyperfl")
@dataclass(frozen=True)
class HyperFLConfig:
    """HyperFL's hyperparameters, the defaults of the authors' code (cnn/options.py, cnn/methods/hyperfl.py)."""

    embed_dim: int = 64  # private client embedding
    hidden_dim: int = 128  # hypernetwork hidden layer
    head_epochs: int = 1  # stage 1: the classifier head only
    head_lr: float = 0.1
    head_momentum: float = 0.5
    head_weight_decay: float = 5e-4
    hnet_epochs: int = 5  # stage 2: hypernetwork + embedding through the generated weights
    hnet_lr: float = 0.02
    hnet_momentum: float = 0.5
    hnet_weight_decay: float = 5e-4
    clip: float = 50.0  # grad-norm clip of stage 2 (hypernetwork and embedding separately)
    batch_size: int = 50

    def validate(self, cfg) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name.endswith("momentum"):
                ok, need = 0 <= v < 1, "in [0, 1)"
            elif f.name.endswith("weight_decay") or f.name.endswith("epochs"):
                ok, need = v >= 0, ">= 0"
            else:
                ok, need = v > 0, "> 0"
            if not (ok and v == v and abs(v) != float("inf")):
                raise ConfigError(f"hyperfl.{f.name}", f"must be {need} (got {v})")
        if self.head_epochs + self.hnet_epochs < 1:
            raise ConfigError("hyperfl.hnet_epochs", "hyperfl.head_epochs and hyperfl.hnet_epochs are both 0: nothing would train")
        if cfg.strategy.name == "hyperfl":
            check_hyper_combination(cfg, "hyperfl")


def check_hyper_combination(cfg, name: str) -> None:
    """Refuse what a hypernetwork strategy cannot honour (one architecture; no privacy mechanism yet)."""
    if len(set(cfg.model.name)) > 1:
        raise ConfigError("model.name", f"{name} generates one architecture (got {list(cfg.model.name)})")
    if cfg.privacy.mechanism != "none":
        raise ConfigError("privacy.mechanism", f"{name} supports no privacy mechanism yet (got {cfg.privacy.mechanism!r})")


def target_model(cfg, fed) -> torch.nn.Module:
    """The target architecture (``model.name``) whose body the hypernetwork generates."""
    try:
        return model_from_config(cfg.model, 0, fed.input_shape, fed.num_classes)
    except ValueError as e:
        raise ConfigError("model.name", str(e)) from None


def hypernet_shapes(cfg, fed) -> dict[str, torch.Size]:
    """Name -> shape of the tensors HyperFL's hypernetwork generates (the target's body)."""
    target = target_model(cfg, fed)
    try:
        return target_shapes(target, exclude=classifier_names(target))
    except ValueError as e:
        raise ConfigError("model.name", f"{cfg.model.name[0]}: {e}") from None


def initial_hypernet(cfg, fed) -> HyperFLHypernet:
    """The hypernetwork every client starts from, seeded by ``run.seed``."""
    shapes = hypernet_shapes(cfg, fed)
    torch.manual_seed(cfg.run.seed)
    return HyperFLHypernet(shapes, cfg.hyperfl.embed_dim, cfg.hyperfl.hidden_dim)


class HyperStrategy(PersonalStrategy):
    """Personalised evaluation plus the server's own per-round training statistics (``train_stats``), which
    :meth:`evaluate_fn` reports next to the personal rows under node ``server`` (e.g. ``hyper_rejected``)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.train_stats: dict[int, dict[str, float]] = {}
        self.rejected: dict[int, list[str]] = {}  # round -> why replies were refused

    def evaluate_fn(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        stats = {**self.personal.get(server_round, {}), **self.train_stats.get(server_round, {})}
        return MetricRecord(stats) if stats else None


class HyperFL(HyperStrategy):
    """FedAvg over the hypernetwork's parameters; personalised evaluation (no global model)."""

    def __init__(self, hnet_shapes: dict[str, torch.Size], **kwargs) -> None:
        super().__init__(**kwargs)
        self.hnet_shapes = dict(hnet_shapes)  # state-dict name -> shape of every hypernetwork tensor

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return FedAvg.configure_train(self, server_round, arrays, config, grid)

    def conforming(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The error-free replies that carry exactly the hypernetwork (one ArrayRecord, its tensors, finite)."""
        out = []
        for r in self.valid(replies):
            recs = r.content.array_records
            reason = f"unexpected records {sorted(recs)}" if set(recs) != {self.arrayrecord_key} else None
            if reason is None:
                reason = check_state(recs[self.arrayrecord_key].to_torch_state_dict(), self.hnet_shapes)
            if reason is None and keys.NUM_EXAMPLES not in r.content.get(keys.METRICS, {}):
                reason = f"no {keys.NUM_EXAMPLES} in the reply's metrics"
            if reason is None:
                out.append(r)
            else:
                self.rejected.setdefault(server_round, []).append(f"node {r.metadata.src_node_id}: {reason}")
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        ok = self.conforming(server_round, replies)
        arrays, metrics = FedAvg.aggregate_train(self, server_round, ok) if ok else (None, None)
        self.train_stats[server_round] = {keys.HYPER_REJECTED: len(self.valid(replies)) - len(ok)}
        return arrays, MetricRecord({**dict(metrics or {}), **self.train_stats[server_round]})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return FedAvg.configure_evaluate(self, server_round, arrays, config, grid)  # the aggregated hypernetwork


def build_hyperfl(cfg, fed) -> StrategySpec:
    check_hyper_combination(cfg, "hyperfl")
    hnet = initial_hypernet(cfg, fed)
    strategy = HyperFL({k: v.shape for k, v in hnet.state_dict().items()}, **sampling(cfg))
    return StrategySpec(strategy, ArrayRecord(hnet.state_dict()), strategy.evaluate_fn, client="hyperfl")


ENTRY = StrategyEntry(build_hyperfl, description="HyperFL (Guo et al. 2025): only a hypernetwork travels, averaged")
STRATEGIES.add("hyperfl", ENTRY)
