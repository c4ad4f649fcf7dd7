"""Gradient inversion against HyperFL: the replay is exact given the client's private parts, the attacks refuse the
wrong observations, and on the same image FedAvg's IG observation leaks far more than HyperFL's."""

import copy
import dataclasses

import pytest
import torch
from torch.nn import functional as F

from fedkd.attacks import ObservationError
from fedkd.attacks.gradients import cosine_distance
from fedkd.attacks.hyperfl_inversion import (
    HyperFLDIAParams, HyperFLIGParams, HyperFLObservation, HyperFLRank1Params, HyperFLReplay, hyperfl_dia, hyperfl_ig,
    hyperfl_local_observation, hyperfl_rank1, recover_generated,
)
from fedkd.attacks.ig import IGParams, ig
from fedkd.attacks.metrics import score
from fedkd.attacks.observation import Observation, local_observation
from fedkd.config import DataConfig
from fedkd.data import load_federation
from fedkd.hyper_local import hyperfl_local_update
from fedkd.hypernet import hyperfl_model
from fedkd.models import build_model
from fedkd.training import train

from .conftest import small


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny models: one torch thread (tests/conftest.py)


@pytest.fixture(scope="module")
def digits():
    fed = load_federation(DataConfig(partitioner="iid", num_clients=2), 0)
    return fed.clients[0].train, fed.server_test.x.mean(0)


def fresh(seed: int):
    """The same initial target for FedAvg and HyperFL, and a HyperFL client on it (private parts from its own seed)."""
    torch.manual_seed(seed)
    target = build_model("hyperfl-cnn", (1, 8, 8), 10)
    return target, hyperfl_model(target, small().hyperfl, torch.Generator().manual_seed(100 + seed))


@pytest.mark.parametrize("setting", ["gradient", "update"])
def test_replay_with_the_clients_private_parts_reproduces_what_the_server_saw(digits, setting):
    data, _ = digits
    batch = data.take([3, 4, 5])
    # stage 1 off so the client's head stays the initial one we know; batch >= N so the shuffle cannot matter
    hp = dataclasses.replace(small().hyperfl, head_epochs=0, hnet_epochs=3)
    _, model = fresh(0)
    obs = hyperfl_local_observation(model, batch, hp, model_name="hyperfl-cnn", setting=setting, generator=torch.Generator().manual_seed(1))
    assert obs.training.steps == (1 if setting == "gradient" else 3)
    replay = HyperFLReplay(obs, "cpu")
    x, y = torch.from_numpy(batch.x), F.one_hot(torch.from_numpy(batch.y), 10).float()
    head = tuple(model.head_params()[n].detach() for n in replay.head_names)
    truth = replay(x, y, model.embedding.weight[0].detach(), head)
    assert float(torch.sqrt(sum((t * t).sum() for t in replay.target))) > 1e-2  # a real signal
    assert float(cosine_distance(truth, replay.target)) < 1e-4
    guess = replay(x, y, torch.randn(64, generator=torch.Generator().manual_seed(9)), tuple(torch.randn_like(h) * 0.1 for h in head))
    assert float(cosine_distance(guess, replay.target)) > 0.3  # without v and the head, the same images do not fit


def test_attacks_take_only_their_own_observations(digits, tmp_path):
    data, _ = digits
    target, model = fresh(0)
    hobs = hyperfl_local_observation(model, data.take([1]), small().hyperfl, model_name="hyperfl-cnn", generator=torch.Generator().manual_seed(1))
    with pytest.raises(ObservationError, match="ig: .* is a HyperFL observation"):
        ig(hobs, IGParams(steps=1, restarts=1))
    plain = local_observation(target, data.take([1]), model_name="hyperfl-cnn")
    with pytest.raises(ObservationError, match="hyperfl-ig: needs a HyperFL observation"):
        hyperfl_ig(plain, HyperFLIGParams(steps=1, restarts=1))
    back = Observation.load(hobs.save(tmp_path / "o.pt"))
    assert isinstance(back, HyperFLObservation) and back.embed_dim == 64 and set(back.reply_state) == set(hobs.global_state)
    assert set(back.reply_state) == {n for n, _ in model.hypernet.named_parameters()}  # the hypernetwork, nothing private


