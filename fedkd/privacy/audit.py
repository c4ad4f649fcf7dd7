"""Empirical lower bounds on epsilon from a membership attack's guesses on canaries (pure math).

A mechanism that is (epsilon, delta)-DP bounds every membership test: with false-positive rate FPR
and false-negative rate FNR (Kairouz et al.'s hypothesis-testing view),
    FPR + e^eps FNR >= 1 - delta   and   FNR + e^eps FPR >= 1 - delta,
so eps >= max(log((1 - delta - FPR) / FNR), log((1 - delta - FNR) / FPR)) (:func:`eps_from_rates`).
Three ways to turn an attack's results into a bound that holds with 95% confidence:

1. **Clopper-Pearson** (Jagielski et al. 2020; Nasr et al. 2021): exact one-sided binomial upper
   bounds on FPR and FNR, each at alpha/2 (union bound: both hold with probability >= 1 - alpha),
   plugged into :func:`eps_from_rates`, which decreases in both rates. The counts must be
   independent trials: one canary game per training run (many runs), as in those papers. Threshold
   choice: a ``threshold`` fixed in advance is used as is; otherwise every distinct score is tried
   and the confidence is split over all of them (Bonferroni, alpha / (2T) per rate, as
   jax_privacy's canary-score auditor does), so the threshold may be picked on the same data.
2. **One run** (Steinke, Nasr, Jagielski 2023, arXiv 2305.08846): m canaries, each included in the
   training data independently with probability 1/2, ONE training run. The auditor guesses "in"
   for the k+ highest scores, "out" for the k- lowest, abstains on the rest; with r guesses of
   which v are right, an (eps, delta)-DP mechanism gives
       P[>= v right] <= P[Binomial(r, e^eps / (1 + e^eps)) >= v]
                        + 2 m delta max_{i = 1..v} P[v - i <= Binomial(r, q) < v] / i
   (their Corollary/Appendix D). The bound is the largest eps whose p-value is below alpha;
   over several (k+, k-) pairs the alpha is divided by their number (Bonferroni).
3. **Bayesian** (Zanella-Beguelin et al. 2023, arXiv 2206.05199), for counts pooled over several
   runs: independent Jeffreys posteriors FPR ~ Beta(FP + 1/2, TN + 1/2), FNR ~ Beta(FN + 1/2,
   TP + 1/2); the lower bound is the eps whose (eps, delta)-DP region holds alpha of the joint
   posterior mass (posterior probability 1 - alpha that the attack's true rates lie outside it).
   We compute that mass as a one-dimensional integral (the FPR posterior's CDF between the
   region's two boundaries, averaged over the FNR posterior's quantiles) instead of the
   ``privacy-estimates`` package's 2-D ``dblquad``: that package (0.1.0.post1, 2022) installs
   here but took 40-63 s per estimate on this machine; it is not a dependency. The tests check
   our integral against Monte Carlo sampling of the same posterior.

:func:`compare_with_claim` turns (audited bound, claimed epsilon) into the verdict the CLI reports
(exit 1 when the bound exceeds the claim).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, special, stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class AuditBound:
    method: str  # "clopper-pearson" | "one-run" | "bayesian"
    epsilon: float  # the lower bound (0 when nothing could be shown)
    confidence: float
    delta: float
    details: dict = field(default_factory=dict)


# ---------------------------------------------------------------- rates -> epsilon
def eps_from_rates(fpr: float, fnr: float, delta: float) -> float:
    """The smallest eps an (eps, delta)-DP mechanism needs to allow a test with these rates (>= 0)."""
    if not (0 <= fpr <= 1 and 0 <= fnr <= 1):
        raise ValueError(f"rates must be in [0, 1] (got fpr={fpr}, fnr={fnr})")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1) (got {delta})")
    best = 0.0
    for a, b in ((fpr, fnr), (fnr, fpr)):  # log((1 - delta - a) / b)
        num = 1.0 - delta - a
        if num <= 0:
            continue
        best = max(best, math.inf if b == 0 else math.log(num / b))
    return best


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """Exact one-sided upper bound p on a binomial rate after k successes in n trials:
    P[Binomial(n, p) <= k] = alpha (1 when k = n)."""
    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    return float(stats.beta.ppf(1 - alpha, k + 1, n - k))


def confusion(scores, member, threshold: float) -> dict:
    """TP, FP, TN, FN of "member when score >= threshold"."""
    s, m = np.asarray(scores, np.float64), np.asarray(member, bool)
    g = s >= threshold
    return {"tp": int((g & m).sum()), "fp": int((g & ~m).sum()), "tn": int((~g & ~m).sum()), "fn": int((~g & m).sum())}


def clopper_pearson_audit(scores, member, delta: float, confidence: float = CONFIDENCE, threshold: float | None = None) -> AuditBound:
    """Epsilon lower bound from FPR/FNR Clopper-Pearson upper bounds (see the module docstring)."""
    s, m = np.asarray(scores, np.float64), np.asarray(member, bool)
    if s.shape != m.shape or not m.any() or m.all():
        raise ValueError("clopper-pearson audit needs scores of canaries in and out")
    alpha = 1 - confidence
    thresholds = np.array([threshold], float) if threshold is not None else np.unique(s)
    per_rate = alpha / 2 / len(thresholds)
    n_pos, n_neg = int(m.sum()), int((~m).sum())
    # counts of "member when score >= t" at every threshold at once (sorted scores, binary search)
    fn = np.searchsorted(np.sort(s[m]), thresholds, side="left")  # members below t
    tn = np.searchsorted(np.sort(s[~m]), thresholds, side="left")
    fp = n_neg - tn
    fpr_hi = np.where(fp >= n_neg, 1.0, stats.beta.ppf(1 - per_rate, fp + 1, np.maximum(n_neg - fp, 1)))
    fnr_hi = np.where(fn >= n_pos, 1.0, stats.beta.ppf(1 - per_rate, fn + 1, np.maximum(n_pos - fn, 1)))
    eps = np.array([eps_from_rates(float(a), float(b), delta) for a, b in zip(fpr_hi, fnr_hi)])
    i = int(np.argmax(eps))
    at = {"threshold": float(thresholds[i]), "tp": int(n_pos - fn[i]), "fp": int(fp[i]), "tn": int(tn[i]), "fn": int(fn[i])}
    return AuditBound("clopper-pearson", float(eps[i]), confidence, delta, {**at, "thresholds_tried": len(thresholds), "bonferroni": threshold is None})


# ---------------------------------------------------------------- one run (Steinke, Nasr, Jagielski)
def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Upper bound on P[>= v correct of r guesses] for an (eps, delta)-DP mechanism with m canaries."""
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m (got v={v}, r={r}, m={m})")
    if eps < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need eps >= 0 and delta in [0, 1] (got {eps}, {delta})")
    q = float(special.expit(eps))  # accuracy of eps-DP randomised response
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(1.0, tail)
    # P[v - i <= Bin < v] / i for i = 1..v: cumulative pmf from v-1 downwards
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)
    worst = float((np.cumsum(pmf) / np.arange(1, v + 1)).max())
    return min(1.0, tail + 2 * m * delta * worst)


