"""Dropout Inversion Attack (Scheliga et al., AAAI 2023, arXiv 2208.06163).

The client trained with dropout, so its gradient came from masks the server never saw. DIA makes
the masks variables too: one mask per dropout layer per local step and image, initialised
Bernoulli(1 - p) and clipped to [0, 1]; loss = cosine distance + 1e-5 TV + 1e-4 * sum over layers
|(1 - mean(mask)) - p|; Adam lr 0.1 (signed for the images as in Inverting Gradients, plain for the
masks), images boxed to [0, 1], same lr schedule and batched restarts as ``ig``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ATTACKS, AttackEntry
from .gradients import Reconstruction, Replay, cosine_distance, infer_labels, one_hot, signed_adam, total_variation
from .observation import Observation, ObservationError


@dataclass(frozen=True)
class DIAParams:
    steps: int = 4800
    restarts: int = 4
    lr: float = 0.1
    tv: float = 1e-5
    mask_reg: float = 1e-4
    batched: bool = True


def dia(obs: Observation, params: DIAParams, device="cpu", seed: int = 0) -> Reconstruction:
    obs.require("dia")
    if obs.training.dropout <= 0:
        raise ObservationError(f"dia: the observed model {obs.model_name!r} trained without dropout (model.dropout = 0); use ig")
    replay = Replay(obs, device, masked_dropout=True)
    if not replay.dropout_layers:
        raise ObservationError(f"dia: model {obs.model_name!r} has no dropout layer")
    n = replay.num_examples
    labels = infer_labels(replay.target, n)
    y = one_hot(labels, obs.num_classes, replay.device)
    p_drop = list(replay.dropout_layers.values())

    def objective(x, masks):
        reg = sum((1.0 - m.mean() - p_drop[i % len(p_drop)]).abs() for i, m in enumerate(masks))
        return cosine_distance(replay(x, y, masks), replay.target) + params.tv * total_variation(x) + params.mask_reg * reg

    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((params.restarts, n, *obs.input_shape), generator=g).to(replay.device)
    masks0 = replay.init_masks(params.restarts, g)
    x, _, losses = signed_adam(objective, x0, masks0, steps=params.steps, lr=params.lr, batched=params.batched)
    best = int(torch.argmin(torch.nan_to_num(losses, nan=float("inf"))))
    return Reconstruction(x[best].detach().cpu(), labels, float(losses[best]), [float(v) for v in losses])


ATTACKS.add("dia", AttackEntry(dia, DIAParams, "Dropout Inversion Attack: dropout masks optimised with the data"))
