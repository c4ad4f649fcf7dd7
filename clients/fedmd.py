"""FedMD client (Li & Wang 2019): transfer-learning start, then per round score / digest / revisit.

See ``strategies/fedmd.py`` for the protocol. The client works on ``fedmd_data``'s federation (the
public split held out before partitioning), so its private data never contains public samples.
"""

from __future__ import annotations

import dataclasses

import torch
from flwr.app import Array, ArrayRecord, Context, Message
from torch import nn
from torch.nn import functional as F

from fedkd import keys
from fedkd.strategies.fedmd import DIGEST, SCORE, alignment_indices, fedmd_data
from fedkd.training import predict_logits, train

from . import CLIENTS
from .base import ClientEnv, reply
from .personal import PersonalClient, init_seed, personal_metrics


def digest(model: nn.Module, x, consensus, *, epochs: int, batch_size: int, lr: float, momentum: float, device, seed: int) -> float:
    """Train ``model`` so its logits on ``x`` (A, C, H, W) approach ``consensus`` (A, K): mean L1 loss."""
    device = torch.device(device)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    xt, ct = torch.as_tensor(x).to(device), torch.as_tensor(consensus).to(device)
    g = torch.Generator().manual_seed(seed)
    total, seen = 0.0, 0
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g).to(device)
        for start in range(0, len(xt), batch_size):
            idx = perm[start : start + batch_size]
            loss = F.l1_loss(model(xt[idx]), ct[idx])  # (B, K) vs (B, K)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
    return total / max(seen, 1)


@CLIENTS.register("fedmd")
class FedMDClient(PersonalClient):
    def prepare(self, env: ClientEnv) -> ClientEnv:
        fed, self.public = fedmd_data(env.cfg)
        return dataclasses.replace(env, federation=fed)

    def _fit(self, model, data, epochs: int, env: ClientEnv, seed: int):
        t = env.cfg.train
        return train(model, data, epochs=epochs, batch_size=t.batch_size, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, device=env.device, seed=seed)

    def new_model(self, env: ClientEnv, context: Context) -> nn.Module:
        """Transfer-learning start: public data first, then private data."""
        model = super().new_model(env, context)
        hp = env.cfg.fedmd
        if hp.public_epochs:
            self._fit(model, self.public, hp.public_epochs, env, init_seed(env) + 1)
        if hp.private_epochs:
            self._fit(model, env.data.train, hp.private_epochs, env, init_seed(env) + 2)
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
                    lr=t.lr, momentum=t.momentum, device=env.device, seed=env.seed(1))
        res = self._fit(model, env.data.train, hp.revisit_epochs, env, env.seed(2)) if hp.revisit_epochs else None
        self.save(context, model)
        metrics = {keys.NUM_EXAMPLES: len(env.data.train), "digest_loss": dl}
        if res is not None:
            metrics.update({keys.LOSS: res.loss, keys.ACCURACY: res.accuracy})
        return reply(msg, env, metrics)
