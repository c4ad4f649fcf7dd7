"""Membership inference on real fedkd federations (in-process grid, the same ServerApp logic, strategies,
privacy wrappers and ClientApp as `fedkd run`): subject MIA from every round's global model,
subject-level DP as a privacy mechanism, and `fedkd audit` catching a mechanism whose noise is 100x
too small for its accountant."""

import json

import numpy as np
import pytest
import torch

from fedkd.attacks import federations
from fedkd.attacks import membership as mb
from fedkd.attacks import mia_metrics as mm
from fedkd.attacks import subject_mia as sm
from fedkd.config import ConfigError, load_config
from fedkd.data import load_federation
from fedkd.privacy import subject_dp_mechanism as sdm
from fedkd.privacy.audit_run import run_audit


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (tests/conftest.py)


SUBJECTS = [
    "data.dataset=synthetic-subjects", "data.partitioner=subject", "data.num_clients=4", "data.num_subjects=24",
    "data.subjects_per_client=6", "data.clients_per_subject=2", "data.records_per_subject=20", "data.subject_separation=5.0",
    "data.client_test_fraction=0", "model.hidden=[128, 128]", "train.local_epochs=2", "train.batch_size=16", "strategy.fraction_evaluate=0",
]


def _adversary(fed, known_per_side=3, n=30, seed=1):
    """Fresh samples of every subject's distribution and a few subjects of known membership."""
    model, members = fed.extras["subject_model"], fed.extras["members"]
    rng = np.random.default_rng(seed)
    xs, ys, ss = [], [], []
    for s in range(model.num_subjects):
        x, y = model.sample(s, n, rng)
        xs.append(x), ys.append(y), ss.append(np.full(n, s))
    known = np.r_[np.flatnonzero(members)[:known_per_side], np.flatnonzero(~members)[:known_per_side]]
    return mb.SubjectSamples(np.concatenate(xs), np.concatenate(ys), np.concatenate(ss)), mb.KnownMembership(known, members[known])


def test_subject_mia_on_a_real_federation_with_every_rounds_global_model(tmp_path):
    # reproducible_noise: the clients' shuffles come from run.seed, so the attack's AUC is the same on every run
    cfg = load_config(None, SUBJECTS + ["run.rounds=6", "membership.record_global_models=true", "privacy.reproducible_noise=true"])
    summary, rounds = federations.run_federation(cfg, out=tmp_path / "run")
    assert [m.server_round for m in rounds.models] == list(range(7))  # the initial model and one per round
    assert sorted(p.name for p in (tmp_path / "run" / "global_models").iterdir()) == [f"round{r:04d}.pt" for r in range(6)]
    fed = load_federation(cfg.data, cfg.run.seed)
    samples, known = _adversary(fed)
    truth = fed.extras["members"]
    final = sm.loss_threshold(rounds.models[-1], samples, known)
    across = sm.loss_across_rounds(rounds, samples, known)
    unseen = sm.unknown_subjects(final, known)
    assert mm.auc(final.scores[unseen], truth[unseen]) > 0.8, summary
    assert mm.auc(across.scores[unseen], truth[unseen]) > 0.6  # weaker than the final-model threshold (0.67 here)


def test_subject_dp_refuses_what_it_cannot_protect_before_anything_starts():
    with pytest.raises(ConfigError, match="privacy.mechanism: subject-dp needs records with subject ids"):
        load_config(None, ["privacy.mechanism=subject-dp", "privacy.noise_multiplier=1.0"])
    with pytest.raises(ConfigError, match="privacy.noise_multiplier"):
        load_config(None, SUBJECTS + ["privacy.mechanism=subject-dp"])
    with pytest.raises(ConfigError, match="not supported by strategy 'fd'"):
        load_config(None, SUBJECTS + ["privacy.mechanism=subject-dp", "privacy.noise_multiplier=1.0", "strategy.name=fd"])
    with pytest.raises(ConfigError, match="subject_dp.subjects_per_step"):
        load_config(None, SUBJECTS + ["subject_dp.subjects_per_step=0"])


def test_subject_dp_run_names_the_subject_and_meets_its_target():
    cfg = load_config(None, SUBJECTS + ["run.rounds=2", "privacy.mechanism=subject-dp", "privacy.target_epsilon=3.0", "subject_dp.subjects_per_step=3"])
    summary, rounds = federations.run_federation(cfg)
    assert summary["status"] == "ok" and summary["privacy_unit"] == "subject"
    assert "one subject" in summary["privacy_neighbouring"] and "silo" in summary["privacy_guarantee"]
    assert 2.0 < summary["epsilon"] <= 3.0  # calibrated sigma: the accountant lands just under the target
    # each member sits on 2 silos: composing over both is what the accountant claims (per silo it is less)
    fed = sdm.federation_for(cfg)
    assert max(len(h) for h in sdm.holders(fed)) == 2
    assert len(rounds.models) == 3


