"""FedMD client (Li & Wang 2019): transfer-learning start, then per round score / digest / revisit.

See ``strategies/fedmd.py`` for the protocol. Every training goes through the shared loop
(``fedkd.training.train``) with private randomness. Under ``privacy.mechanism = "dp-sgd"`` every
training on private records (the transfer-learning start's private epochs and each revisit) is
DP-SGD, composed in one accountant per client; the scores sent up are the DP model's outputs on
public data (post-processing), so the record-level guarantee covers them. The client works on ``fedmd_data``'s federation (the
public split held out before partitioning), so its private data never contains public samples.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message
from torch import nn
from torch.nn import functional as F

from fedkd import keys
from fedkd.strategies.fedmd import DIGEST, SCORE, alignment_indices, fedmd_data
from fedkd.data import ArrayDataset
from fedkd.training import history_epsilon, predict_logits, train

from . import CLIENTS
from .base import ClientEnv, reply
from .personal import PersonalClient, personal_metrics
from .weights import dp_settings, load_dp_history, train_private


def private_run_epochs(cfg) -> int:
    """Epochs over a FedMD client's private records in the whole run: its transfer-learning start
    plus a revisit every round (what DP-SGD's target epsilon is calibrated over)."""
    hp = cfg.fedmd
    return hp.private_epochs + cfg.run.rounds * hp.revisit_epochs


def digest(model: nn.Module, x, consensus, *, epochs: int, batch_size: int, lr: float, momentum: float, device, seed: int | None = None) -> float:
    """Train ``model`` so its logits on ``x`` (A, C, H, W) approach ``consensus`` (A, K): mean L1 loss
    (the shared training loop with the L1 term only; public data, so no DP is needed)."""
    xt = np.asarray(x, dtype=np.float32)
    ct = torch.as_tensor(np.asarray(consensus, dtype=np.float32)).to(torch.device(device))
    data = ArrayDataset(xt, np.zeros(len(xt), np.int64), int(ct.shape[1]))  # labels unused (ce_weight 0)
    res = train(model, data, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, device=device, seed=seed,
                loss_terms={"digest": lambda b: F.l1_loss(b.out, ct[b.idx])}, ce_weight=0.0)
    return res.extra["digest"]


@CLIENTS.register("fedmd")
class FedMDClient(PersonalClient):
    def prepare(self, env: ClientEnv) -> ClientEnv:
        fed, self.public = fedmd_data(env.cfg)
        return dataclasses.replace(env, federation=fed)

    def _fit(self, model, data, epochs: int, env: ClientEnv, context: Context, salt: int, private: bool):
        """Train on ``data``: with DP-SGD when the records are private and the experiment says dp-sgd
        (public data needs none); the accountant composes over the start and every revisit."""
        dp = dp_settings(env, context, private_run_epochs(env.cfg)) if private else None
        return train_private(model, data, env, context, epochs=epochs, dp=dp, salt=salt)

    def new_model(self, env: ClientEnv, context: Context) -> nn.Module:
        """Transfer-learning start: public data first, then private data."""
        model = super().new_model(env, context)
        hp = env.cfg.fedmd
        if hp.public_epochs:
            self._fit(model, self.public, hp.public_epochs, env, context, 1, private=False)
        if hp.private_epochs:
            self._fit(model, env.data.train, hp.private_epochs, env, context, 2, private=True)
        return model

    def train(self, msg: Message, context: Context, env: ClientEnv) -> Message:
        env = self.prepare(env)
        conf = msg.content[keys.CONFIG]
        hp = env.cfg.fedmd
        idx = alignment_indices(len(self.public), hp.alignment_size, int(conf[keys.ALIGNMENT_SEED]))
        x_align = self.public.x[idx]  # (A, C, H, W)
        model = self.own_model(env, context)
        phase = str(conf[keys.PHASE])
        if phase == SCORE:
            scores = predict_logits(model, x_align, env.device).numpy()  # (A, K) class scores
            pre = personal_metrics(model, env)
            metrics = {"alignment_size": len(idx), "pre_accuracy": pre[keys.ACCURACY], "pre_global_accuracy": pre[keys.GLOBAL_ACCURACY], "resumed": self.resumed}
            return reply(msg, env, metrics, **{keys.ARRAYS: ArrayRecord({keys.LOGITS: Array(scores)})})
        if phase != DIGEST:
            raise ValueError(f"unknown FedMD phase {phase!r}")
        consensus = msg.content[keys.ARRAYS][keys.LOGITS].numpy()  # (A, K)
        t = env.cfg.train
        dl = digest(model, x_align, consensus, epochs=hp.digest_epochs, batch_size=hp.digest_batch_size,
                    lr=t.lr, momentum=t.momentum, device=env.device, seed=env.noise_seed(1))
        res = self._fit(model, env.data.train, hp.revisit_epochs, env, context, 3, private=True) if hp.revisit_epochs else None
        self.save(context, model)
        metrics = {keys.NUM_EXAMPLES: len(env.data.train), "digest_loss": dl}
        if res is not None:
            metrics.update({keys.LOSS: res.loss, keys.ACCURACY: res.accuracy})
        if env.cfg.privacy.mechanism == "dp-sgd":
            history = load_dp_history(context)
            metrics[keys.EPSILON] = float(history_epsilon(history, env.cfg.privacy.delta)) if history else 0.0
        return reply(msg, env, metrics)
