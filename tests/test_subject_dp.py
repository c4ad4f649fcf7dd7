"""Subject-level DP (fedkd/privacy/subject_dp.py): accountant against closed forms and numerical
integration, the clipping/noising step, and an audit of the step with the noise broken on purpose."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from fedkd.config import ConfigError
from fedkd.privacy import audit
from fedkd.privacy import subject_dp as sdp


def test_full_sampling_composes_to_the_gaussian_closed_form():
    # q = 1: each step is the Gaussian mechanism, RDP alpha / (2 sigma^2); composition adds over
    # local steps, rounds and the silos holding the subject.
    sigma, steps, rounds, silos = 3.0, 4, 5, 3
    rdp = sdp.subject_rdp([sdp.SiloSchedule(1.0, sigma, steps)] * silos, rounds)
    np.testing.assert_allclose(rdp, np.asarray(sdp.ORDERS) * silos * steps * rounds / (2 * sigma**2), rtol=1e-10)


def _sampled_gaussian_rdp_by_integration(q: float, sigma: float, alpha: int) -> float:
    """D_alpha(mu1 || mu0), mu0 = N(0, s^2), mu1 = (1-q) N(0, s^2) + q N(1, s^2), by quadrature of
    mu0(x) (mu1(x) / mu0(x))^alpha, the ratio written as (1 - q) + q exp((2x - 1) / (2 s^2))."""
    integrand = lambda x: stats.norm.pdf(x, 0, sigma) * ((1 - q) + q * math.exp((2 * x - 1) / (2 * sigma**2))) ** alpha  # noqa: E731
    val, _ = integrate.quad(integrand, -30 * sigma, alpha + 30 * sigma, limit=500, points=[0, 1, alpha])
    return math.log(val) / (alpha - 1)


@pytest.mark.parametrize("q,sigma", [(0.1, 1.0), (0.3, 2.0), (0.05, 0.8)])
def test_step_rdp_equals_numerical_integration(q, sigma):
    orders = (2.0, 3.0, 8.0)
    ours = sdp.step_rdp(q, sigma, orders)
    for a, r in zip(orders, ours):
        assert r == pytest.approx(_sampled_gaussian_rdp_by_integration(q, sigma, int(a)), rel=1e-6)


def test_horizontal_composition_and_worst_subject():
    s = sdp.SiloSchedule(0.1, 1.2, 10)
    one = sdp.subject_rdp([s], 3)
    np.testing.assert_allclose(sdp.subject_rdp([s, s, s], 3), 3 * one)  # three silos hold the subject
    eps_max, per = sdp.federation_epsilon([s, s, s, s], 3, 1e-5, holders=[[0], [1, 2], [0, 1, 2, 3]])
    assert per[0] < per[1] < per[2] and eps_max == per[2]
    worst, _ = sdp.federation_epsilon([s, s, s, s], 3, 1e-5)  # holders unknown: every silo holds the subject
    assert worst == pytest.approx(per[2])
    assert sdp.subject_epsilon([s], 3, 1e-5) < sdp.subject_epsilon([s], 6, 1e-5)  # rounds compose


def test_calibrate_noise_reaches_the_target():
    sigma = sdp.calibrate_noise(2.0, sample_rate=0.2, steps_per_round=5, rounds=10, silos_per_subject=2, delta=1e-5)
    eps = lambda s: sdp.subject_epsilon([sdp.SiloSchedule(0.2, s, 5)] * 2, 10, 1e-5)  # noqa: E731
    assert eps(sigma) <= 2.0 < eps(sigma * 0.999)


def test_bad_parameters_are_refused_with_the_key():
    with pytest.raises(ConfigError, match="subject_dp.subjects_per_step"):
        sdp.SiloSchedule(0.0, 1.0, 1)
    with pytest.raises(ConfigError, match="privacy.max_grad_norm"):
        sdp.clip_per_subject([torch.zeros(2, 3)], torch.tensor([0, 1]), 0.0)
    with pytest.raises(ConfigError, match="privacy.target_epsilon"):
        sdp.calibrate_noise(-1, 0.1, 1, 1, 1, 1e-5)
    assert sdp.step_rdp(0.5, 0.0)[0] == math.inf  # no noise: no guarantee, never a finite claim


def _per_example(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 4, 3, generator=g) * 5, torch.randn(batch, 3, generator=g) * 5]  # a weight and a bias


def test_clip_per_subject_averages_then_bounds_every_subject():
    grads = _per_example(40)
    ids = torch.tensor([7] * 25 + [3] * 10 + [9] * 4 + [1])  # one subject with 25 records, one with 1
    subjects, clipped, norms = sdp.clip_per_subject(grads, ids, clip=1.0)
    assert subjects.tolist() == [1, 3, 7, 9]
    total = torch.sqrt(sum((c.reshape(len(subjects), -1) ** 2).sum(1) for c in clipped))
    assert torch.all(total <= 1.0 + 1e-6)
    for i, s in enumerate(subjects.tolist()):  # brute force: mean of the subject's rows, scaled to norm <= 1
        rows = ids == s
        mean = [g[rows].mean(0) for g in grads]
        n = math.sqrt(sum(float((m**2).sum()) for m in mean))
        assert norms[i].item() == pytest.approx(n, rel=1e-5)
        for m, c in zip(mean, clipped):
            torch.testing.assert_close(c[i], m * min(1.0, 1.0 / n), rtol=1e-5, atol=1e-6)


def test_one_subjects_total_contribution_never_exceeds_the_clip_norm():
    grads = _per_example(60, seed=1)
    ids = torch.arange(60) % 6  # six subjects, ten records each
    gen = sdp.private_generator(debug_seed=0)
    kwargs = dict(clip=0.5, noise_multiplier=0.0, expected_subjects=6.0, generator=gen)
    full = sdp.subject_dp_gradient(grads, ids, **kwargs)
    for s in range(6):
        keep = ids != s
        without = sdp.subject_dp_gradient([g[keep] for g in grads], ids[keep], **kwargs)
        diff = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(full, without)))
        assert diff <= 0.5 / 6.0 + 1e-6  # <= C / (q S) in the released mean
    # duplicating a subject's records (more records of the same person) does not raise its weight
    grads2 = [torch.cat([g, g[ids == 0]]) for g in grads]
    ids2 = torch.cat([ids, ids[ids == 0]])
    again = sdp.subject_dp_gradient(grads2, ids2, **kwargs)
    for a, b in zip(full, again):
        torch.testing.assert_close(a, b)


def test_noise_has_the_claimed_scale_and_private_seeds_differ():
    grads = [torch.zeros(5, 20000)]
    ids = torch.arange(5)
    out = sdp.subject_dp_gradient(grads, ids, clip=2.0, noise_multiplier=1.5, expected_subjects=4.0, generator=sdp.private_generator())
    assert out[0].std().item() == pytest.approx(1.5 * 2.0 / 4.0, rel=0.03)
    a = torch.randn(8, generator=sdp.private_generator())
    b = torch.randn(8, generator=sdp.private_generator())
    assert not torch.equal(a, b)  # OS entropy, not a run seed
    torch.testing.assert_close(torch.randn(8, generator=sdp.private_generator(debug_seed=5)), torch.randn(8, generator=sdp.private_generator(debug_seed=5)))
    empty = sdp.subject_dp_gradient([torch.zeros(0, 3)], torch.zeros(0, dtype=torch.long), clip=1.0, noise_multiplier=1.0, expected_subjects=2.0, generator=sdp.private_generator())
    assert empty[0].shape == (3,)  # an empty Poisson draw is still a (noise-only) step


def test_poisson_subject_sampling_rate():
    kept = sdp.poisson_sample_subjects(torch.arange(20000), 0.3, sdp.private_generator(debug_seed=1))
    assert len(kept) / 20000 == pytest.approx(0.3, abs=0.02)


def test_audit_catches_subject_step_with_noise_scaled_down_100x():
    """m canary subjects, each in its own coordinate with a gradient of norm C, each included with
    probability 1/2; one step of the mechanism (q = 1). The accountant's epsilon for sigma is the
    claim. Honest noise passes the one-run audit; noise / 100 with the same claim is caught."""
    m, clip, delta = 1000, 1.0, 1e-5
    sigma = sdp.calibrate_noise(1.0, sample_rate=1.0, steps_per_round=1, rounds=1, silos_per_subject=1, delta=delta)
    claim = sdp.subject_epsilon([sdp.SiloSchedule(1.0, sigma, 1)], 1, delta)
    rng = np.random.default_rng(4)
    inc = rng.random(m) < 0.5
    ids = torch.from_numpy(np.flatnonzero(inc))
    per_example = [torch.eye(m, dtype=torch.float64)[ids] * clip * 3]  # each subject pushes its own coordinate (clipped to C)
    for scale, should_pass in ((1.0, True), (0.01, False)):
        step = sdp.subject_dp_gradient(per_example, ids, clip=clip, noise_multiplier=sigma * scale, expected_subjects=m / 2, generator=sdp.private_generator())
        verdict = audit.compare_with_claim(audit.one_run_audit(step[0].numpy(), inc, delta), claim, unit=sdp.UNIT)
        assert verdict.ok is should_pass, verdict.message


def test_summary_names_the_subject_as_the_unit():
    s = sdp.SiloSchedule(0.2, 1.5, 5)
    out = sdp.summary_fields([s, s], 4, 1e-5, clip=1.0, holders=[[0], [0, 1]])
    assert out["privacy_unit"] == "subject" and out["epsilon"] == pytest.approx(sdp.subject_epsilon([s, s], 4, 1e-5))
    assert sdp.summary_fields([sdp.SiloSchedule(0.2, 0.0, 5)], 4, 1e-5, clip=1.0)["epsilon"] is None  # no noise: no claim
