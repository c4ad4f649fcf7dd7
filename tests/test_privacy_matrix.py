"""Every (strategy x mechanism) pair either runs the mechanism for real and reports a guarantee that
describes what ran, or is refused before anything starts (ConfigError naming privacy.mechanism; exit 2)."""

import pytest
import torch

from fedkd.attacks.inline import InlineGrid
from fedkd.config import PRIVACY_MECHANISMS, ConfigError
from fedkd.results import RunRecorder
from fedkd.server import run_server
from fedkd.strategies import STRATEGIES
from tests.conftest import small

TINY = [
    "data.num_clients=2", "run.rounds=1", "data.partitioner=iid", "data.max_samples=240", "model.hidden=[8]",
    "train.batch_size=32", "fedmd.public_epochs=1", "fedmd.private_epochs=1", "fedmd.alignment_size=16",
    "feddf.max_steps=2", "feddf.eval_every=1", "feddf.patience=1", "strategy.fraction_evaluate=0",
]
# What a strategy needs to run at all (its model family, its data); the rest of TINY applies.
STRATEGY_SETTINGS = {
    "fedlgd": ["model.name=convnet-w32", "data.dataset=digits-domains", "data.partitioner=domain", 'data.domains=["gray", "inverted"]',
               "data.max_samples=300", "train.local_epochs=1", "fedlgd.ipc=2", "fedlgd.server_ipc=1", "fedlgd.warmup_iterations=2",
               "fedlgd.dm_iterations=2", "fedlgd.gm_iterations=2", "fedlgd.real_batch=8"],
    "hyperfl": ["model.name=hyperfl-cnn", "hyperfl.hnet_epochs=1"],
    "pfedhn": ["model.name=pfedhn-cnn", "pfedhn.inner_steps=3"],
    "pfedhn-pc": ["model.name=pfedhn-cnn", "pfedhn.inner_steps=3"],
}
SETTINGS = {
    "none": [],
    "dp-sgd": ["privacy.noise_multiplier=1.0"],
    "rqm": ["privacy.target_epsilon=64"],
    "pbm": ["privacy.target_epsilon=64"],
    "gaussian": ["privacy.noise_multiplier=1.0"],
    "subject-dp": ["privacy.noise_multiplier=1.0"],
}
# Data a mechanism needs, applied where the strategy runs it (subject-level DP needs records with subject ids).
MECHANISM_DATA = {"subject-dp": ["data.dataset=synthetic-subjects", "data.num_subjects=8", "data.records_per_subject=20",
                                 "data.subjects_per_client=2"]}
UNIT = {"dp-sgd": ("record", "add/remove", "local"), "rqm": ("client", "replace", "local"),
        "pbm": ("client", "replace", "local"), "gaussian": ("client", "zero-out", "central"),
        "subject-dp": ("subject", "add/remove", "local")}


def summary_of(cfg):
    from fedkd.server import summarize

    recorder = RunRecorder(None)
    threads = torch.get_num_threads()
    try:
        run_server(InlineGrid(cfg.data.num_clients), cfg, recorder, progress=False, echo=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    import fedkd.server as server

    write = server.write_summary
    server.write_summary = lambda out_dir, s: s
    try:
        return summarize(cfg, recorder, 0.0)
    finally:
        server.write_summary = write


@pytest.mark.parametrize("strategy", STRATEGIES.names())
def test_every_pair_runs_with_a_guarantee_or_is_refused(strategy):
    entry = STRATEGIES.get(strategy)
    assert set(entry.mechanisms) <= set(PRIVACY_MECHANISMS) and "none" in entry.mechanisms
    for mech in PRIVACY_MECHANISMS:
        overrides = [f"strategy.name={strategy}", f'privacy.mechanism="{mech}"', *TINY, *STRATEGY_SETTINGS.get(strategy, []), *SETTINGS[mech]]
        if mech not in entry.mechanisms:
            with pytest.raises(ConfigError) as e:  # refused on the mechanism itself, before any other check
                small(*overrides)
            assert e.value.key == "privacy.mechanism" and "\n" not in str(e.value) and strategy in str(e.value)
            continue
        s = summary_of(small(*overrides, *MECHANISM_DATA.get(mech, [])))
        assert s["status"] == "ok" and s["rounds_completed"] == 1 and not s["failures"], (strategy, mech, s["failures"])
        if mech == "none":
            assert s["epsilon"] is None
            continue
        assert s["epsilon"] is not None and 0 < s["epsilon"] < float("inf"), (strategy, mech)
        assert (s["privacy_unit"], s["privacy_relation"], s["privacy_trust_model"]) == UNIT[mech]
        fig = s["privacy_figures"][0]
        assert fig["name"] == "epsilon" and fig["epsilon"] == s["epsilon"] and not fig["hypothetical"]
        assert s["privacy_noise_source"] == "os-entropy"
        assert any(m.endswith(":loss") for m in s["privacy_outside_guarantee"])  # train losses leave in the clear


def test_unregistered_strategies_refuse_every_mechanism():
    from fedkd.strategies import hyperfl, pfedhn

    for entry in (hyperfl.ENTRY, pfedhn.ENTRY, pfedhn.ENTRY_PC):
        assert entry.mechanisms == ("none",)
    with pytest.raises(ConfigError, match="privacy.mechanism"):
        small("strategy.name=fd", "privacy.mechanism=dp-sgd", "privacy.noise_multiplier=1")


def test_refusal_is_one_line_exit_2_and_no_run_directory(tmp_path, capsys):
    from fedkd.cli import main

    out = tmp_path / "run"
    code = main(["run", "--set", "strategy.name=fd", "--set", "privacy.mechanism=rqm", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "privacy.mechanism" in err and not out.exists()


def test_fedprox_with_dp_sgd_uses_mu_end_to_end():
    """On main mu=100 and mu=0 gave bit-identical weights under dp-sgd. Same (reproducible) noise here,
    so any difference comes from mu."""
    out = {}
    for mu in (0.0, 100.0):
        cfg = small("strategy.name=fedprox", f"strategy.proximal_mu={mu}", "privacy.mechanism=dp-sgd", "privacy.noise_multiplier=1.0",
                    "privacy.reproducible_noise=true", *TINY)
        threads = torch.get_num_threads()
        try:
            res = run_server(InlineGrid(2), cfg, RunRecorder(None), progress=False, echo=lambda s: None)
        finally:
            torch.set_num_threads(threads)
        out[mu] = torch.cat([torch.as_tensor(a.numpy()).flatten() for a in res.arrays.values()])
    assert not torch.allclose(out[0.0], out[100.0])
