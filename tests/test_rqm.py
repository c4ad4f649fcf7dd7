"""RQM (arXiv 2306.11913) and the Gaussian DP-FedAvg baseline: math against brute force, mod, wrappers, CLI."""

import json
import math

import numpy as np
import pytest
import torch

from fedkd.cli import main
from fedkd.config import ConfigError
from fedkd.experiment import run_experiment
from fedkd.privacy import gaussian, rqm
from tests.conftest import small


def test_pmf_sums_to_one_and_equals_bruteforce_enumeration():
    for m in (2, 3, 5, 8):
        for q in (0.3, 0.8, 1.0):
            p = rqm.RQMParams(1.0, 0.5, m, q)
            xs = np.concatenate([np.linspace(-1, 1, 13), p.grid()[np.abs(p.grid()) <= 1]])
            for x in xs:
                fast, brute = rqm.pmf(float(x), p), rqm.pmf_bruteforce(float(x), p)
                assert fast.sum() == pytest.approx(1.0, abs=1e-12)
                np.testing.assert_allclose(fast, brute, atol=1e-12)
                assert (fast * p.grid()).sum() == pytest.approx(min(max(x, -1), 1), abs=1e-12)  # unbiased


def test_encoding_matches_pmf_and_decoding_is_unbiased():
    p = rqm.RQMParams(clip=0.2, extend=0.1, levels=8, keep_prob=0.4)
    n = 200_000
    gen = torch.Generator().manual_seed(0)
    for x in (-0.2, -0.07, 0.0, 0.13, 0.2, 0.5):  # 0.5 is clipped to 0.2
        z = rqm.encode(torch.full((n,), x), p, gen)
        assert z.min() >= 0 and z.max() <= p.levels - 1
        target = min(max(x, -p.clip), p.clip)
        est = rqm.decode(z, p).double().mean().item()
        se = math.sqrt(rqm.variance(target, p) / n)
        assert abs(est - target) < 5 * se  # a 5-sigma test of E[B(z)] = clip(x)
        freq = np.bincount(z.numpy(), minlength=p.levels) / n
        np.testing.assert_allclose(freq, rqm.pmf(target, p), atol=5 * math.sqrt(0.25 / n))
    # the server's mean from the index sum
    zs = torch.stack([rqm.encode(torch.full((50_000,), v), p, gen) for v in (-0.1, 0.05, 0.2)])
    assert rqm.decode_mean(zs.sum(0), 3, p).double().mean().item() == pytest.approx(0.05, abs=3e-3)


def test_rdp_grows_as_extend_shrinks():
    for alpha in (2.0, 8.0, 32.0):
        values = [rqm.worst_case_rdp(rqm.RQMParams(1.0, e, 16, 0.5), alpha)[0] for e in (4.0, 2.0, 1.0, 0.5, 0.25)]
        assert all(np.diff(values) > 0), values
    # and with alpha
    r = rqm.rdp(rqm.RQMParams(1.0, 1.0, 16, 0.5), (2, 4, 8, 16))
    assert all(np.diff(r) > 0)


def grid_max(p, alpha, k=41):
    xs = np.linspace(-p.clip, p.clip, k)
    P = [rqm.pmf(float(x), p) for x in xs]
    return max(rqm.renyi_divergence(a, b, alpha) for a in P for b in P)


def test_worst_pair_is_maximised_over_inputs_not_just_the_ends():
    # exact over the candidate set: never below a fine grid search, never below the two ends
    for p in (rqm.RQMParams(1.0, 0.5, 6, 0.5), rqm.RQMParams(1.0, 0.2, 5, 0.3), rqm.RQMParams(1.0, 2.0, 16, 0.7)):
        for alpha in (2.0, 16.0, 128.0):
            best, pair = rqm.worst_case_rdp(p, alpha)
            ends = rqm.renyi_divergence(rqm.pmf(-p.clip, p), rqm.pmf(p.clip, p), alpha)
            assert best >= ends - 1e-12
            assert best >= grid_max(p, alpha) - 1e-9
    # a case where the worst pair is not (-c, c): found by the maximisation, checked on a fine grid
    p = rqm.RQMParams(1.0, 1.0, 16, 0.1)  # levels 2/15 apart: -0.9333 is a level inside [-1, 1]
    best, pair = rqm.worst_case_rdp(p, 64.0)
    ends = max(rqm.renyi_divergence(rqm.pmf(a, p), rqm.pmf(b, p), 64.0) for a, b in ((-1, 1), (1, -1)))
    assert pair[0] == pytest.approx(-14 / 15) and pair[1] == 1.0 and best > ends * 1.01
    assert best == pytest.approx(grid_max(p, 64.0, k=151), rel=1e-9)  # the grid holds -14/15 too


