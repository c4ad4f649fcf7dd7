"""Local-only training: each client trains its own model on its private data and shares nothing.

The baseline every federated method has to beat (FedMD's "isolated training"). Its ``train`` reply
carries metrics only, so its bytes_up and bytes_down are 0.
"""

from __future__ import annotations

from flwr.app import Context, Message

from fedkd import keys
from fedkd.training import train

from . import CLIENTS
from .base import ClientEnv, reply
from .personal import PersonalClient


@CLIENTS.register("local")
class LocalClient(PersonalClient):
    def train(self, msg: Message, context: Context, env: ClientEnv) -> Message:
        model = self.own_model(env, context)
        t = env.cfg.train
        res = train(
            model, env.data.train, epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr,
            momentum=t.momentum, weight_decay=t.weight_decay, device=env.device, seed=env.seed(),
        )
        self.save(context, model)
        return reply(msg, env, {keys.NUM_EXAMPLES: res.num_examples, keys.LOSS: res.loss, keys.ACCURACY: res.accuracy, "resumed": self.resumed})
