"""Randomized Quantization Mechanism (RQM): Youn, Hu, Ziani, Abernethy 2023 (arXiv 2306.11913).

Differential privacy from quantization alone. Per coordinate x of a client's update:

1. clip x to [-c, c] and widen the range to X = c + Delta (Delta > 0 is what makes it private);
2. m evenly spaced levels B(i) = -X + 2 i X / (m - 1), i = 0..m-1;
3. keep both end levels, keep each interior level independently with probability q;
4. round x at random to the kept level just below (a) or just above (b) it, unbiased:
   P(b) = (x - B(a)) / (B(b) - B(a));
5. send the index z (ceil(log2 m) bits); the server decodes B(z), and E[B(z)] = x.

Everything here is pure (numpy / torch, no Flower): encode, decode, the exact output pmf of one
coordinate in O(m^2), the Renyi divergence maximised over input pairs, composition over
coordinates and rounds, conversion to (epsilon, delta) with Opacus' RDP-to-DP function, and a
calibration helper.

Exact worst case. For x inside one cell [B(j), B(j+1)] the pmf is affine in x (the keep pattern
probabilities depend only on j; the rounding probability is linear in x) and it is continuous at
the levels. ``sum_z p(z)^alpha q(z)^(1-alpha)`` is jointly convex in (p, q) for alpha > 1 (the
perspective of t^alpha), so on every product of cells it is convex in (x, x') and its maximum lies
on a corner. The supremum over [-c, c]^2 is therefore a maximum over the finite set
{-c, c} U {B(i) : -c < B(i) < c} (both orders of each pair): no grid, no optimiser, exact.

Guarantee. The paper states Renyi DP of RQM's output for one client (a local guarantee: the
server may see every client's indices). Because the sum revealed by secure aggregation is a
post-processing of one client's output (plus the others' independent outputs), the same numbers
bound the aggregate too; the amplification that secure aggregation could add is not claimed.
The privacy unit is a client's whole update (any two updates in [-c, c]^d are neighbours).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from fedkd.config import ConfigError

# Opacus' default RDP orders, plus orders near 1 (large composed RDP is converted best there) and a
# few large ones.
DEFAULT_ALPHAS: tuple[float, ...] = tuple(
    [1 + x / 1000.0 for x in (1, 2, 5, 10, 20, 50)] + [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 128, 256, 512, 1024, 4096]
)

GUARANTEE_LOCAL = "local"  # per-client output (also bounds the secure-aggregate sum)
GUARANTEE_AGGREGATE = "secure-aggregate"  # only the sum of n clients' indices is revealed
# Fewer orders for the (costlier) aggregate accountant; any subset of orders still gives a valid bound.
AGGREGATE_ALPHAS: tuple[float, ...] = (1.01, 1.05, 1.1, 1.2, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


@dataclass(frozen=True)
class RQMParams:
    """One coordinate's RQM: clip c, extend Delta, m levels, keep probability q of interior levels."""

    clip: float
    extend: float
    levels: int
    keep_prob: float

    def __post_init__(self) -> None:
        check_params(self.clip, self.extend, self.levels, self.keep_prob)

    @property
    def X(self) -> float:  # noqa: N802  (the paper's name)
        return self.clip + self.extend

    @property
    def bits(self) -> int:
        """Bits per coordinate of the index: ceil(log2 m)."""
        return bits_per_coordinate(self.levels)

    def grid(self) -> np.ndarray:
        """The m levels B(0..m-1), shape (m,)."""
        return level_values(self.X, self.levels)

    # the codec interface shared with PBM (clients/rqm.py, strategies/rqm.py)
    @property
    def symbols(self) -> int:
        return self.levels

    def wire_dtype(self) -> np.dtype:
        return index_dtype(self.levels)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return encode(x, self, generator)

    def decode(self, z) -> torch.Tensor:
        return decode(z, self)

    def epsilon(self, coords: int, rounds: int, delta: float) -> float:
        return epsilon(self, coords, rounds, delta)


