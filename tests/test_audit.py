"""Audit math (fedkd/privacy/audit.py) against closed forms, brute-force sums and simulation."""

import math

import numpy as np
import pytest
from scipy.special import expit, logit

from fedkd.privacy import audit, gaussian


def _binom_cdf_brute(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k + 1))


def _binom_pmf_brute(j: int, n: int, p: float) -> float:
    return math.comb(n, j) * p**j * (1 - p) ** (n - j)


def test_eps_from_rates_closed_forms():
    assert audit.eps_from_rates(0.1, 0.2, 0.0) == pytest.approx(math.log(0.8 / 0.1))
    assert audit.eps_from_rates(0.1, 0.2, 0.05) == pytest.approx(math.log(0.75 / 0.1))
    assert audit.eps_from_rates(0.5, 0.5, 0.0) == 0.0  # a coin flip shows nothing
    assert audit.eps_from_rates(0.0, 0.3, 0.0) == math.inf
    assert audit.eps_from_rates(0.0, 1.0, 0.0) == 0.0  # never guessing "in" shows nothing


def test_clopper_pearson_upper_equals_bruteforce_binomial_tail():
    for k, n, alpha in [(0, 10, 0.025), (3, 20, 0.05), (17, 40, 0.01), (49, 50, 0.025)]:
        u = audit.clopper_pearson_upper(k, n, alpha)
        assert _binom_cdf_brute(k, n, u) == pytest.approx(alpha, rel=1e-6)
    assert audit.clopper_pearson_upper(10, 10, 0.05) == 1.0
    assert audit.clopper_pearson_upper(0, 100, 0.025) == pytest.approx(1 - 0.025 ** (1 / 100))  # k = 0: 1 - alpha^(1/n)


def test_clopper_pearson_audit_by_hand_and_bonferroni_is_more_conservative():
    scores = np.r_[np.ones(100), np.zeros(100)]
    member = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    b = audit.clopper_pearson_audit(scores, member, delta=0.0, threshold=0.5)
    u = 1 - 0.025 ** (1 / 100)  # both rates observed 0 of 100, each bounded at alpha / 2
    assert b.epsilon == pytest.approx(math.log((1 - u) / u), rel=1e-9)
    assert b.details["fp"] == 0 and b.details["fn"] == 0
    tuned = audit.clopper_pearson_audit(scores, member, delta=0.0)  # threshold picked on the same data
    assert 0 < tuned.epsilon < b.epsilon and tuned.details["bonferroni"]


def test_one_run_p_value_matches_bruteforce_sums():
    for m, r, v, eps, delta in [(30, 20, 15, 0.7, 1e-3), (50, 50, 40, 1.2, 1e-2), (12, 8, 8, 2.0, 0.0), (40, 10, 3, 0.1, 1e-2)]:
        q = expit(eps)
        tail = sum(_binom_pmf_brute(j, r, q) for j in range(v, r + 1))
        worst = max(sum(_binom_pmf_brute(j, r, q) for j in range(v - i, v)) / i for i in range(1, v + 1)) if v else 0.0
        assert audit.one_run_p_value(m, r, v, eps, delta) == pytest.approx(min(1.0, tail + 2 * m * delta * worst), rel=1e-9)


def test_one_run_epsilon_inverts_the_p_value():
    # all r guesses right, delta 0: P[Bin(r, q) >= r] = q^r < alpha  <=>  eps < logit(alpha^(1/r))
    assert audit.one_run_epsilon(100, 100, 100, 0.0, 0.05) == pytest.approx(logit(0.05 ** (1 / 100)), abs=1e-5)
    e = audit.one_run_epsilon(1000, 400, 330, 1e-5, 0.05)
    assert audit.one_run_p_value(1000, 400, 330, e, 1e-5) < 0.05 <= audit.one_run_p_value(1000, 400, 330, e + 1e-4, 1e-5)
    assert audit.one_run_epsilon(1000, 400, 200, 1e-5, 0.05) == 0.0  # chance accuracy shows nothing


def _randomised_response(eps0: float, bits: np.ndarray, rng) -> np.ndarray:
    keep = rng.random(len(bits)) < expit(eps0)
    return np.where(keep, bits, ~bits).astype(float)


def test_one_run_audit_is_valid_and_has_power_on_randomised_response():
    """An eps0-DP mechanism (randomised response on each canary's coin): the 95% bound stays below
    eps0 in (at least about) 95% of runs, and is far from 0."""
    rng = np.random.default_rng(0)
    eps0, m, bounds = 1.0, 1000, []
    for _ in range(20):
        inc = rng.random(m) < 0.5
        scores = _randomised_response(eps0, inc, rng) + 1e-3 * rng.random(m)  # tiny jitter: no ties
        bounds.append(audit.one_run_audit(scores, inc, delta=0.0, k_pairs=[(250, 250), (500, 500)]).epsilon)
    bounds = np.array(bounds)
    assert (bounds <= eps0).mean() >= 0.9
    assert bounds.mean() > 0.5