def test_fedavg_ig_recovers_an_image_that_hyperfl_hides_from_both_adapted_attacks(digits):
    data, mean = digits
    pool = data.take(list(range(40, 240)))  # the client's other images: a few rounds in, for both frameworks
    target, model = fresh(6)
    fedavg = copy.deepcopy(target)
    g = torch.Generator().manual_seed(206)
    for _ in range(3):
        hyperfl_local_update(model, torch.from_numpy(pool.x), torch.from_numpy(pool.y), small().hyperfl, generator=g)
    train(fedavg, pool, epochs=3, batch_size=50, lr=0.05, momentum=0.9, seed=0)
    one = data.take([0])

    obs = local_observation(fedavg, one, model_name="hyperfl-cnn", lr=0.1)
    s_fedavg = score(ig(obs, IGParams(steps=100, restarts=2)).images.numpy(), [0], one.x, one.y, mean)
    hobs = hyperfl_local_observation(model, one, small().hyperfl, model_name="hyperfl-cnn", generator=torch.Generator().manual_seed(5))
    assert float(torch.sqrt(sum((t * t).sum() for t in HyperFLReplay(hobs, "cpu").target))) > 0.1  # not a vanished gradient
    r_ig = hyperfl_ig(hobs, HyperFLIGParams(steps=80, restarts=1))
    r_dia = hyperfl_dia(hobs, HyperFLDIAParams(steps=80, restarts=1))
    s_ig = score(r_ig.images.numpy(), r_ig.labels.numpy(), one.x, one.y, mean)
    s_dia = score(r_dia.images.numpy(), r_dia.labels.numpy(), one.x, one.y, mean)
    base = s_fedavg["baseline_psnr"]
    assert s_fedavg["psnr"] > base + 10, (s_fedavg["psnr"], base)  # FedAvg leaks the image
    assert s_ig["psnr"] < base and s_fedavg["psnr"] > s_ig["psnr"] + 15, (s_fedavg["psnr"], s_ig["psnr"])
    # Optimising the embedding and head fits the observed update far better, yet the image stays hidden here.
    assert r_dia.loss < 0.5 * r_ig.loss, (r_dia.loss, r_ig.loss)
    assert s_fedavg["psnr"] > s_dia["psnr"] + 15, (s_fedavg["psnr"], s_dia["psnr"])


def test_one_hypernetwork_step_gives_away_the_generated_weights_and_their_gradient(digits):
    data, _ = digits
    batch = data.take([3, 4, 5, 6])
    hp = dataclasses.replace(small().hyperfl, head_epochs=0)  # keep the initial head, which we know
    _, model = fresh(1)
    obs = hyperfl_local_observation(model, batch, hp, model_name="hyperfl-cnn", generator=torch.Generator().manual_seed(1))
    theta, dtheta = recover_generated(obs)
    generated = {k: v.detach() for k, v in model.generate().items()}  # private: never sent
    leaves = {k: v.clone().requires_grad_() for k, v in generated.items()}
    loss = F.cross_entropy(model(torch.from_numpy(batch.x), leaves), torch.from_numpy(batch.y))
    true_grad = torch.autograd.grad(loss, list(leaves.values()))
    for k in generated:
        assert float((theta[k] - generated[k]).norm() / generated[k].norm()) < 1e-4, k
    assert float(cosine_distance([dtheta[k] for k in generated], list(true_grad))) < 1e-6
    rec = hyperfl_rank1(obs, HyperFLRank1Params(steps=3, restarts=1))
    assert rec.images.shape == (4, 1, 8, 8) and 0 <= float(rec.images.min()) and float(rec.images.max()) <= 1
    update = hyperfl_local_observation(model, batch, hp, model_name="hyperfl-cnn", setting="update", generator=torch.Generator().manual_seed(1))
    with pytest.raises(ObservationError, match="needs a 'gradient' observation"):
        hyperfl_rank1(update, HyperFLRank1Params(steps=1, restarts=1))
