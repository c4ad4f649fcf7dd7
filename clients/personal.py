"""Client side of strategies where each client keeps its own model (FedMD, FD, local-only, ...).

The model lives in ``Context.state[keys.STATE_MODEL]`` (an ArrayRecord) between rounds, which
persists in every runtime (fast simulation, Flower's simulation, deployment). Its architecture is the
client's own (``model.name`` by partition id), so federations may mix architectures.

:class:`PersonalClient.evaluate` evaluates the own model on the client's test split and on the
server's global test set; ``fedkd.strategies.personal`` turns those replies into mean/min/max rows.
"""

from __future__ import annotations

import zlib

import torch
from flwr.app import ArrayRecord, Context, Message
from torch import nn

from fedkd import keys
from fedkd.models import model_from_config
from fedkd.training import evaluate

from .base import ClientEnv, ClientLogic, reply


def personal_metrics(model: nn.Module, env: ClientEnv) -> dict:
    """The own model on the own test split (loss, accuracy) and on the global test set (global_*)."""
    loss, acc = evaluate(model, env.data.test, env.device)
    gloss, gacc = evaluate(model, env.federation.server_test, env.device)
    return {keys.NUM_EXAMPLES: len(env.data.test), keys.LOSS: loss, keys.ACCURACY: acc, keys.GLOBAL_LOSS: gloss, keys.GLOBAL_ACCURACY: gacc}


def init_seed(env: ClientEnv) -> int:
    """A per-client seed for the own model's initialisation (independent of the round)."""
    return zlib.crc32(f"init,{env.cfg.run.seed},{env.partition_id}".encode())


class PersonalClient(ClientLogic):
    """Keeps the client's own model in ``context.state``; subclasses implement ``train``."""

    def prepare(self, env: ClientEnv) -> ClientEnv:
        """Hook: the env this logic works in (FedMD swaps in the federation with its public split)."""
        return env

    def new_model(self, env: ClientEnv, context: Context) -> nn.Module:
        """Hook: the client's first model (FedMD overrides it with its transfer-learning start)."""
        torch.manual_seed(init_seed(env))
        fed = env.federation
        return model_from_config(env.cfg.model, env.partition_id, fed.input_shape, fed.num_classes)

    resumed = 0  # 1 once own_model found the model of an earlier round in Context.state

    def own_model(self, env: ClientEnv, context: Context) -> nn.Module:
        rec = context.state.get(keys.STATE_MODEL)
        self.resumed = int(rec is not None)
        if rec is None:
            model = self.new_model(env, context)
            self.save(context, model)
            return model
        fed = env.federation
        model = model_from_config(env.cfg.model, env.partition_id, fed.input_shape, fed.num_classes)
        model.load_state_dict(rec.to_torch_state_dict())
        return model.to(env.device)

    @staticmethod
    def save(context: Context, model: nn.Module) -> None:
        context.state[keys.STATE_MODEL] = ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})

    def evaluate(self, msg: Message, context: Context, env: ClientEnv) -> Message:
        env = self.prepare(env)
        model = self.own_model(env, context)
        return reply(msg, env, personal_metrics(model, env))