def one_run_epsilon(m: int, r: int, v: int, delta: float, alpha: float = 1 - CONFIDENCE, tol: float = 1e-6) -> float:
    """The largest eps whose p-value (:func:`one_run_p_value`) is below alpha (0 if none)."""
    p = lambda e: one_run_p_value(m, r, v, e, delta)  # noqa: E731  increasing in e
    if p(0.0) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while p(hi) < alpha:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            return math.inf
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p(mid) < alpha else (lo, mid)
    return lo


def one_run_guesses(scores, k_plus: int, k_minus: int) -> np.ndarray:
    """+1 ("in") for the k+ highest scores, -1 ("out") for the k- lowest, 0 (abstain) otherwise.
    Ties are broken by position: a function of the scores only, never of the inclusion bits."""
    s = np.asarray(scores, np.float64)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > len(s):
        raise ValueError(f"need k+ + k- <= {len(s)} canaries (got {k_plus} + {k_minus})")
    order = np.argsort(-s, kind="stable")  # highest first
    g = np.zeros(len(s), np.int8)
    g[order[:k_plus]] = 1
    if k_minus:
        g[order[len(s) - k_minus :]] = -1
    return g


def default_k_pairs(m: int) -> list[tuple[int, int]]:
    """(k+, k-) pairs tried by default: k in 1, 2, 5, 10, 20, 50, ... up to m/2, both symmetric
    (k, k) and "in"-only (k, 0) guesses."""
    ks, base = [], 1
    while base <= max(m // 2, 1):
        ks += [k for k in (base, 2 * base, 5 * base) if k <= max(m // 2, 1)]
        base *= 10
    ks = sorted(set(ks))
    return [(k, k) for k in ks if 2 * k <= m] + [(k, 0) for k in ks]


def one_run_audit(scores, included, delta: float, confidence: float = CONFIDENCE, k_pairs=None) -> AuditBound:
    """Steinke-Nasr-Jagielski bound from one run: scores (m,) of the m canaries, included (m,) their
    coin flips (ground truth, used only to count correct guesses)."""
    s, inc = np.asarray(scores, np.float64), np.asarray(included, bool)
    if s.shape != inc.shape or s.ndim != 1 or len(s) == 0:
        raise ValueError("one-run audit needs one score and one inclusion bit per canary")
    m = len(s)
    pairs = list(k_pairs) if k_pairs is not None else default_k_pairs(m)
    alpha = (1 - confidence) / len(pairs)  # Bonferroni over the pairs tried
    best = {"epsilon": 0.0}
    for kp, km in pairs:
        g = one_run_guesses(s, kp, km)
        r = int((g != 0).sum())
        v = int(((g == 1) & inc).sum() + ((g == -1) & ~inc).sum())
        e = one_run_epsilon(m, r, v, delta, alpha)
        if e > best["epsilon"] or "k_plus" not in best:
            best = {"epsilon": max(e, best["epsilon"]), "k_plus": kp, "k_minus": km, "guesses": r, "correct": v}
    eps = best.pop("epsilon")
    return AuditBound("one-run", eps, confidence, delta, {**best, "canaries": m, "pairs_tried": len(pairs)})


# ---------------------------------------------------------------- Bayesian (Zanella-Beguelin et al.)
def _region(x: np.ndarray, eps: float, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """FPR limits (lo, hi) of the (eps, delta)-DP region at FNR = x."""
    e = math.exp(eps)
    lo = np.maximum(0.0, np.maximum(1 - delta - e * x, (1 - delta - x) / e))
    hi = np.minimum(1.0, np.minimum(1 + (delta - x) / e, delta + e * (1 - x)))
    return lo, np.maximum(hi, lo)


def posterior_mass_private(eps: float, tp: int, fp: int, tn: int, fn: int, delta: float, nodes: int = 4000) -> float:
    """Posterior probability that (FNR, FPR) lies in the (eps, delta)-DP region (Jeffreys priors)."""
    fnr = stats.beta(fn + 0.5, tp + 0.5)
    fpr = stats.beta(fp + 0.5, tn + 0.5)
    x = fnr.ppf((np.arange(nodes) + 0.5) / nodes)  # equal-mass quadrature nodes of the FNR posterior
    lo, hi = _region(x, eps, delta)
    return float(np.mean(fpr.cdf(hi) - fpr.cdf(lo)))


def bayesian_audit(tp: int, fp: int, tn: int, fn: int, delta: float, confidence: float = CONFIDENCE, tol: float = 1e-4) -> AuditBound:
    """Zanella-Beguelin et al.'s lower bound from counts pooled over runs (module docstring)."""
    if min(tp, fp, tn, fn) < 0 or tp + fn == 0 or fp + tn == 0:
        raise ValueError(f"need counts of canaries in and out (got tp={tp} fp={fp} tn={tn} fn={fn})")
    alpha = 1 - confidence
    mass = lambda e: posterior_mass_private(e, tp, fp, tn, fn, delta) - alpha  # noqa: E731  increasing in e
    if mass(0.0) >= 0:
        eps = 0.0
    else:
        hi = 1.0
        while mass(hi) < 0 and hi < 1e3:
            hi *= 2
        eps = float(optimize.brentq(mass, 0.0, hi, xtol=tol)) if mass(hi) >= 0 else math.inf
    return AuditBound("bayesian", eps, confidence, delta, {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "prior": "jeffreys"})


# ---------------------------------------------------------------- verdict
@dataclass(frozen=True)
class Verdict:
    ok: bool
    bound: float
    claimed: float | None
    message: str

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


def compare_with_claim(bound: AuditBound, claimed_epsilon: float | None, unit: str = "record") -> Verdict:
    """Fail when the audited lower bound exceeds the accountant's claimed epsilon."""
    how = f"{bound.method}, {bound.confidence:.0%} confidence, delta={bound.delta:g}"
    if claimed_epsilon is None or not math.isfinite(claimed_epsilon):
        return Verdict(True, bound.epsilon, claimed_epsilon, f"audit: empirical epsilon >= {bound.epsilon:.3g} ({how}); no finite {unit}-level claim to check")
    if bound.epsilon > claimed_epsilon:
        return Verdict(
            False, bound.epsilon, claimed_epsilon,
            f"audit FAILED: empirical {unit}-level epsilon >= {bound.epsilon:.3g} ({how}) exceeds the claimed epsilon "
            f"{claimed_epsilon:.3g}: the mechanism or its accountant is wrong (or, with probability <= {1 - bound.confidence:.0%}, this audit is)",
        )
    return Verdict(True, bound.epsilon, claimed_epsilon, f"audit passed: empirical {unit}-level epsilon >= {bound.epsilon:.3g} ({how}) <= claimed {claimed_epsilon:.3g}")