def test_secure_aggregate_rdp_is_exact_for_small_n():
    p = rqm.RQMParams(1.0, 1.0, 6, 0.5)
    alphas = (2.0, 8.0)
    np.testing.assert_allclose(rqm.aggregate_rdp(p, alphas, 1), rqm.rdp(p, alphas))  # n = 1: the local RDP
    agg = rqm.aggregate_rdp(p, alphas, 2)
    assert np.all(agg <= rqm.rdp(p, alphas) + 1e-12)  # the sum is a post-processing of one output
    # brute force over a grid of the other client's input and the differing pair (grid holds the levels)
    xs = np.unique(np.concatenate([np.linspace(-1, 1, 21), rqm.candidate_inputs(p)]))
    P = [rqm.pmf(float(x), p) for x in xs]
    for a, exact in zip(alphas, agg):
        brute = max(rqm.renyi_divergence(np.convolve(u, o), np.convolve(v, o), a) for o in P for u in P for v in P)
        assert exact == pytest.approx(brute, rel=1e-9)
    assert rqm.aggregate_rdp(p, alphas, 200) is None  # too many configurations: no claim


def test_composition_conversion_and_calibration():
    p = rqm.RQMParams(0.05, 0.5, 16, 0.5)
    e1 = rqm.epsilon(p, coords=100, rounds=1, delta=1e-5)
    e2 = rqm.epsilon(p, coords=100, rounds=4, delta=1e-5)
    assert 0 < e1 < e2
    ext = rqm.calibrate_extend(3.0, 0.05, 16, 0.5, coords=100, rounds=4, delta=1e-5)
    assert rqm.epsilon(rqm.RQMParams(0.05, ext, 16, 0.5), 100, 4, 1e-5) <= 3.0
    assert rqm.epsilon(rqm.RQMParams(0.05, ext * 0.98, 16, 0.5), 100, 4, 1e-5) > 3.0
    # Gaussian: RDP alpha / (2 sigma^2), calibration inverts epsilon
    np.testing.assert_allclose(gaussian.rdp(2.0, (2, 10)), [2 / 8, 10 / 8])
    sigma = gaussian.calibrate_noise(4.0, rounds=10, delta=1e-5)
    assert gaussian.epsilon(sigma, 10, 1e-5) == pytest.approx(4.0, rel=1e-3)


@pytest.mark.parametrize(
    "override, key",
    [("privacy.levels=1", "privacy.levels"), ("privacy.keep_prob=0", "privacy.keep_prob"), ("privacy.keep_prob=1.5", "privacy.keep_prob"),
     ("privacy.extend=0", "privacy.extend"), ("privacy.extend=-1", "privacy.extend"), ("privacy.clip=0", "privacy.clip")],
)
def test_invalid_parameters_are_one_line_config_errors(override, key):
    with pytest.raises(ConfigError) as e:
        small("privacy.mechanism=rqm", override)
    assert e.value.key == key and "\n" not in str(e.value)


def test_gaussian_needs_noise_or_target():
    with pytest.raises(ConfigError, match="privacy.noise_multiplier"):
        small("privacy.mechanism=gaussian")