def test_clopper_pearson_audit_is_valid_on_independent_trials():
    rng = np.random.default_rng(1)
    eps0 = 1.0
    over = 0
    for _ in range(20):
        member = rng.random(2000) < 0.5  # one game per "run"
        scores = _randomised_response(eps0, member, rng)
        b = audit.clopper_pearson_audit(scores, member, delta=0.0, threshold=0.5)
        over += b.epsilon > eps0
        assert b.epsilon > 0.6
    assert over <= 2


def _eps_from_rates_vec(fpr, fnr, delta):
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.log((1 - delta - fpr) / fnr)
        b = np.log((1 - delta - fnr) / fpr)
    return np.maximum(0, np.nan_to_num(np.maximum(a, b), nan=0.0))


@pytest.mark.parametrize("counts", [(90, 10, 90, 10), (40, 3, 45, 12), (50, 0, 50, 0)])
def test_bayesian_audit_matches_monte_carlo_of_the_same_posterior(counts):
    tp, fp, tn, fn = counts
    delta = 1e-5
    b = audit.bayesian_audit(tp, fp, tn, fn, delta)
    rng = np.random.default_rng(2)
    fpr = rng.beta(fp + 0.5, tn + 0.5, 400_000)
    fnr = rng.beta(fn + 0.5, tp + 0.5, 400_000)
    assert b.epsilon == pytest.approx(np.quantile(_eps_from_rates_vec(fpr, fnr, delta), 0.05), abs=0.02)


def test_bayesian_audit_agrees_with_privacy_estimates_package():
    # privacy-estimates 0.1.0.post1 compute_eps_lo(method="joint-beta", alpha=0.05, delta=1e-5), run once
    # in this session (its xtol is 1e-2): (TP, FP, TN, FN) -> eps_lo
    for (tp, fp, tn, fn), theirs in [((90, 10, 90, 10), 1.9106), ((900, 100, 900, 100), 2.1088), ((50, 0, 50, 0), 4.1927)]:
        assert audit.bayesian_audit(tp, fp, tn, fn, 1e-5).epsilon == pytest.approx(theirs, abs=0.02)


def test_verdict_fails_loudly_when_the_bound_exceeds_the_claim():
    bound = audit.AuditBound("one-run", 2.5, 0.95, 1e-5)
    v = audit.compare_with_claim(bound, 1.0)
    assert not v.ok and v.exit_code == 1 and "2.5" in v.message and "1" in v.message
    assert audit.compare_with_claim(bound, 3.0).exit_code == 0
    assert audit.compare_with_claim(bound, None).ok


def test_audit_catches_gaussian_mechanism_with_noise_scaled_down_100x():
    """Per canary, the mechanism releases its coin plus Gaussian noise calibrated to a claimed
    eps = 1 (one release, fedkd's Gaussian accountant). Honest noise passes the audit; the same
    claim with the noise divided by 100 is caught."""
    delta, claim, m = 1e-5, 1.0, 1000
    sigma = gaussian.calibrate_noise(claim, rounds=1, delta=delta)
    rng = np.random.default_rng(3)
    inc = rng.random(m) < 0.5
    for scale, should_pass in ((1.0, True), (0.01, False)):
        scores = inc + sigma * scale * rng.standard_normal(m)
        verdict = audit.compare_with_claim(audit.one_run_audit(scores, inc, delta), claim)
        assert verdict.ok is should_pass, verdict.message


def test_clopper_pearson_vectorised_counts_match_a_loop():
    rng = np.random.default_rng(6)
    member = rng.random(300) < 0.4
    scores = np.round(rng.normal(member * 1.0, 1.0), 1)  # ties on purpose
    b = audit.clopper_pearson_audit(scores, member, delta=1e-3)
    per = 0.05 / 2 / len(np.unique(scores))
    best = max(
        audit.eps_from_rates(audit.clopper_pearson_upper(c["fp"], int((~member).sum()), per), audit.clopper_pearson_upper(c["fn"], int(member.sum()), per), 1e-3)
        for c in (audit.confusion(scores, member, t) for t in np.unique(scores))
    )
    assert b.epsilon == pytest.approx(best) and b.details == {**b.details, **audit.confusion(scores, member, b.details["threshold"])}