def test_audit_catches_subject_dp_with_noise_scaled_down_100x(tmp_path, monkeypatch):
    """Subject canaries (each in w.p. 1/2); the accountant claims epsilon <= 1. Honest noise passes; the same
    mechanism with its noise divided by 100 (accountant unchanged) is caught by the one-run bound."""
    cfg = load_config(None, SUBJECTS + [
        "data.num_subjects=12", "data.subjects_per_client=2", "data.records_per_subject=6", "run.rounds=2", "train.local_epochs=1",
        "train.lr=0.5", "train.momentum=0", "model.hidden=[32]", "privacy.mechanism=subject-dp", "privacy.target_epsilon=1.0",
        "subject_dp.subjects_per_step=40", "audit.canaries=300", "audit.records_per_canary=2",
    ])
    honest = run_audit(cfg, out_dir=tmp_path / "honest", echo=lambda *_: None)
    assert honest["ok"] and honest["claimed_epsilon"] <= 1.0 and honest["unit"] == "subject", honest["verdict"]
    monkeypatch.setattr(sdm, "NOISE_SCALE", 0.01)
    broken = run_audit(cfg, out_dir=tmp_path / "broken", echo=lambda *_: None)
    assert not broken["ok"] and "audit FAILED" in broken["verdict"], broken["bounds"]
    assert broken["bounds"]["one-run"]["epsilon"] > 1.0 >= broken["claimed_epsilon"] > 0.9  # the same accountant, calibrated to 1
    assert json.loads((tmp_path / "broken" / "audit.json").read_text())["ok"] is False


def test_audit_cli_exit_codes(tmp_path, capsys):
    from fedkd.cli import main

    assert main(["audit", "--set", "audit.canaries=1"]) == 2
    assert "audit.canaries" in capsys.readouterr().err
    assert main(["audit", "--set", "privacy.mechanism=dp-sgd", "--set", "privacy.noise_multiplier=1.0", "--set", "audit.kind=subject"]) == 2
    code = main(["audit", *sum((["--set", s] for s in SUBJECTS + ["run.rounds=2", "audit.canaries=20", "model.hidden=[16]"]), []), "--out", str(tmp_path / "a")])
    assert code == 0 and "no finite record-level claim" in capsys.readouterr().out  # no mechanism: bounds only
    run_dir = tmp_path / "run"  # a run directory: its config.toml is the experiment audited
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(load_config(None, SUBJECTS + ["run.rounds=2", "audit.canaries=20", "model.hidden=[16]"]).to_toml())
    assert main(["audit", str(run_dir), "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "audit.json").read_text())["canaries"] == 20
    assert main(["audit", str(tmp_path / "a")]) == 2  # a directory without config.toml


def test_record_mia_with_reference_federations(tmp_path):
    """Target and reference federations are real fedkd runs; each trains on its own half of the candidates."""
    from fedkd.attacks.shadow_federations import run_record_mia

    cfg = load_config(None, [
        "data.dataset=digits", "data.partitioner=iid", "data.num_clients=2", "data.server_test_fraction=0.5", "data.client_test_fraction=0",
        "data.max_samples=600", "model.hidden=[128]", "run.rounds=3", "train.local_epochs=10", "strategy.fraction_evaluate=0",
        "privacy.reproducible_noise=true",  # seeded shuffles: the same federations, and the same scores, on every run
    ])
    res = run_record_mia(cfg, candidates=150, references=2, out_dir=tmp_path, parallel=False, seed=0)
    rows = {r["attack"]: r for r in res.rows}
    assert set(rows) == {"loss", "lira-online", "lira-offline", "rmia-online"} and len(res.summaries) == 3
    loss = -res.scores["loss"]
    assert np.median(loss[res.truth]) < np.median(loss[~res.truth])  # the target did train on its half (members fit better)
    assert rows["lira-online"]["members"] == int(res.truth.sum()) and rows["loss"]["references"] == 2


def test_feddf_global_model_is_recorded_as_the_model_it_deploys(one_thread):
    """FedDF packs one model per architecture group ("cnn/0.weight"): the recorder keeps the experiment's group,
    which loads into the architecture and scores what summary.json's accuracy scores."""
    cfg = load_config(None, ["data.dataset=digits", "data.num_clients=2", "run.rounds=2", "train.local_epochs=1", "model.name=cnn",
                             "strategy.name=feddf", "feddf.max_steps=20", "feddf.eval_every=10", "feddf.patience=20",
                             "strategy.fraction_evaluate=0"])
    summary, rounds = federations.run_federation(cfg)
    fed = load_federation(cfg.data, cfg.run.seed)
    assert [m.server_round for m in rounds.models] == [0, 1, 2]
    acc = float((mb.logits_of(rounds.models[-1], fed.server_test.x).argmax(1) == fed.server_test.y).mean())
    assert acc == pytest.approx(summary["accuracy"])
