"""Local training and evaluation in plain PyTorch (no Flower imports).

``train`` is the one local training loop of every client logic: SGD on cross-entropy plus named
extra loss terms (distillation), optionally with FedProx's proximal term, optionally as DP-SGD
through Opacus, on an :class:`~fedkd.data.ArrayDataset`. Its randomness is private (OS entropy)
unless a seed is given. DP-SGD keeps its RDP accountant's history outside the call,
so a client composes its privacy loss across rounds: pass the previous ``dp_history`` back in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedkd.data import ArrayDataset
from fedkd.privacy.entropy import private_global_rng, torch_generator


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``. An explicit ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return dev


@dataclass(frozen=True)
class DPSGD:
    """Opacus DP-SGD settings for one client. ``noise_multiplier`` is already calibrated."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float


@dataclass
class TrainResult:
    loss: float
    accuracy: float
    num_examples: int
    steps: int
    epsilon: float | None = None
    dp_history: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # mean of each named extra loss term over all samples


@dataclass
class Batch:
    """One step's batch, as loss terms and ``on_batch`` see it."""

    x: torch.Tensor  # (B, ...) inputs
    y: torch.Tensor  # (B,) labels
    idx: torch.Tensor  # (B,) indices into the training set (for per-sample teachers)
    out: torch.Tensor  # (B, K) the model's logits


# An extra loss term: Batch -> scalar, the batch MEAN of a per-sample loss (each sample's term may
# depend only on that sample and on public values), so that DP-SGD's per-sample clipping covers it.
LossTerm = Callable[[Batch], torch.Tensor]


