import math

import numpy as np
import pytest
import torch

from fedkd.config import DataConfig
from fedkd.data import load_federation
from fedkd.models import build_model
from fedkd.training import DPSGD, calibrate_noise, dp_steps, evaluate, resolve_device, train


@pytest.fixture(scope="module")
def fed():
    return load_federation(DataConfig(partitioner="iid", num_clients=2), 0)


def test_training_learns_digits(fed):
    torch.manual_seed(0)
    m = build_model("mlp", fed.input_shape, 10)
    before = evaluate(m, fed.server_test)[1]
    res = train(m, fed.clients[0].train, epochs=5, batch_size=32, lr=0.05, momentum=0.9, seed=0)
    after = evaluate(m, fed.server_test)[1]
    assert before < 0.3 and after > 0.85
    assert res.num_examples == len(fed.clients[0].train) and res.steps == 5 * math.ceil(res.num_examples / 32)


def test_training_is_deterministic_in_the_seed(fed):
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        m = build_model("cnn", fed.input_shape, 10)
        train(m, fed.clients[0].train, epochs=1, batch_size=16, lr=0.05, seed=3)
        outs.append(torch.cat([p.flatten() for p in m.parameters()]))
    assert torch.equal(outs[0], outs[1])


def test_proximal_term_keeps_weights_closer(fed):
    def drift(mu):
        torch.manual_seed(0)
        m = build_model("mlp", fed.input_shape, 10)
        w0 = torch.cat([p.detach().flatten().clone() for p in m.parameters()])
        train(m, fed.clients[0].train, epochs=2, batch_size=32, lr=0.05, seed=0, proximal_mu=mu)
        return (torch.cat([p.detach().flatten() for p in m.parameters()]) - w0).norm().item()

    assert drift(1.0) < 0.8 * drift(0.0)


def test_dp_sgd_epsilon_matches_rdp_computed_independently(fed):
    """Opacus' accountant inside training against the RDP formula evaluated by hand (same orders)."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    data = fed.clients[0].train
    q, steps = dp_steps(len(data), 32, 2)
    m = build_model("mlp", fed.input_shape, 10)
    r1 = train(m, data, epochs=2, batch_size=32, lr=0.05, seed=0, dp=DPSGD(1.1, 1.0, 1e-5))
    r2 = train(m, data, epochs=2, batch_size=32, lr=0.05, seed=1, dp=DPSGD(1.1, 1.0, 1e-5), dp_history=r1.dp_history)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    for res, n_steps in ((r1, steps), (r2, 2 * steps)):
        rdp = compute_rdp(q=q, noise_multiplier=1.1, steps=n_steps, orders=orders)
        eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
        assert res.epsilon == pytest.approx(eps, rel=1e-6)
    assert r2.epsilon > r1.epsilon  # composed across rounds


def test_calibrated_noise_reaches_the_target(fed):
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    q, steps = dp_steps(200, 32, 5)
    sigma = calibrate_noise(2.0, 1e-5, q, steps * 10)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    eps, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=q, noise_multiplier=sigma, steps=steps * 10, orders=orders), delta=1e-5)
    assert 1.8 < eps <= 2.0


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            resolve_device("cuda")


def _weights(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_fedprox_mu_acts_under_dp_sgd(fed):
    """The proximal gradient is added after DP-SGD's noise: with the same (seeded) noise and sampling,
    a larger mu changes the weights and keeps them closer to the start (on main, mu was dropped)."""
    data = fed.clients[0].train
    out = {}
    for mu in (0.0, 100.0):
        torch.manual_seed(0)
        m = build_model("mlp", fed.input_shape, 10)
        w0 = _weights(m).clone()
        train(m, data, epochs=1, batch_size=32, lr=0.005, seed=7, proximal_mu=mu, dp=DPSGD(1.0, 1.0, 1e-5))
        out[mu] = (_weights(m), (_weights(m) - w0).norm().item())
    assert not torch.allclose(out[0.0][0], out[100.0][0])
    assert out[100.0][1] < 0.8 * out[0.0][1]


def test_unseeded_training_draws_private_randomness(fed):
    """seed=None (what clients use): shuffles and dropout masks from OS entropy, so two runs from the same
    start differ; the same integer seed reproduces; the caller's seeded global generator is untouched."""
    def run(seed):
        torch.manual_seed(0)  # public: model initialisation
        m = build_model("mlp", fed.input_shape, 10, dropout=0.3)
        train(m, fed.clients[0].train, epochs=1, batch_size=16, lr=0.05, seed=seed)
        return _weights(m), build_model("mlp", fed.input_shape, 10)  # a model initialised after training

    (a, after_a), (b, after_b) = run(None), run(None)
    assert not torch.equal(a, b)
    assert torch.equal(run(5)[0], run(5)[0])
    assert torch.equal(_weights(after_a), _weights(after_b))  # initialisation after training is still seeded


def test_loss_terms_are_trained_and_reported_also_under_dp(fed):
    """A distillation-style term goes through the same loop with and without DP-SGD."""
    data = fed.clients[0].train
    target = torch.zeros(10)
    target[3] = 5.0
    for dp in (None, DPSGD(0.5, 1.0, 1e-5)):
        torch.manual_seed(0)
        m = build_model("mlp", fed.input_shape, 10)
        seen = []
        res = train(m, data, epochs=2, batch_size=32, lr=0.05, seed=1, dp=dp, ce_weight=0.0,
                    loss_terms={"pull": lambda b: ((b.out - target) ** 2).mean()}, on_batch=lambda b: seen.append(len(b.y)))
        assert res.extra["pull"] > 0 and sum(seen) > 0
        out = m(torch.from_numpy(data.x[:64])).detach()
        assert (out.argmax(1) == 3).float().mean() > 0.9  # trained toward the term only
