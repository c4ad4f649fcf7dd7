"""FedAvg (McMahan et al. 2017) and FedProx (Li et al. 2020): Flower's own strategies, configured.

FedProx adds ``proximal-mu`` to the train config; the ``weights`` client adds mu/2 ||w - w_global||^2.
"""

from __future__ import annotations

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg, FedProx

from fedkd import keys

from . import STRATEGIES
from .base import StrategyEntry, StrategySpec, central_evaluate_fn, global_model


# Every mechanism acts on weight-averaging strategies: dp-sgd in the client's training, rqm/pbm as a
# client mod + server decoder, gaussian as Flower's server-side clipping wrapper.
WEIGHT_MECHANISMS = ("none", "dp-sgd", "rqm", "pbm", "gaussian")


def sampling(cfg) -> dict:
    s = cfg.strategy
    return dict(
        fraction_train=s.fraction_train,
        fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1 if s.fraction_evaluate > 0 else 0,
        min_available_nodes=cfg.data.num_clients,
        arrayrecord_key=keys.ARRAYS,
        configrecord_key=keys.CONFIG,
    )


def build_fedavg(cfg, fed) -> StrategySpec:
    return StrategySpec(FedAvg(**sampling(cfg)), ArrayRecord(global_model(cfg, fed).state_dict()), central_evaluate_fn(cfg, fed))


def build_fedprox(cfg, fed) -> StrategySpec:
    strategy = FedProx(proximal_mu=cfg.strategy.proximal_mu, **sampling(cfg))
    return StrategySpec(strategy, ArrayRecord(global_model(cfg, fed).state_dict()), central_evaluate_fn(cfg, fed))


STRATEGIES.add("fedavg", StrategyEntry(build_fedavg, mechanisms=(*WEIGHT_MECHANISMS, "subject-dp"), description="Federated Averaging (Flower's FedAvg)"))
STRATEGIES.add("fedprox", StrategyEntry(build_fedprox, mechanisms=(*WEIGHT_MECHANISMS, "subject-dp"), description="FedProx (Flower's FedProx)"))