def _tensors(data: ArrayDataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(data.x).to(device), torch.from_numpy(data.y).to(device)


def train(
    model: nn.Module,
    data: ArrayDataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    device: torch.device | str = "cpu",
    seed: int | None = None,
    proximal_mu: float = 0.0,
    dp: DPSGD | None = None,
    dp_history: list | None = None,
    loss_terms: dict[str, LossTerm] | None = None,
    on_batch: Callable[[Batch], None] | None = None,
    ce_weight: float = 1.0,
) -> TrainResult:
    """Train ``model`` in place: the one local training loop of every client logic.

    Loss = ``ce_weight`` * cross-entropy + the sum of ``loss_terms`` (e.g. distillation), plus FedProx's
    ``proximal_mu / 2 * ||w - w_start||^2`` as a data-independent gradient term. With ``dp`` it is
    DP-SGD through Opacus (Poisson sampling, per-sample clipping of CE + loss terms, Gaussian noise);
    the proximal gradient is added after the noise (it depends on no record). ``dp_history``
    carries the RDP accountant across calls, so a client composes its privacy loss over rounds.

    Randomness: shuffling, dropout masks, Poisson sampling and DP noise are drawn from OS entropy
    (``seed=None``, the default; see :mod:`fedkd.privacy.entropy`). An integer ``seed`` makes them
    reproducible: tests, attack studies and ``privacy.reproducible_noise`` only.
    Returns the mean training loss (CE) and accuracy over all steps.
    """
    device = torch.device(device)
    model.to(device).train()
    with private_global_rng(device, seed):  # dropout masks (torch's global generator)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
        x, y = _tensors(data, device)
        terms = dict(loss_terms or {})
        if dp is not None:
            return _train_dp(model, opt, x, y, epochs, batch_size, seed, proximal_mu, anchor, dp, dp_history or [], terms, on_batch, ce_weight)
        n = len(y)
        g = torch_generator("cpu", seed)
        acc = _Totals(terms)
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g).to(device)
            for start in range(0, n, batch_size):
                idx = perm[start : start + batch_size]
                b = Batch(x[idx], y[idx], idx, None)
                b.out = model(b.x)
                loss, parts = _loss(b, terms, ce_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                _add_proximal_grad(model, anchor, proximal_mu)
                opt.step()
                acc.add(b, loss_ce=parts.pop("ce"), parts=parts, on_batch=on_batch)
        return acc.result(n)


class _Totals:
    def __init__(self, terms) -> None:
        self.ce, self.correct, self.seen, self.steps = 0.0, 0, 0, 0
        self.extra = {k: 0.0 for k in terms}

    def add(self, b: Batch, loss_ce, parts, on_batch) -> None:
        k = len(b.y)
        self.ce += float(loss_ce) * k
        for name, v in parts.items():
            self.extra[name] += float(v) * k
        self.correct += int((b.out.argmax(1) == b.y).sum().item()) if k else 0
        self.seen += k
        self.steps += 1
        if on_batch is not None and k:
            with torch.no_grad():
                on_batch(Batch(b.x, b.y, b.idx, b.out.detach()))

    def result(self, n: int, epsilon=None, history=None) -> TrainResult:
        s = max(self.seen, 1)
        return TrainResult(self.ce / s, self.correct / s, n, self.steps, epsilon, history or [], {k: v / s for k, v in self.extra.items()})


def _loss(b: Batch, terms: dict[str, LossTerm], ce_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """CE + extra terms (batch means). An empty batch (Poisson sampling) gives a zero loss."""
    if len(b.y) == 0:
        zero = b.out.sum() * 0.0
        return zero, {"ce": 0.0, **{k: 0.0 for k in terms}}
    ce = F.cross_entropy(b.out, b.y)
    total, parts = ce * ce_weight if ce_weight != 1.0 else ce, {"ce": ce.item()}
    for name, term in terms.items():
        v = term(b)
        total = total + v
        parts[name] = float(v.detach()) if torch.is_tensor(v) else float(v)
    return total, parts


@torch.no_grad()
def _add_proximal_grad(model: nn.Module, anchor, mu: float) -> None:
    """FedProx: the gradient of mu/2 ||w - w_start||^2, added to whatever gradient the step uses."""
    if not anchor or mu <= 0:
        return
    for p, a in zip(model.parameters(), anchor):
        if p.grad is None:
            p.grad = mu * (p - a)
        else:
            p.grad.add_(p - a, alpha=mu)


def _proximal(model: nn.Module, global_params, mu: float) -> torch.Tensor | float:
    """FedProx's term mu/2 ||w - w_global||^2 as a loss (kept for callers that add it themselves)."""
    if not global_params:
        return 0.0
    return 0.5 * mu * sum(((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params))


def _train_dp(model, opt, x, y, epochs, batch_size, seed, proximal_mu, anchor, dp: DPSGD, history, terms, on_batch, ce_weight=1.0) -> TrainResult:
    """DP-SGD through Opacus: Poisson-sampled batches, per-sample clipping, Gaussian noise, RDP accounting.

    Both the sampler's and the noise's generators are private (OS entropy) unless ``seed`` is given.
    """
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = [tuple(h) for h in history]
    device = x.device
    sample_gen = torch_generator("cpu", seed)
    noise_gen = torch_generator(device, None if seed is None else seed + 1)
    idx_all = torch.arange(len(y), device=device)
    loader = DataLoader(TensorDataset(x, y, idx_all), batch_size=batch_size, generator=sample_gen)
    private, dp_opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=loader, noise_generator=noise_gen,
        noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm, poisson_sampling=True,
    )
    acc = _Totals(terms)
    for _ in range(epochs):
        for xb, yb, ib in loader:
            b = Batch(xb, yb, ib, None)
            b.out = private(xb)  # Poisson sampling can draw an empty batch: still a step for the accountant
            loss, parts = _loss(b, terms, ce_weight)
            dp_opt.zero_grad(set_to_none=True)
            loss.backward()
            if dp_opt.pre_step():  # clip per sample, add noise, account
                _add_proximal_grad(model, anchor, proximal_mu)  # data-independent: no privacy cost
                dp_opt.original_optimizer.step()
            acc.add(b, loss_ce=parts.pop("ce"), parts=parts, on_batch=on_batch)
    if hasattr(private, "_close"):
        private._close()  # detach Opacus' hooks from the caller's module
    eps = engine.accountant.get_epsilon(delta=dp.delta)
    return acc.result(len(y), eps, [list(h) for h in engine.accountant.history])


def history_epsilon(history: list, delta: float) -> float:
    """Epsilon of an Opacus RDP accountant history (as ``TrainResult.dp_history`` carries it)."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Opacus' RDP calibration: the noise multiplier that reaches ``target_epsilon`` after ``steps``."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant="rdp"))


def dp_steps(num_examples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """(sample rate, steps) of one local training, as Opacus' Poisson sampler makes them:
    ``ceil(N / batch_size)`` batches per epoch, each record included with probability 1 / that."""
    batches = max(1, math.ceil(num_examples / batch_size))
    return 1.0 / batches, epochs * batches


@torch.no_grad()
def evaluate(model: nn.Module, data: ArrayDataset, device: torch.device | str = "cpu", batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``data``."""
    device = torch.device(device)
    model.to(device).eval()
    x, y = _tensors(data, device)
    loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        out = model(x[start : start + batch_size])
        yb = y[start : start + batch_size]
        loss += F.cross_entropy(out, yb, reduction="sum").item()
        correct += (out.argmax(1) == yb).sum().item()
    n = max(len(y), 1)
    return loss / n, correct / n


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray | torch.Tensor, device: torch.device | str = "cpu", batch_size: int = 1024) -> torch.Tensor:
    """Logits (N, K) on CPU."""
    device = torch.device(device)
    model.to(device).eval()
    xt = torch.as_tensor(x)
    outs = [model(xt[i : i + batch_size].to(device)).cpu() for i in range(0, len(xt), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)
