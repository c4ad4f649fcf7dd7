"""What a strategy builder returns, and helpers shared by weight-averaging strategies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Strategy

from fedkd import keys
from fedkd.data import Federation
from fedkd.models import model_from_config
from fedkd.training import evaluate, resolve_device

EvaluateFn = Callable[[int, ArrayRecord], "MetricRecord | None"]


@dataclass
class StrategySpec:
    """A ready strategy, the arrays it starts from, and how the server evaluates its output."""

    strategy: Strategy
    initial_arrays: ArrayRecord
    evaluate_fn: EvaluateFn | None = None
    client: str = "weights"  # name in fedkd.clients.CLIENTS
    extra_config: dict | None = None  # more keys for the train/evaluate ConfigRecords


@dataclass(frozen=True)
class StrategyEntry:
    build: Callable[..., StrategySpec]
    heterogeneous: bool = False  # accepts clients with different architectures
    description: str = ""
    # privacy.mechanism values this strategy runs for real; any other is refused before the run starts
    mechanisms: tuple[str, ...] = ("none",)


def global_model(cfg, fed: Federation) -> torch.nn.Module:
    """The (single) architecture of a homogeneous federation, seeded by ``run.seed``."""
    torch.manual_seed(cfg.run.seed)
    return model_from_config(cfg.model, 0, fed.input_shape, fed.num_classes)


def central_evaluate_fn(cfg, fed: Federation) -> EvaluateFn:
    """Evaluate the global model on the server's test set."""
    model = global_model(cfg, fed)
    device = resolve_device(cfg.run.device)

    def fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(model, fed.server_test, device)
        return MetricRecord({keys.LOSS: loss, keys.ACCURACY: acc})

    return fn
