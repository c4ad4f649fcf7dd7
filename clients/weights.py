"""The weight-sharing client of FedAvg and FedProx: train the received model, send it back.

Honours ``proximal-mu`` in the message config (FedProx) and ``privacy.mechanism = "dp-sgd"``
(Opacus DP-SGD, record-level, with an RDP accountant that composes over this client's rounds).
"""

from __future__ import annotations

import json

from flwr.app import ArrayRecord, ConfigRecord, Context, Message

from fedkd import keys
from fedkd.models import model_from_config
from fedkd.training import DPSGD, calibrate_noise, dp_steps, evaluate, train

from . import CLIENTS
from .base import ClientEnv, ClientLogic, reply


def dp_settings(env: ClientEnv, context: Context) -> DPSGD | None:
    """This client's DP-SGD settings; a target epsilon is calibrated once over all rounds."""
    p = env.cfg.privacy
    if p.mechanism != "dp-sgd":
        return None
    sigma = p.noise_multiplier
    if sigma is None:
        q, steps = dp_steps(len(env.data.train), env.cfg.train.batch_size, env.cfg.train.local_epochs)
        sigma = calibrate_noise(p.target_epsilon, p.delta, q, steps * env.cfg.run.rounds)
    return DPSGD(noise_multiplier=sigma, max_grad_norm=p.max_grad_norm, delta=p.delta)


def load_dp_history(context: Context) -> list:
    rec = context.state.get(keys.STATE_DP_HISTORY)
    return json.loads(str(rec["history"])) if rec is not None else []


def save_dp_history(context: Context, history: list) -> None:
    context.state[keys.STATE_DP_HISTORY] = ConfigRecord({"history": json.dumps(history)})


@CLIENTS.register("weights")
class WeightsClient(ClientLogic):
    def model(self, msg: Message, env: ClientEnv):
        fed = env.federation
        model = model_from_config(env.cfg.model, env.partition_id, fed.input_shape, fed.num_classes)
        model.load_state_dict(msg.content[keys.ARRAYS].to_torch_state_dict())
        return model

    def train(self, msg: Message, context: Context, env: ClientEnv) -> Message:
        model = self.model(msg, env)
        t = env.cfg.train
        dp = dp_settings(env, context)
        res = train(
            model, env.data.train, epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr,
            momentum=t.momentum, weight_decay=t.weight_decay, device=env.device, seed=env.seed(),
            proximal_mu=float(msg.content[keys.CONFIG].get(keys.PROXIMAL_MU, 0.0)),
            dp=dp, dp_history=load_dp_history(context) if dp else None,
        )
        metrics = {keys.NUM_EXAMPLES: res.num_examples, keys.LOSS: res.loss, keys.ACCURACY: res.accuracy}
        if dp is not None:
            save_dp_history(context, res.dp_history)
            metrics[keys.EPSILON] = float(res.epsilon)
        return reply(msg, env, metrics, **{keys.ARRAYS: ArrayRecord(model.cpu().state_dict())})

    def evaluate(self, msg: Message, context: Context, env: ClientEnv) -> Message:
        model = self.model(msg, env)
        loss, acc = evaluate(model, env.data.test, env.device)
        return reply(msg, env, {keys.NUM_EXAMPLES: len(env.data.test), keys.LOSS: loss, keys.ACCURACY: acc})
