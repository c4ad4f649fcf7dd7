"""Accountant of central Gaussian DP-FedAvg (McMahan et al. 2018, arXiv 1710.06963).

Each round the server clips every client's update to L2 norm C, averages them with equal weights
over the n sampled clients and adds N(0, (sigma C / n)^2) per coordinate: the Gaussian mechanism on
the sum with sensitivity C when one client is added or removed. Its RDP is alpha / (2 sigma^2) per
round (Mironov 2017), composed over rounds by addition and converted to (epsilon, delta) with
Opacus' conversion. No amplification by client subsampling is claimed (a client is counted in every
round), so the epsilon is an upper bound whatever ``strategy.fraction_train`` is.

Privacy unit: one client's whole contribution (client-level), with a trusted server (central DP).
Flower's ``DifferentialPrivacyServerSideFixedClipping`` does the clipping and the noise.
"""

from __future__ import annotations

import math

import numpy as np

from fedkd.privacy.rqm import DEFAULT_ALPHAS, eps_from_rdp


def rdp(noise_multiplier: float, alphas=DEFAULT_ALPHAS) -> np.ndarray:
    """RDP of one release of the Gaussian mechanism with noise multiplier sigma, at each alpha."""
    if noise_multiplier <= 0:
        return np.full(len(alphas), math.inf)
    return np.asarray(alphas, float) / (2.0 * noise_multiplier**2)


def epsilon(noise_multiplier: float, rounds: int, delta: float, alphas=DEFAULT_ALPHAS) -> float:
    return eps_from_rdp(alphas, rdp(noise_multiplier, alphas) * rounds, delta)[0]


def calibrate_noise(target_epsilon: float, rounds: int, delta: float, alphas=DEFAULT_ALPHAS, rel_tol: float = 1e-4) -> float:
    """The smallest noise multiplier whose epsilon after ``rounds`` rounds is at most the target."""
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be > 0 (got {target_epsilon})")
    lo, hi = 1e-3, 1.0
    while epsilon(hi, rounds, delta, alphas) > target_epsilon:
        lo, hi = hi, hi * 2
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        if epsilon(mid, rounds, delta, alphas) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi
