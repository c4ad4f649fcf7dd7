"""Deep Leakage from Gradients (Zhu et al., NeurIPS 2019).

Dummy images x' ~ N(0, 1) and dummy soft labels (logits, softmax'ed) are optimised jointly with
L-BFGS (lr 1, strong-Wolfe line search) so that the client's replayed gradient (or multi-step update) on them matches the
observed one in squared Euclidean distance; 300 L-BFGS iterations (PyTorch's default of at most
20 function evaluations each). The guessed label is the argmax of the soft label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import ATTACKS, AttackEntry
from .gradients import Reconstruction, Replay, euclidean
from .observation import Observation


@dataclass(frozen=True)
class DLGParams:
    steps: int = 300  # L-BFGS iterations
    restarts: int = 1
    lr: float = 1.0
    # PyTorch's strong-Wolfe line search: without one, L-BFGS at lr 1 diverged on some 8x8 digits
    # (fedkd's deviation from the papers' plain L-BFGS; set None for the original)
    line_search: str | None = "strong_wolfe"


def lbfgs(replay: Replay, x: torch.Tensor, y_logits: torch.Tensor | None, y_fixed: torch.Tensor | None, steps: int, lr: float, line_search: str | None = None) -> float:
    """Minimise DLG's distance over ``x`` (and ``y_logits`` when given) in place; returns the final loss."""
    params = [x] + ([y_logits] if y_logits is not None else [])
    opt = torch.optim.LBFGS(params, lr=lr, line_search_fn=line_search)
    last = [math.inf]

    def closure():
        opt.zero_grad()
        y = torch.softmax(y_logits, -1) if y_logits is not None else y_fixed
        loss = euclidean(replay(x, y), replay.target)
        loss.backward()
        last[0] = float(loss.detach())
        return loss

    for _ in range(steps):
        opt.step(closure)
        if not math.isfinite(last[0]) or last[0] < 1e-12:
            break
    return last[0]


def dlg(obs: Observation, params: DLGParams, device="cpu", seed: int = 0) -> Reconstruction:
    obs.require("dlg")
    replay = Replay(obs, device)
    n, shape, k = replay.num_examples, obs.input_shape, obs.num_classes
    g = torch.Generator().manual_seed(seed)
    best, losses = None, []
    for _ in range(params.restarts):
        x = torch.randn((n, *shape), generator=g).to(replay.device).requires_grad_(True)  # (N, C, H, W)
        y = torch.randn((n, k), generator=g).to(replay.device).requires_grad_(True)  # (N, K) label logits
        loss = lbfgs(replay, x, y, None, params.steps, params.lr, params.line_search)
        losses.append(loss)
        if best is None or (math.isfinite(loss) and loss < best[0]) or not math.isfinite(best[0]):
            best = (loss, x.detach(), y.detach().argmax(-1))
    return Reconstruction(best[1].clamp(0, 1).cpu(), best[2].cpu(), best[0], losses)


ATTACKS.add("dlg", AttackEntry(dlg, DLGParams, "Deep Leakage from Gradients: L-BFGS, Euclidean, joint soft labels"))
