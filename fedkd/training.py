"""Local training and evaluation in plain PyTorch (no Flower imports).

``train`` runs SGD (optionally with FedProx's proximal term, optionally as DP-SGD through Opacus) on
an :class:`~fedkd.data.ArrayDataset`. DP-SGD keeps its RDP accountant's history outside the call,
so a client composes its privacy loss across rounds: pass the previous ``dp_history`` back in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedkd.data import ArrayDataset


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
    seed: int = 0,
    proximal_mu: float = 0.0,
    dp: DPSGD | None = None,
    dp_history: list | None = None,
) -> TrainResult:
    """Train ``model`` in place. Returns the mean training loss and accuracy over all steps."""
    device = torch.device(device)
    model.to(device).train()
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    x, y = _tensors(data, device)
    if dp is not None:
        return _train_dp(model, opt, x, y, epochs, batch_size, seed, proximal_mu, global_params, dp, dp_history or [])

    n = len(y)
    g = torch.Generator(device="cpu").manual_seed(seed)
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(device)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            xb, yb = x[idx], y[idx]  # (B, C, H, W), (B,)
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            total = loss + _proximal(model, global_params, proximal_mu)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            total_loss += loss.item() * len(yb)
            correct += (out.argmax(1) == yb).sum().item()
            seen += len(yb)
            steps += 1
    return TrainResult(total_loss / max(seen, 1), correct / max(seen, 1), n, steps)


def _proximal(model: nn.Module, global_params, mu: float) -> torch.Tensor | float:
    if not global_params:
        return 0.0
    return 0.5 * mu * sum(((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params))


def _train_dp(model, opt, x, y, epochs, batch_size, seed, proximal_mu, global_params, dp: DPSGD, history) -> TrainResult:
    """DP-SGD through Opacus: Poisson-sampled batches, per-sample clipping, Gaussian noise, RDP accounting."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = [tuple(h) for h in history]
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, generator=torch.Generator().manual_seed(seed))
    private, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=loader,
        noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm, poisson_sampling=True,
    )
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    for _ in range(epochs):
        for xb, yb in loader:
            out = private(xb)  # Poisson sampling can draw an empty batch: still a step for the accountant
            loss = F.cross_entropy(out, yb) if len(yb) else out.sum() * 0.0
            total = loss + _proximal(model, global_params, proximal_mu)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            total_loss += loss.item() * len(yb)
            correct += (out.argmax(1) == yb).sum().item() if len(yb) else 0
            seen += len(yb)
            steps += 1
    if hasattr(private, "_close"):
        private._close()  # detach Opacus' hooks from the caller's module
    eps = engine.accountant.get_epsilon(delta=dp.delta)
    return TrainResult(total_loss / max(seen, 1), correct / max(seen, 1), len(y), steps, eps, [list(h) for h in engine.accountant.history])


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