def test_cli_prints_rdp_and_epsilon_json(capsys):
    assert main(["privacy", "rqm", "--clip", "1", "--extend", "1", "--levels", "16", "--keep-prob", "0.5", "--alpha", "2", "--alpha", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["rdp"]) == {"2", "8"} and out["rdp"]["8"] > out["rdp"]["2"] > 0 and "epsilon" not in out
    assert out["rdp"]["8"] == pytest.approx(rqm.worst_case_rdp(rqm.RQMParams(1, 1, 16, 0.5), 8.0)[0])
    assert main(["privacy", "rqm", "--clip", "1", "--extend", "1", "--levels", "16", "--keep-prob", "0.5", "--coords", "10", "--rounds", "3", "--delta", "1e-5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["epsilon"] == pytest.approx(rqm.epsilon(rqm.RQMParams(1, 1, 16, 0.5), 10, 3, 1e-5), rel=1e-6)
    assert main(["privacy", "rqm", "--clip", "1", "--extend", "1", "--levels", "1", "--keep-prob", "0.5"]) == 2
    assert "--levels" in capsys.readouterr().err
    assert main(["privacy", "rqm", "--clip", "1", "--extend", "1", "--levels", "6", "--keep-prob", "0.5", "--alpha", "2", "--clients", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0 < out["rdp_hypothetical_secure_aggregation"]["2"] <= out["rdp"]["2"]
    assert main(["privacy", "pbm", "--clip", "1", "--theta", "0.1", "--trials", "15", "--coords", "10", "--rounds", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["epsilon"] > 0
    assert main(["privacy", "gaussian", "--target-epsilon", "3", "--rounds", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["epsilon"] == pytest.approx(3.0, rel=1e-3)


class Payloads:
    """An observer recording what the server receives from training clients."""

    def __init__(self):
        self.arrays = []

    def __call__(self, rnd, sent, replies):
        for r in replies:
            if r.metadata.message_type == "train" and not r.has_error():
                self.arrays += [a.numpy() for a in r.content["arrays"].values()]


def test_rqm_federation_sends_level_indices_and_reports_epsilon(tmp_path):
    obs = Payloads()
    cfg = small("privacy.mechanism=rqm", "privacy.clip=0.05", "privacy.extend=0.05", "privacy.levels=16", "privacy.keep_prob=0.5")
    s = run_experiment(cfg, tmp_path / "rqm", progress=False, observers=[obs])
    assert s["status"] == "ok" and s["rounds_completed"] == 2
    assert obs.arrays and all(a.dtype == np.uint8 and a.max() <= 15 for a in obs.arrays)  # indices in [0, m-1]
    d = sum(a.size for a in obs.arrays) // 8  # 4 clients x 2 rounds
    assert s["epsilon"] == pytest.approx(rqm.epsilon(rqm.RQMParams(0.05, 0.05, 16, 0.5), d, 2, 1e-5), rel=1e-6)
    assert s["privacy_unit"] == "client" and s["bits_per_coordinate"] == 4 and s["privacy_guarantee"].startswith("local")
    assert 0 < s["epsilon_hypothetical_secure_aggregation"] < s["epsilon"]  # hypothetical: fedkd runs no secure aggregation
    assert s["bytes_up_arrays"] < s["bytes_down"] / 2 / 3  # uint8 indices vs float32 models
    assert s["accuracy"] is not None and s["accuracy"] > 0.1


def test_gaussian_dp_fedavg_federation_reports_epsilon(tmp_path):
    s = run_experiment(small("privacy.mechanism=gaussian", "privacy.noise_multiplier=0.8", "privacy.max_grad_norm=1.0"), tmp_path / "g", progress=False)
    assert s["status"] == "ok" and s["privacy_unit"] == "client" and s["privacy_guarantee"].startswith("central")
    assert s["epsilon"] == pytest.approx(gaussian.epsilon(0.8, 2, 1e-5))


def test_pbm_baseline_is_unbiased_and_its_local_rdp_is_exact():
    from math import comb

    from fedkd.privacy import pbm

    p = pbm.PBMParams(clip=1.0, theta=0.2, trials=8)
    binom = lambda m, pr: np.array([comb(m, k) * pr**k * (1 - pr) ** (m - k) for k in range(m + 1)])  # noqa: E731
    for a, r in zip((2.0, 8.0), p.rdp((2.0, 8.0))):
        assert r == pytest.approx(rqm.renyi_divergence(binom(8, 0.7), binom(8, 0.3), a), rel=1e-12)
    z = p.encode(torch.full((100_000,), 0.3), torch.Generator().manual_seed(1))
    assert z.min() >= 0 and z.max() <= 8
    assert abs(p.decode(z).double().mean().item() - 0.3) < 5 * math.sqrt(pbm.variance(p, 0.3) / 100_000)
    t = pbm.calibrate_theta(8.0, 0.05, 15, coords=50, rounds=3, delta=1e-5)
    assert pbm.PBMParams(0.05, t, 15).epsilon(50, 3, 1e-5) <= 8.0 < pbm.PBMParams(0.05, t * 1.01, 15).epsilon(50, 3, 1e-5)
    with pytest.raises(ConfigError, match="privacy.theta"):
        small("privacy.mechanism=pbm", "privacy.theta=0.3")


def test_client_quantizer_and_server_decoder_round_trip():
    """The mod's payload (smallest unsigned dtype, values in range) and the wrapper's unbiased decoding."""
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp.strategy import FedAvg

    from fedkd.clients.rqm import quantize_update
    from fedkd.privacy import pbm
    from fedkd.strategies.rqm import RQMStrategy

    g = {"w": np.zeros((40, 50), np.float32), "steps": np.array([3], np.int64)}
    trained = ArrayRecord({"w": Array(np.full((40, 50), 0.02, np.float32)), "steps": Array(np.array([4], np.int64))})
    for params, dtype in ((rqm.RQMParams(0.05, 0.05, 16, 0.5), np.uint8), (rqm.RQMParams(0.05, 0.05, 300, 0.5), np.uint16), (pbm.PBMParams(0.05, 0.25, 15), np.uint8)):
        rec, coords = quantize_update(g, trained, params, seed=3)
        z = rec["w"].numpy()
        assert coords == 2000 and list(rec.keys()) == ["w"]  # integer arrays are not sent
        assert z.dtype == dtype and z.max() <= params.symbols - 1
        wrapper = RQMStrategy(FedAvg(), params)
        wrapper.current_arrays = ArrayRecord({k: Array(v) for k, v in g.items()})
        out = wrapper.decode_reply(rec)
        assert out["steps"].numpy()[0] == 3  # the server keeps its own value
        var = rqm.variance(0.02, params) if isinstance(params, rqm.RQMParams) else pbm.variance(params, 0.02)
        assert abs(out["w"].numpy().mean() - 0.02) < 5 * math.sqrt(var / 2000)
    wrapper = RQMStrategy(FedAvg(), rqm.RQMParams(0.05, 0.05, 16, 0.5))
    wrapper.current_arrays = ArrayRecord({"w": Array(np.zeros((40, 50), np.float32))})
    with pytest.raises(ValueError, match="level indices"):
        wrapper.decode_reply(ArrayRecord({"w": Array(np.full((40, 50), 16, np.uint8))}))  # 16 >= m
