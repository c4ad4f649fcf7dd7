"""Gradient inversion: label recovery, DLG/IG reconstructions, DP-SGD as a defence, observation checks,
and one recorded federation attacked end to end (in-process grid, no Ray)."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from fedkd.config import ConfigError, DataConfig
from fedkd.data import load_federation
from fedkd.models import build_model, init_uniform
from fedkd.training import DPSGD

from fedkd.attacks import ATTACKS, ObservationError, Observation, run_attack
from fedkd.attacks.dia import DIAParams, dia
from fedkd.attacks.dlg import DLGParams, dlg
from fedkd.attacks.idlg import idlg_labels
from fedkd.attacks.ig import IGParams, ig
from fedkd.attacks.metrics import label_accuracy, psnr, score
from fedkd.attacks.observation import local_observation

from .conftest import small


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny models: one torch thread (tests/conftest.py)


@pytest.fixture(scope="module")
def digits():
    fed = load_federation(DataConfig(partitioner="iid", num_clients=2), 0)
    return fed.clients[0].train, fed.server_test.x.mean(0)


def lenet(seed):
    torch.manual_seed(seed)
    return init_uniform(build_model("lenet", (1, 8, 8), 10), seed=seed)


def test_idlg_recovers_the_label_of_every_single_image(digits):
    data, _ = digits
    for trial, i in enumerate([0, 7, 19, 33, 48, 61, 75, 90]):
        one = data.take([i])
        for name, model in (("lenet", lenet(trial)), ("cnn", build_model("cnn", (1, 8, 8), 10))):
            obs = local_observation(model, one, model_name=name, lr=0.05, momentum=0.9, weight_decay=5e-4, seed=trial)
            assert idlg_labels(obs).tolist() == [int(one.y[0])], (trial, name)


def test_dlg_reconstructs_one_digit_on_sigmoid_lenet(digits):
    data, mean = digits
    one = data.take([3])
    obs = local_observation(lenet(0), one, model_name="lenet", lr=0.1)
    rec = dlg(obs, DLGParams(steps=20), seed=0)
    sc = score(rec.images.numpy(), rec.labels.numpy(), one.x, one.y, mean)
    assert sc["psnr"] >= 30.0, sc["psnr"]
    assert sc["label_acc"] == 1.0 and sc["baseline_psnr"] < 20


def test_dp_sgd_noise_brings_ig_down_to_the_mean_image_baseline(digits):
    data, mean = digits
    one = data.take([5])
    params = IGParams(steps=100, restarts=2)
    clean = local_observation(lenet(1), one, model_name="lenet", lr=0.1)
    noisy = local_observation(lenet(1), one, model_name="lenet", lr=0.1, dp=DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5))
    s_clean = score(ig(clean, params).images.numpy(), [0], one.x, one.y, mean)
    s_noisy = score(ig(noisy, params).images.numpy(), [0], one.x, one.y, mean)
    assert s_clean["psnr"] > s_clean["baseline_psnr"] + 5  # the attack works without the defence
    assert s_noisy["psnr"] <= s_noisy["baseline_psnr"] + 2.0, (s_noisy["psnr"], s_noisy["baseline_psnr"])


def test_attacks_refuse_observations_that_lack_what_they_need(digits):
    data, _ = digits
    obs = local_observation(lenet(0), data.take([1]), model_name="lenet")
    with pytest.raises(ObservationError, match="dia: .*without dropout"):
        dia(obs, DIAParams(steps=1))
    with pytest.raises(ObservationError, match="dlg: .*has no reply arrays"):
        dlg(dataclasses.replace(obs, reply_state=None), DLGParams(steps=1))
    no_count = dataclasses.replace(obs, training=dataclasses.replace(obs.training, num_examples=0))
    with pytest.raises(ObservationError, match="ig: .*how many examples"):
        ig(no_count, IGParams(steps=1, restarts=1))


def test_dia_and_update_setting_run_and_batched_restarts_match_sequential(digits):
    data, _ = digits
    four = data.take([0, 1, 2, 3])
    torch.manual_seed(0)
    drop = build_model("mlp", (1, 8, 8), 10, hidden=(32,), dropout=0.3)
    obs = local_observation(drop, four, model_name="mlp", setting="update", lr=0.05, momentum=0.9, local_epochs=1, batch_size=2)
    assert obs.training.steps == 2 and obs.model_hidden == (32,)
    rec = dia(obs, DIAParams(steps=3, restarts=2))
    assert rec.images.shape == (4, 1, 8, 8) and len(rec.restart_losses) == 2
    a = ig(obs, IGParams(steps=5, restarts=3, batched=True), seed=1)
    b = ig(obs, IGParams(steps=5, restarts=3, batched=False), seed=1)
    assert np.allclose(a.restart_losses, b.restart_losses, atol=1e-4)


def test_metrics():
    x = np.random.default_rng(0).random((3, 1, 8, 8)).astype(np.float32)
    assert psnr(x[0], x[0]) == pytest.approx(100.0)
    assert psnr(np.zeros((1, 2, 2)), np.full((1, 2, 2), 0.1)) == pytest.approx(20.0)
    sc = score(x[::-1].copy(), [1, 2, 2], x, np.array([2, 1, 3]), x.mean(0))  # reversed order is matched back
    assert sc["psnr"] == pytest.approx(100.0) and sc["ssim"] == pytest.approx(1.0)
    assert label_accuracy([1, 2, 2], [2, 1, 3]) == pytest.approx(2 / 3)


def test_attack_config_keys():
    with pytest.raises(ConfigError, match="attack.name: unknown value 'nope'; valid: dia, dlg, hyperfl-dia, hyperfl-ig, hyperfl-rank1, idlg, ig"):
        small("attack.name=nope")
    with pytest.raises(ConfigError, match="attack.setting"):
        small("attack.setting=weights")
    with pytest.raises(ConfigError, match="attack.rounds: round 5 outside"):
        small("attack.rounds=[5]", "attack.clients=[0]")
    assert not small().attack.active and sorted(ATTACKS.names()) == ["dia", "dlg", "hyperfl-dia", "hyperfl-ig", "hyperfl-rank1", "idlg", "ig"]


def test_recorded_federation_is_attacked_end_to_end(tmp_path):
    from fedkd.attacks.inline import run_inline
    from fedkd.cli import main

    cfg = small("model.name=lenet", "attack.rounds=[2]", "attack.clients=[1]", "attack.batch_size=1", "train.momentum=0.0")
    summary = run_inline(cfg, tmp_path / "run")
    assert summary["status"] == "ok" and summary["rounds_completed"] == 2
    files = sorted(p.name for p in (tmp_path / "run" / "observations").iterdir())
    assert files == ["round0002-client0001.pt"]
    obs = Observation.load(tmp_path / "run" / "observations" / files[0])
    assert obs.training.setting == "gradient" and obs.training.num_examples == 1 and obs.model_name == "lenet"
    assert main(["attack", str(tmp_path / "run"), "--set", "attack.name=idlg", "--set", "attack.steps=3"]) == 0
    out = json.loads((tmp_path / "run" / "attack.json").read_text())
    for key in ("attack", "defence", "psnr", "ssim", "label_acc", "baseline_psnr", "wall_s"):
        assert key in out
    assert out["label_acc"] == 1.0 and len(out["observations"][0]["per_image"]) == 1
    assert (tmp_path / "run" / "attack.png").stat().st_size > 0
    assert main(["attack", str(tmp_path / "run"), "--set", "attack.batch_size=4"]) == 2  # fixed at recording time
    assert main(["attack", str(tmp_path / "run"), "--set", "attack.name=dia"]) == 2  # no dropout: one-line refusal


def test_update_setting_is_recorded_with_the_known_local_steps(tmp_path):
    from fedkd.attacks.inline import run_inline

    cfg = small("model.name=cnn", "attack.setting=update", "attack.batch_size=4", "train.batch_size=2",
                "attack.rounds=[1]", "attack.clients=[0,3]", "run.rounds=1")
    run_inline(cfg, tmp_path / "run")
    obs = [Observation.load(p) for p in sorted((tmp_path / "run" / "observations").iterdir())]
    assert [o.partition_id for o in obs] == [0, 3]
    t = obs[0].training
    assert (t.setting, t.num_examples, t.batch_size, t.local_epochs, t.steps, t.momentum) == ("update", 4, 2, 1, 2, 0.9)
    rec = run_attack(obs[0], dataclasses.replace(cfg.attack, name="ig", steps=2, restarts=1))
    assert rec.images.shape == (4, 1, 8, 8)
    run_inline(small("run.rounds=1"), tmp_path / "plain")  # no attack section set: nothing recorded
    assert not (tmp_path / "plain" / "observations").exists()


def test_rqm_replies_are_decoded_as_the_server_reads_them_and_ig_falls(tmp_path):
    """Under RQM the server sees level indices; the observation holds what its wrapper decodes."""
    from fedkd.attacks.inline import run_inline

    cfg = small("model.name=lenet", "attack.rounds=[1]", "attack.clients=[0]", "attack.batch_size=1", "train.momentum=0.0",
                "run.rounds=1", "privacy.mechanism=rqm", "privacy.target_epsilon=64")
    assert run_inline(cfg, tmp_path / "run")["status"] == "ok"
    obs = Observation.load(next((tmp_path / "run" / "observations").iterdir()))
    assert obs.reply_state is not None and all(v.is_floating_point() for v in obs.reply_state.values())
    change = max((obs.reply_state[k] - obs.global_state[k]).abs().max().item() for k in obs.global_state)
    assert change > 0.1  # quantization noise of extend ~66 dwarfs one SGD step
    res = run_attack(obs, dataclasses.replace(cfg.attack, name="ig", steps=30, restarts=1))
    fed = load_federation(cfg.data, cfg.run.seed)
    from fedkd.clients.attacked import attacked_batch

    truth = attacked_batch(cfg, fed, 1, 0)
    assert psnr(res.images.numpy(), truth.x) < 15.0
