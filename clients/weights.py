"""The weight-sharing client of FedAvg and FedProx: train the received model, send it back.

Honours ``proximal-mu`` in the message config (FedProx) and ``privacy.mechanism = "dp-sgd"``
(Opacus DP-SGD, record-level, with an RDP accountant that composes over this client's rounds), both
through the one training loop (``fedkd.training.train``) that every client logic uses; its
randomness (shuffles, dropout, sampling, noise) is private (``ClientEnv.noise_seed``).
"""

from __future__ import annotations

import json

from flwr.app import ArrayRecord, ConfigRecord, Context, Message

from fedkd import keys
from fedkd.models import model_from_config
from fedkd.training import DPSGD, calibrate_noise, dp_steps, evaluate, train

from . import CLIENTS
from .base import ClientEnv, ClientLogic, reply


def dp_settings(env: ClientEnv, context: Context, run_epochs: int | None = None) -> DPSGD | None:
    """This client's DP-SGD settings; a target epsilon is calibrated once over all the epochs the
    client may train on its private records in the run (``run_epochs``; default: every round's
    ``train.local_epochs``, i.e. as if sampled every round)."""
    p = env.cfg.privacy
    if p.mechanism != "dp-sgd":
        return None
    sigma = p.noise_multiplier
    if sigma is None:
        epochs = run_epochs if run_epochs is not None else env.cfg.train.local_epochs * env.cfg.run.rounds
        q, steps = dp_steps(len(env.data.train), env.cfg.train.batch_size, epochs)
        sigma = calibrate_noise(p.target_epsilon, p.delta, q, steps)
    return DPSGD(noise_multiplier=sigma, max_grad_norm=p.max_grad_norm, delta=p.delta)


def train_private(model, data, env: ClientEnv, context: Context, *, epochs: int, dp: DPSGD | None, salt: int = 0, **kw):
    """:func:`fedkd.training.train` with the experiment's optimiser settings, private randomness, and
    DP-SGD's accountant history loaded from and saved to ``context.state`` (composed over calls)."""
    t = env.cfg.train
    res = train(
        model, data, epochs=epochs, batch_size=kw.pop("batch_size", t.batch_size), lr=t.lr, momentum=t.momentum,
        weight_decay=kw.pop("weight_decay", t.weight_decay), device=env.device, seed=env.noise_seed(salt),
        dp=dp, dp_history=load_dp_history(context) if dp else None, **kw,
    )
    if dp is not None:
        save_dp_history(context, res.dp_history)
    return res


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
        dp = dp_settings(env, context)
        res = train_private(
            model, env.data.train, env, context, epochs=env.cfg.train.local_epochs, dp=dp,
            proximal_mu=float(msg.content[keys.CONFIG].get(keys.PROXIMAL_MU, 0.0)),
        )
        metrics = {keys.NUM_EXAMPLES: res.num_examples, keys.LOSS: res.loss, keys.ACCURACY: res.accuracy}
        if dp is not None:
            metrics[keys.EPSILON] = float(res.epsilon)
        return reply(msg, env, metrics, **{keys.ARRAYS: ArrayRecord(model.cpu().state_dict())})

    def evaluate(self, msg: Message, context: Context, env: ClientEnv) -> Message:
        model = self.model(msg, env)
        loss, acc = evaluate(model, env.data.test, env.device)
        return reply(msg, env, {keys.NUM_EXAMPLES: len(env.data.test), keys.LOSS: loss, keys.ACCURACY: acc})
