"""Membership scores for canaries (records or subjects) from every round's global model: the attacks
``fedkd audit`` runs. Inputs: a :class:`~fedkd.attacks.membership.RoundsObservation` and the
adversary's samples of each canary (the record itself, or fresh samples of a canary subject's
distribution) grouped by canary id. One score per canary, higher = more likely included.

- :func:`gradient_regression` (the default, the strongest we have for an adversary that sees every global
  model): the round's step regressed on all canaries' gradients together (below).
- :func:`gradient_alignment`: sum over rounds of the projection of the round's model change onto the canary's descent
  direction, <-grad L_c(theta_{r-1}), theta_r - theta_{r-1}> / ||grad L_c(theta_{r-1})||. An included
  canary's clipped gradient is part of every update it took part in; DP noise in the update is what hides
  it (the white-box attack of the DP-SGD auditing papers, Nasr et al. 2021, applied to federated rounds).
- :func:`loss_difference`: black-box, the canary's mean loss under the initial model minus under the
  final one (LOSS calibrated by the canary's own starting difficulty).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from .membership import MembershipError, RoundsObservation, cross_entropy, logits_of

ATTACKS = ("gradient-regression", "gradient-alignment", "loss-difference")


def _round_gradients(rounds: RoundsObservation, x, y, group, batch: int = 512):
    """For every round r >= 1: (mean gradient of each canary's samples at theta_{r-1}, (G, P) float64,
    the model change theta_r - theta_{r-1}, (P,))."""
    from torch.func import functional_call, grad, vmap

    if len(rounds.models) < 2:
        raise MembershipError("gradient attacks need the global models of at least two rounds")
    groups = int(np.max(group)) + 1
    xt, yt, gt = torch.as_tensor(np.asarray(x, np.float32)), torch.as_tensor(np.asarray(y, np.int64)), torch.as_tensor(np.asarray(group, np.int64))
    counts = torch.bincount(gt, minlength=groups).clamp(min=1).double()[:, None]
    prev = rounds.models[0]
    for nxt in rounds.models[1:]:
        model = prev.build_model()
        names = [n for n, _ in model.named_parameters()]
        params = {n: p.detach() for n, p in model.named_parameters()}
        buffers = {n: b.detach() for n, b in model.named_buffers()}
        step = torch.cat([(nxt.state[n].double() - prev.state[n].double()).flatten() for n in names])

        def loss(p, xi, yi):
            return F.cross_entropy(functional_call(model, (p, buffers), (xi[None],)), yi[None])

        per_group = torch.zeros(groups, len(step), dtype=torch.float64)
        for s in range(0, len(yt), batch):
            g = vmap(grad(loss), in_dims=(None, 0, 0))(params, xt[s : s + batch], yt[s : s + batch])
            per_group.index_add_(0, gt[s : s + batch], torch.cat([g[n].reshape(len(g[n]), -1) for n in names], 1).double())
        yield per_group / counts, step
        prev = nxt


def gradient_alignment(rounds: RoundsObservation, x: np.ndarray, y: np.ndarray, group: np.ndarray, center: bool = True) -> np.ndarray:
    """Scores (G,) for G = max(group) + 1 canaries: sum over rounds of the model change projected on
    each canary's descent direction. ``center``: minus the mean gradient of all canaries first (their
    common direction moves with every included canary and would drown each one's own signal)."""
    scores = 0.0
    for g, step in _round_gradients(rounds, x, y, group):
        if center:
            g = g - g.mean(0, keepdim=True)
        scores = scores + (-(g @ step) / g.norm(dim=1).clamp(min=1e-12))
    return np.asarray(scores)


def gradient_regression(rounds: RoundsObservation, x: np.ndarray, y: np.ndarray, group: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """Scores (G,): per round, regress the descent step -(theta_r - theta_{r-1}) on all canaries' unit
    gradients at once (ridge ``ridge`` x their mean squared norm) and sum each canary's coefficient over
    rounds. An included canary's clipped gradient is one of the terms of the step, an excluded one's is
    not; fitting all of them together removes the cross-talk that a one-at-a-time projection
    (:func:`gradient_alignment`) suffers when canaries' gradients overlap. Needs more parameters than
    canaries to separate them fully (fewer still works, with more ridge)."""
    scores = 0.0
    for g, step in _round_gradients(rounds, x, y, group):
        u = g / g.norm(dim=1, keepdim=True).clamp(min=1e-12)  # (G, P)
        gram = u @ u.T
        lam = ridge * float(torch.diagonal(gram).mean())
        b = torch.linalg.solve(gram + lam * torch.eye(len(u), dtype=gram.dtype), u @ (-step))
        scores = scores + b
    return np.asarray(scores)


def loss_difference(rounds: RoundsObservation, x: np.ndarray, y: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Scores (G,): mean loss under the first recorded model minus under the last, per canary."""
    groups = int(np.max(group)) + 1
    first = cross_entropy(logits_of(rounds.models[0], x), y)
    last = cross_entropy(logits_of(rounds.models[-1], x), y)
    g = np.asarray(group)
    return np.bincount(g, weights=first - last, minlength=groups) / np.maximum(np.bincount(g, minlength=groups), 1)


def canary_scores(attack: str, rounds: RoundsObservation, x, y, group) -> np.ndarray:
    if attack == "gradient-regression":
        return gradient_regression(rounds, x, y, group)
    if attack == "gradient-alignment":
        return gradient_alignment(rounds, x, y, group)
    if attack == "loss-difference":
        return loss_difference(rounds, x, y, group)
    raise MembershipError(f"unknown canary attack {attack!r}; valid: {', '.join(ATTACKS)}")
