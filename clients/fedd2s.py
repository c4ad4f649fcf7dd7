"""The FedD2S client (Atapour et al. 2024, arXiv 2402.10846): a personal model that never leaves the client.

Each round (see strategies/fedd2s.py for the whole protocol and our reading of the paper):

1. Load this client's own model from ``context.state`` (first round: a fresh, seeded model).
2. Train it on private data with ``CE(y, f(x)) + beta * T^2 * KL(softmax(s/T) || softmax(f(x)/T))``
   where ``s`` (N, K) are the server's soft labels for this client's samples from the previous
   round (absent in round 1: plain CE).
3. Upload knowledge, no weights: the flattened representation after each *shared* layer
   ``features-<d>`` (N, dim_d), the model's logits (N, K) and the labels (N,). Shared layers are the
   model's cut points (after each activation block) minus the deepest ``drops`` ones
   (deep-to-shallow layer dropping; the server says how many are dropped this round).
4. Keep the model in ``context.state``.

Evaluation reports the personal model on its own test split (``accuracy``, ``loss``) and on the
server's global test set (``global_accuracy``, ``global_loss``).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message
from torch import nn

from fedkd import keys
from fedkd.models import model_from_config
from fedkd.training import evaluate, train

from . import CLIENTS
from .base import ClientEnv, ClientLogic, reply

_ACTS = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.MaxPool2d, nn.Dropout)
_OPS = (nn.Linear, nn.Conv2d, nn.Flatten)


def cut_points(model: nn.Sequential) -> list[int]:
    """Indices ``i`` after which ``model[: i + 1]`` ends a block (an activation/pool before the next op).

    mlp 64-64 -> 2 cuts (after each hidden ReLU); cnn -> 3 (two conv blocks, the FC 64); lenet -> 3.
    Depth d (1-based) is the representation after the d-th cut; the last layer (logits) is never a cut.
    """
    mods = list(model)
    return [i for i in range(len(mods) - 1) if isinstance(mods[i], _ACTS) and isinstance(mods[i + 1], _OPS)]


def shared_depths(num_cuts: int, drops: int, keep_layers: int) -> list[int]:
    """Depths (1-based) that share knowledge after dropping the ``drops`` deepest, keeping the shallowest ``keep_layers``."""
    keep = max(min(keep_layers, num_cuts), num_cuts - max(drops, 0))
    return list(range(1, keep + 1))


def layer_drops(server_round: int, drop_every: int) -> int:
    """Deep-to-shallow schedule: one more deep layer is dropped every ``drop_every`` rounds (0 = never)."""
    return 0 if drop_every <= 0 else (server_round - 1) // drop_every


@torch.no_grad()
def representations(model: nn.Sequential, x: torch.Tensor, depths: list[int]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """({depth: (N, dim) flattened features}, (N, K) logits) in one forward pass."""
    cuts = cut_points(model)
    want = {cuts[d - 1]: d for d in depths}
    feats: dict[int, torch.Tensor] = {}
    h = x
    for i, layer in enumerate(model):
        h = layer(h)
        if i in want:
            feats[want[i]] = h.flatten(1)
    return feats, h


def kd_train(model: nn.Module, data, soft: torch.Tensor | None, *, epochs: int, batch_size: int, lr: float,
             momentum: float, weight_decay: float, beta: float, temperature: float, device, seed: int | None = None) -> tuple[float, float]:
    """CE + beta * T^2 KL(teacher || student) through the shared training loop (the teacher of each
    sample is its soft label, indexed by the sample's position). Returns (mean CE, accuracy)."""
    from fedkd.strategies.feddf import distill_kl

    terms = {}
    if soft is not None:
        terms["distill"] = lambda b: beta * distill_kl(b.out, soft[b.idx], temperature)
    res = train(model, data, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                weight_decay=weight_decay, device=device, seed=seed, loss_terms=terms)
    return res.loss, res.accuracy


@CLIENTS.register("fedd2s")
class FedD2SClient(ClientLogic):
    def own_model(self, context: Context, env: ClientEnv) -> nn.Sequential:
        fed = env.federation
        torch.manual_seed(env.cfg.run.seed * 10_007 + env.partition_id)
        model = model_from_config(env.cfg.model, env.partition_id, fed.input_shape, fed.num_classes)
        rec = context.state.get(keys.STATE_FEDD2S_MODEL)
        if rec is not None:
            model.load_state_dict(rec.to_torch_state_dict())
        return model.to(env.device)

    def train(self, msg: Message, context: Context, env: ClientEnv) -> Message:
        hp, t = env.cfg.fedd2s, env.cfg.train
        model = self.own_model(context, env)
        data = env.data.train
        x, y = torch.from_numpy(data.x).to(env.device), torch.from_numpy(data.y).to(env.device)
        soft = None
        if keys.FEDD2S_SOFT_LABELS in msg.content:
            soft = msg.content[keys.FEDD2S_SOFT_LABELS]["soft-labels"].numpy()
            if soft.shape != (len(y), env.federation.num_classes):
                raise ValueError(f"soft labels of shape {soft.shape} for {len(y)} samples")
            soft = torch.from_numpy(np.ascontiguousarray(soft)).float().to(env.device)
        loss, acc = kd_train(model, data, soft, epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr,
                             momentum=t.momentum, weight_decay=t.weight_decay, beta=hp.beta,
                             temperature=hp.temperature, device=env.device, seed=env.noise_seed())
        model.eval()
        drops = int(msg.content[keys.CONFIG].get(keys.FEDD2S_DROPS, 0))
        depths = shared_depths(len(cut_points(model)), drops, hp.keep_layers)
        feats, logits = representations(model, x, depths)
        knowledge = {f"features-{d}": Array(f.cpu().numpy()) for d, f in feats.items()}
        knowledge["logits"] = Array(logits.cpu().numpy())  # (N, K) float32
        knowledge["labels"] = Array(np.ascontiguousarray(data.y))  # (N,) int64
        context.state[keys.STATE_FEDD2S_MODEL] = ArrayRecord(model.cpu().state_dict())
        metrics = {keys.NUM_EXAMPLES: len(y), keys.LOSS: loss, keys.ACCURACY: acc, "shared_layers": len(depths)}
        return reply(msg, env, metrics, **{keys.FEDD2S_KNOWLEDGE: ArrayRecord(knowledge)})

    def evaluate(self, msg: Message, context: Context, env: ClientEnv) -> Message:
        model = self.own_model(context, env)
        loss, acc = evaluate(model, env.data.test, env.device)
        gloss, gacc = evaluate(model, env.federation.server_test, env.device)
        metrics = {keys.NUM_EXAMPLES: len(env.data.test), keys.LOSS: loss, keys.ACCURACY: acc,
                   keys.GLOBAL_ACCURACY: gacc, keys.GLOBAL_LOSS: gloss}
        return reply(msg, env, metrics)
