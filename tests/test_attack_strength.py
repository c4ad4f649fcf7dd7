"""Attack strength and honest baselines: the class-conditional mean-image baseline, the client's
reshuffled mini-batch order (unknown vs recovered for an oracle), per-dataset tuned IG defaults."""

import numpy as np
import pytest
import torch

from fedkd.attacks import ATTACKS
from fedkd.attacks.gradients import Replay, epoch_orders, euclidean, find_batch_order, one_hot
from fedkd.attacks.ig import TUNED_TV
from fedkd.attacks.metrics import class_means, psnr, score, ssim
from fedkd.attacks.observation import local_observation
from fedkd.config import ConfigError, DataConfig
from fedkd.data import load_federation
from fedkd.models import build_model

from .conftest import small


@pytest.fixture(scope="module")
def digits():
    fed = load_federation(DataConfig(partitioner="iid", num_clients=2), 0)
    return fed.clients[0].train, fed.server_test


def test_class_conditional_baseline_scores_the_guessed_labels_class_means(digits):
    data, test = digits
    cm = class_means(test.x, test.y, 10)
    for k in range(10):
        np.testing.assert_allclose(cm[k], test.x[test.y == k].mean(0), rtol=1e-6)
    batch = data.take([0, 5, 9])
    recon = np.random.default_rng(0).random(batch.x.shape).astype(np.float32)
    sc = score(recon, batch.y, batch.x, batch.y, test.x.mean(0), cm)
    brute = [psnr(cm[y], x) for x, y in zip(batch.x, batch.y)]
    assert sc["class_baseline_psnr"] == pytest.approx(np.mean(brute))
    assert sc["class_baseline_ssim"] == pytest.approx(np.mean([ssim(cm[y], x) for x, y in zip(batch.x, batch.y)]))
    assert sc["baseline_ssim"] == pytest.approx(np.mean([ssim(test.x.mean(0), x) for x in batch.x]))
    # with the labels known, the class mean is a much better free guess than the dataset mean
    many = data.take(np.arange(40))
    sc = score(many.x, many.y, many.x, many.y, test.x.mean(0), cm)
    assert sc["class_baseline_psnr"] > sc["baseline_psnr"] + 1.0


def test_epoch_orders_are_the_distinct_ordered_partitions():
    assert len(epoch_orders(4, 2)) == 6  # 4! / (2! 2!)
    assert len(epoch_orders(3, 2)) == 3  # which image is alone in the last batch
    assert len(epoch_orders(4, 4)) == 1


def test_reshuffled_order_is_recovered_for_the_oracle_and_differs_from_the_fixed_assumption(digits):
    data, _ = digits
    batch = data.take([1, 2, 3, 4])
    wrong = 0
    for seed in range(2):
        torch.manual_seed(seed)
        obs = local_observation(build_model("mlp", (1, 8, 8), 10, hidden=(16,)), batch, model_name="mlp", setting="update",
                                lr=0.1, momentum=0.9, local_epochs=2, batch_size=2, seed=seed)
        order = find_batch_order(obs, batch.x, batch.y)
        replay = Replay(obs, "cpu")
        x, y = torch.from_numpy(batch.x), one_hot(torch.from_numpy(batch.y), 10, "cpu")
        scale = float(sum((t * t).sum() for t in replay.target))
        replay.set_order(order)
        found = float(euclidean(replay(x, y), replay.target))
        replay.set_order(None)  # what a server assumes without the order
        fixed = float(euclidean(replay(x, y), replay.target))
        assert found <= 1e-8 * scale, (seed, found, scale)
        wrong += fixed > 1e-4 * scale
    assert wrong >= 1  # the client reshuffles: the fixed-order replay is wrong for some draws


def test_tuned_defaults_and_explicit_overrides():
    cfg = small("attack.name=ig")
    for dataset, tv in TUNED_TV.items():
        assert ATTACKS.get("ig").params_for(cfg.attack, dataset).tv == tv
    assert ATTACKS.get("ig").params_for(cfg.attack, dataset).steps == 4800
    assert ATTACKS.get("ig").params_for(small("attack.name=ig", "attack.tv=0.5").attack, "digits").tv == 0.5
    with pytest.raises(ConfigError, match=r"^attack\.order: unknown value"):
        small("attack.order=sometimes")


def test_attack_results_say_when_the_attack_was_weakened():
    from fedkd.attacks.runner import strength

    entry = ATTACKS.get("ig")
    assert strength(entry, entry.params_for(small("attack.name=ig").attack, "digits")) == "full"
    assert strength(entry, entry.params_for(small("attack.name=ig", "attack.steps=100").attack)) == "weakened (steps 100 < 4800)"