def check_params(clip: float, extend: float, levels: int, keep_prob: float, prefix: str = "privacy.") -> None:
    """One-line :class:`ConfigError` naming the bad parameter."""
    if not (clip > 0 and math.isfinite(clip)):
        raise ConfigError(f"{prefix}clip", f"must be > 0 (got {clip})")
    if not (extend > 0 and math.isfinite(extend)):
        raise ConfigError(f"{prefix}extend", f"must be > 0: RQM is not private without it (got {extend})")
    if int(levels) != levels or levels < 2:
        raise ConfigError(f"{prefix}levels", f"must be an integer >= 2 (got {levels})")
    if not 0 < keep_prob <= 1:
        raise ConfigError(f"{prefix}keep_prob", f"must be in (0, 1] (got {keep_prob})")


def bits_per_coordinate(levels: int) -> int:
    return max(1, math.ceil(math.log2(levels)))


def index_dtype(levels: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds 0..levels-1."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if levels - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def level_values(X: float, m: int) -> np.ndarray:  # noqa: N803
    return -X + 2.0 * np.arange(m) * X / (m - 1)


# --------------------------------------------------------------------------- mechanism
def encode(x: torch.Tensor, p: RQMParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Clip ``x`` (any shape) to [-c, c] and quantize every coordinate: level indices, int64, same shape.

    Exact sampling without enumerating keep patterns: with j the cell of x (B(j) <= x < B(j+1)), the
    nearest kept level below is j - G (at least 0) and above is j + 1 + G' (at most m - 1), where G,
    G' are independent geometric counts of dropped interior levels, P(G >= k) = (1 - q)^k.
    """
    m, X, q = p.levels, p.X, p.keep_prob
    x = x.detach().to(torch.float64).clamp(-p.clip, p.clip)
    step = 2.0 * X / (m - 1)
    j = torch.floor((x + X) / step).clamp(0, m - 2)  # cell index, float64 (exact small ints)
    if q < 1.0:
        u1 = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=_gen_device(generator, x))
        u2 = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=_gen_device(generator, x))
        log1q = math.log1p(-q)
        # geometric failures: floor(log U / log(1-q)); U in (0, 1]
        g_lo = torch.floor(torch.log1p(-u1) / log1q)
        g_hi = torch.floor(torch.log1p(-u2) / log1q)
        a = (j - g_lo).clamp(min=0)
        b = (j + 1 + g_hi).clamp(max=m - 1)
    else:
        a, b = j, j + 1
    ba = -X + a * step
    bb = -X + b * step
    p_up = (x - ba) / (bb - ba)  # in [0, 1)
    u3 = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=_gen_device(generator, x))
    z = torch.where(u3 < p_up, b, a)
    return z.to(torch.int64).to(x.device)


def _gen_device(generator: torch.Generator | None, x: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else x.device


def decode(z: torch.Tensor | np.ndarray, p: RQMParams) -> torch.Tensor:
    """B(z) = -X + 2 z X / (m - 1), float32."""
    z = torch.as_tensor(np.asarray(z, dtype=np.int64) if isinstance(z, np.ndarray) else z).to(torch.float64)
    return (-p.X + 2.0 * z * p.X / (p.levels - 1)).to(torch.float32)


def decode_mean(index_sum: torch.Tensor | np.ndarray, n: int, p: RQMParams) -> torch.Tensor:
    """The server's estimate of the mean of n clients from the sum of their indices."""
    s = torch.as_tensor(np.asarray(index_sum, dtype=np.float64) if isinstance(index_sum, np.ndarray) else index_sum).to(torch.float64)
    return (-p.X + 2.0 * s * p.X / (n * (p.levels - 1))).to(torch.float32)


# --------------------------------------------------------------------------- exact pmf
def _keep(i: np.ndarray, m: int, q: float) -> np.ndarray:
    return np.where((i == 0) | (i == m - 1), 1.0, q)


def pmf(x: float, p: RQMParams) -> np.ndarray:
    """Exact output distribution of one coordinate, shape (m,), in O(m^2).

    P(a, b) = k(a) k(b) (1 - q)^(b - a - 1) for a <= j < b (a, b kept, all levels between dropped;
    k = 1 at the ends, q inside), then round up with probability (x - B(a)) / (B(b) - B(a)).
    """
    m, q = p.levels, p.keep_prob
    x = float(min(max(x, -p.clip), p.clip))
    B = p.grid()
    j = int(min(max(math.floor((x + p.X) * (m - 1) / (2 * p.X)), 0), m - 2))
    a = np.arange(0, j + 1)[:, None]  # (j+1, 1) candidate lower levels
    b = np.arange(j + 1, m)[None, :]  # (1, m-j-1) candidate upper levels
    w = _keep(a, m, q) * _keep(b, m, q) * (1.0 - q) ** (b - a - 1)  # (j+1, m-j-1)
    up = (x - B[a]) / (B[b] - B[a])
    out = np.zeros(m)
    out[: j + 1] = (w * (1.0 - up)).sum(axis=1)
    out[j + 1 :] = (w * up).sum(axis=0)
    return out


def pmf_bruteforce(x: float, p: RQMParams) -> np.ndarray:
    """The same pmf by enumerating all 2^(m-2) keep patterns (tests only; m small)."""
    m, q = p.levels, p.keep_prob
    x = float(min(max(x, -p.clip), p.clip))
    B = p.grid()
    out = np.zeros(m)
    for pattern in range(2 ** (m - 2)):
        kept = [0] + [i for i in range(1, m - 1) if pattern >> (i - 1) & 1] + [m - 1]
        prob = q ** (len(kept) - 2) * (1 - q) ** (m - len(kept))
        if prob == 0:
            continue
        a = max(i for i in kept if B[i] <= x)
        b = min(i for i in kept if B[i] > x)
        up = (x - B[a]) / (B[b] - B[a])
        out[a] += prob * (1 - up)
        out[b] += prob * up
    return out


# --------------------------------------------------------------------------- Renyi divergence
def renyi_divergence(P: np.ndarray, Q: np.ndarray, alpha: float) -> float:
    """D_alpha(P || Q) = log(sum P^alpha Q^(1-alpha)) / (alpha - 1), alpha > 1; inf if supp P not in supp Q."""
    P, Q = np.asarray(P, float), np.asarray(Q, float)
    on = P > 0
    if np.any(Q[on] <= 0):
        return math.inf
    terms = alpha * np.log(P[on]) + (1 - alpha) * np.log(Q[on])
    top = terms.max()
    return float((top + math.log(np.exp(terms - top).sum())) / (alpha - 1))


def candidate_inputs(p: RQMParams) -> np.ndarray:
    """Where the worst pair can lie: the clip ends and every level strictly inside (-c, c)."""
    B = p.grid()
    inner = B[(B > -p.clip) & (B < p.clip)]
    return np.unique(np.concatenate([[-p.clip, p.clip], inner]))


@functools.lru_cache(maxsize=256)
def _pmf_table(p: RQMParams) -> tuple[np.ndarray, np.ndarray]:
    xs = candidate_inputs(p)
    return xs, np.stack([pmf(float(x), p) for x in xs])


def worst_case_rdp(p: RQMParams, alpha: float) -> tuple[float, tuple[float, float]]:
    """Exact sup over x, x' in [-c, c] of D_alpha(RQM(x) || RQM(x')), and the pair attaining it."""
    xs, P = _pmf_table(p)
    if np.any(P <= 0):  # q = 1: supports differ between cells
        best, pair = -1.0, (float(xs[0]), float(xs[-1]))
        for i in range(len(xs)):
            for k in range(len(xs)):
                d = renyi_divergence(P[i], P[k], alpha)
                if d > best:
                    best, pair = d, (float(xs[i]), float(xs[k]))
        return best, pair
    L = np.log(P)  # (K, m)
    # terms[i, k, o] = alpha log P_i(o) + (1 - alpha) log P_k(o)
    terms = alpha * L[:, None, :] + (1 - alpha) * L[None, :, :]
    top = terms.max(axis=2, keepdims=True)
    D = (top[..., 0] + np.log(np.exp(terms - top).sum(axis=2))) / (alpha - 1)
    i, k = np.unravel_index(int(np.argmax(D)), D.shape)
    return float(D[i, k]), (float(xs[i]), float(xs[k]))


def rdp(p: RQMParams, alphas=DEFAULT_ALPHAS) -> np.ndarray:
    """Per-coordinate RDP epsilon(alpha) of one RQM output, at each alpha."""
    return np.array([worst_case_rdp(p, float(a))[0] for a in alphas])


def aggregate_rdp(p: RQMParams, alphas, n_clients: int, max_multisets: int = 500) -> np.ndarray | None:
    """Exact per-coordinate RDP of the SUM of n clients' indices (what secure aggregation reveals).

    One client's input changes (x vs x'); the other n - 1 inputs are arbitrary. By the convexity
    argument of the module docstring, applied to each client in turn (the sum's pmf is affine in
    each client's pmf), the supremum is attained with every input at a candidate point, and the sum
    is symmetric in the others, so it is a maximum over multisets of the others' candidates and
    ordered pairs (x, x'). Returns None when there are more than ``max_multisets`` multisets
    (C(K + n - 2, n - 1) for K candidates): the local RDP then remains the bound to use.
    """
    import itertools

    xs, P = _pmf_table(p)
    K, others = len(xs), n_clients - 1
    if others < 0:
        raise ValueError(f"n_clients must be >= 1 (got {n_clients})")
    if math.comb(K + others - 1, others) > max_multisets:
        return None
    alphas = np.asarray(alphas, float)
    best = np.full(len(alphas), -np.inf)
    for combo in itertools.combinations_with_replacement(range(K), others):
        R = np.ones(1)
        for c in combo:
            R = np.convolve(R, P[c])  # pmf of the others' index sum
        S = np.stack([np.convolve(P[i], R) for i in range(K)])  # (K, L): sum's pmf for each x
        if not np.all(S > 0):
            return np.full(len(alphas), math.inf)  # q = 1: supports can differ
        L = np.log(S)
        a = alphas[:, None, None, None]
        terms = a * L[None, :, None, :] + (1 - a) * L[None, None, :, :]  # (A, K, K, L)
        top = terms.max(axis=3, keepdims=True)
        D = (top[..., 0] + np.log(np.exp(terms - top).sum(axis=3))) / (alphas[:, None, None] - 1)
        best = np.maximum(best, D.reshape(len(alphas), -1).max(axis=1))
    return best


def compose(rdp_per_coordinate: np.ndarray, coords: int, rounds: int) -> np.ndarray:
    """RDP adds up over independent releases: d coordinates per round, ``rounds`` rounds."""
    return np.asarray(rdp_per_coordinate, float) * coords * rounds


def eps_from_rdp(alphas, rdp_values, delta: float) -> tuple[float, float]:
    """(epsilon, best alpha) through Opacus' RDP -> (epsilon, delta) conversion."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    r = np.asarray(rdp_values, float)
    if not np.isfinite(r).any():
        return math.inf, float("nan")
    a = np.asarray(alphas, float)[np.isfinite(r)]
    eps, best = get_privacy_spent(orders=a, rdp=r[np.isfinite(r)], delta=delta)
    return float(eps), float(best)


def epsilon(p: RQMParams, coords: int, rounds: int, delta: float, alphas=DEFAULT_ALPHAS) -> float:
    """(epsilon, delta)-DP of one client after ``rounds`` rounds of a d = ``coords`` update."""
    return eps_from_rdp(alphas, compose(rdp(p, alphas), coords, rounds), delta)[0]


def aggregate_epsilon(p: RQMParams, n_clients: int, coords: int, rounds: int, delta: float, alphas=AGGREGATE_ALPHAS) -> float | None:
    """(epsilon, delta) of one client when only the sum over ``n_clients`` is revealed; None if too costly."""
    r = aggregate_rdp(p, alphas, n_clients)
    return None if r is None else eps_from_rdp(alphas, compose(r, coords, rounds), delta)[0]


def calibrate_extend(
    target_epsilon: float, clip: float, levels: int, keep_prob: float, coords: int, rounds: int, delta: float,
    alphas=DEFAULT_ALPHAS, rel_tol: float = 1e-3,
) -> float:
    """The smallest extend (Delta; smaller = less variance) whose epsilon is at most the target.

    Bisection on log(Delta): epsilon decreases as Delta grows (the levels spread out around [-c, c]).
    """
    def eps_at(ext: float) -> float:
        return epsilon(RQMParams(clip, ext, levels, keep_prob), coords, rounds, delta, alphas)

    lo, hi = clip * 1e-3, clip
    while eps_at(hi) > target_epsilon:
        lo, hi = hi, hi * 4
        if hi > clip * 1e12:
            raise ValueError(f"no extend reaches epsilon {target_epsilon} with levels={levels}, keep_prob={keep_prob}")
    if eps_at(lo) <= target_epsilon:
        return lo
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        if eps_at(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def variance(x: float, p: RQMParams) -> float:
    """Exact variance of B(z) at input x (the utility cost of a setting)."""
    P = pmf(x, p)
    B = p.grid()
    mean = float((P * B).sum())
    return float((P * B**2).sum() - mean**2)
