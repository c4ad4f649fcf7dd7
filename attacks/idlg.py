"""Improved DLG (Zhao et al. 2020, arXiv 2001.02610).

First the label, analytically: with cross-entropy, the true class's row of the last layer's weight
gradient is the one whose sum is negative (argmin of the row sums; exact for one image, see
:func:`~fedkd.attacks.gradients.infer_labels` for batches). Then DLG with the label fixed: x' ~ N(0, 1),
L-BFGS (lr 1, 300 iterations) on the squared Euclidean gradient distance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import ATTACKS, AttackEntry
from .dlg import lbfgs
from .gradients import Reconstruction, Replay, infer_labels, one_hot
from .observation import Observation


@dataclass(frozen=True)
class IDLGParams:
    steps: int = 300
    restarts: int = 1
    lr: float = 1.0
    # PyTorch's strong-Wolfe line search: without one, L-BFGS at lr 1 diverged on some 8x8 digits
    # (fedkd's deviation from the papers' plain L-BFGS; set None for the original)
    line_search: str | None = "strong_wolfe"


def idlg_labels(obs: Observation, device="cpu") -> torch.Tensor:
    """iDLG's analytic labels from an observation alone."""
    obs.require("idlg")
    replay = Replay(obs, device)
    return infer_labels(replay.target, replay.num_examples)


def idlg(obs: Observation, params: IDLGParams, device="cpu", seed: int = 0) -> Reconstruction:
    obs.require("idlg")
    replay = Replay(obs, device)
    n, shape = replay.num_examples, obs.input_shape
    labels = infer_labels(replay.target, n)
    y = one_hot(labels, obs.num_classes, replay.device)
    g = torch.Generator().manual_seed(seed)
    best, losses = None, []
    for _ in range(params.restarts):
        x = torch.randn((n, *shape), generator=g).to(replay.device).requires_grad_(True)
        loss = lbfgs(replay, x, None, y, params.steps, params.lr, params.line_search)
        losses.append(loss)
        if best is None or (math.isfinite(loss) and loss < best[0]) or not math.isfinite(best[0]):
            best = (loss, x.detach())
    return Reconstruction(best[1].clamp(0, 1).cpu(), labels, best[0], losses)


ATTACKS.add("idlg", AttackEntry(idlg, IDLGParams, "iDLG: analytic label, then L-BFGS on the data"))
