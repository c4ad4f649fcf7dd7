"""Poisson Binomial Mechanism (PBM): Chen, Ozgur, Kairouz, ICML 2022, the baseline of the RQM paper.

Per coordinate x in [-c, c]: p(x) = 1/2 + theta x / c with theta in (0, 1/4]; the client sends
k ~ Binomial(m, p(x)) (ceil(log2(m + 1)) bits); the server's unbiased estimate is
x_hat = c (k - m/2) / (m theta).

Accounting here is the *local* guarantee (one client's count), exact: the count is a sufficient
statistic of m independent Bernoulli(p(x)) draws, so D_alpha(Bin(m, p) || Bin(m, p')) =
m D_alpha(Bern(p) || Bern(p')), and Bernoulli(p(x)) is affine in x, so by joint convexity the worst
pair is the two ends (-c, c) (both orders are equal by symmetry). The paper's own guarantee is for
the Poisson-binomial SUM under secure aggregation, which is smaller; it is not implemented here, so
comparisons with RQM below are local against local.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedkd.config import ConfigError
from fedkd.privacy.rqm import DEFAULT_ALPHAS, compose, eps_from_rdp, index_dtype


def check_params(clip: float, theta: float, trials: int, prefix: str = "privacy.") -> None:
    if not (clip > 0 and math.isfinite(clip)):
        raise ConfigError(f"{prefix}clip", f"must be > 0 (got {clip})")
    if not 0 < theta <= 0.25:
        raise ConfigError(f"{prefix}theta", f"must be in (0, 0.25] (got {theta})")
    if int(trials) != trials or trials < 1:
        raise ConfigError(f"{prefix}trials", f"must be an integer >= 1 (got {trials})")


@dataclass(frozen=True)
class PBMParams:
    clip: float
    theta: float
    trials: int

    def __post_init__(self) -> None:
        check_params(self.clip, self.theta, self.trials)

    @property
    def symbols(self) -> int:
        """Values a coordinate can take on the wire: 0..m."""
        return self.trials + 1

    @property
    def bits(self) -> int:
        return max(1, math.ceil(math.log2(self.trials + 1)))

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = x.detach().to(torch.float64).clamp(-self.clip, self.clip)
        p = 0.5 + self.theta * x / self.clip
        u = torch.rand((*x.shape, self.trials), generator=generator, dtype=torch.float64)
        return (u < p[..., None]).sum(-1).to(torch.int64)

    def decode(self, k) -> torch.Tensor:
        k = torch.as_tensor(np.asarray(k, dtype=np.float64) if isinstance(k, np.ndarray) else k).to(torch.float64)
        return (self.clip * (k - self.trials / 2) / (self.trials * self.theta)).to(torch.float32)

    def wire_dtype(self) -> np.dtype:
        return index_dtype(self.symbols)

    def rdp(self, alphas=DEFAULT_ALPHAS) -> np.ndarray:
        return rdp(self, alphas)

    def epsilon(self, coords: int, rounds: int, delta: float, alphas=DEFAULT_ALPHAS) -> float:
        return eps_from_rdp(alphas, compose(rdp(self, alphas), coords, rounds), delta)[0]


def bernoulli_rdp(p: float, q: float, alpha: float) -> float:
    """D_alpha(Bern(p) || Bern(q)), in log space (large alpha overflows otherwise)."""
    a = alpha * math.log(p) + (1 - alpha) * math.log(q)
    b = alpha * math.log1p(-p) + (1 - alpha) * math.log1p(-q)
    return float(np.logaddexp(a, b)) / (alpha - 1)


def rdp(pp: PBMParams, alphas=DEFAULT_ALPHAS) -> np.ndarray:
    """Per-coordinate local RDP: m D_alpha(Bern(1/2 + theta) || Bern(1/2 - theta))."""
    hi, lo = 0.5 + pp.theta, 0.5 - pp.theta
    return np.array([pp.trials * bernoulli_rdp(hi, lo, float(a)) for a in alphas])


def variance(pp: PBMParams, x: float = 0.0) -> float:
    p = 0.5 + pp.theta * x / pp.clip
    return (pp.clip / (pp.trials * pp.theta)) ** 2 * pp.trials * p * (1 - p)


def calibrate_theta(target_epsilon: float, clip: float, trials: int, coords: int, rounds: int, delta: float, rel_tol: float = 1e-3) -> float:
    """The largest theta (less variance) whose local epsilon is at most the target."""
    def eps_at(t: float) -> float:
        return PBMParams(clip, t, trials).epsilon(coords, rounds, delta)

    if eps_at(0.25) <= target_epsilon:
        return 0.25
    lo, hi = 1e-9, 0.25
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        if eps_at(mid) > target_epsilon:
            hi = mid
        else:
            lo = mid
    return lo
