"""Local-only training: each client trains its own model on its private data and shares nothing.

The baseline every federated method has to beat (FedMD's "isolated training"). Its ``train`` reply
carries metrics only (no arrays). Under ``privacy.mechanism = "dp-sgd"`` the own model is trained
with DP-SGD (the guarantee covers the model, e.g. if it is ever published).
"""

from __future__ import annotations

from flwr.app import Context, Message

from fedkd import keys

from . import CLIENTS
from .base import ClientEnv, reply
from .personal import PersonalClient
from .weights import dp_settings, train_private


@CLIENTS.register("local")
class LocalClient(PersonalClient):
    def train(self, msg: Message, context: Context, env: ClientEnv) -> Message:
        model = self.own_model(env, context)
        dp = dp_settings(env, context)
        res = train_private(model, env.data.train, env, context, epochs=env.cfg.train.local_epochs, dp=dp)
        self.save(context, model)
        metrics = {keys.NUM_EXAMPLES: res.num_examples, keys.LOSS: res.loss, keys.ACCURACY: res.accuracy, "resumed": self.resumed}
        if dp is not None:
            metrics[keys.EPSILON] = float(res.epsilon)
        return reply(msg, env, metrics)
