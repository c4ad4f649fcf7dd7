import subprocess
import sys

import pytest

from fedkd.cli import main
from fedkd.config import ConfigError, load_config


def test_defaults_are_the_default_experiment():
    cfg = load_config()
    assert (cfg.data.dataset, cfg.data.num_clients, cfg.data.partitioner, cfg.data.alpha) == ("digits", 10, "dirichlet", 0.5)
    assert cfg.model.name == ("mlp",) and cfg.model.hidden == (64, 64)
    assert (cfg.train.local_epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.momentum) == (5, 32, 0.05, 0.9)
    assert (cfg.strategy.name, cfg.run.rounds, cfg.run.seed, cfg.simulation.backend) == ("fedavg", 10, 0, "fast")


def test_file_and_overrides_and_round_trip(tmp_path):
    p = tmp_path / "e.toml"
    p.write_text('[run]\nrounds = 3\n[model]\nname = ["mlp", "cnn"]\n[strategy]\nname = "fedavg"\n')
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.key == "model.name"
    cfg = load_config(p, ["model.name=cnn", "data.alpha=0.3", "privacy.target_epsilon=none"])
    assert cfg.run.rounds == 3 and cfg.model.name == ("cnn",) and cfg.data.alpha == 0.3
    again = tmp_path / "again.toml"
    again.write_text(cfg.to_toml())
    assert load_config(again) == cfg


@pytest.mark.parametrize(
    "override,key",
    [
        ("data.alpha=-1", "data.alpha"),
        ("data.alpha=0", "data.alpha"),
        ("data.dataset=nope", "data.dataset"),
        ("strategy.name=nope", "strategy.name"),
        ("model.name=nope", "model.name"),
        ("data.partitioner=nope", "data.partitioner"),
        ("data.nope=1", "data.nope"),
        ("nope.key=1", "nope.key"),
        ("run.rounds=0", "run.rounds"),
        ("run.rounds=1.5", "run.rounds"),
        ("train.lr=fast", "train.lr"),
        ("simulation.backend=slow", "simulation.backend"),
        ("privacy.mechanism=dp-sgd", "privacy.noise_multiplier"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert e.value.key == key
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override,key", [("data.alpha=-1", "data.alpha"), ("data.dataset=nope", "data.dataset"), ("data.num_clients=100000", "data.num_clients")])
def test_cli_exits_2_with_one_line_and_no_run_dir(tmp_path, capsys, override, key):
    out = tmp_path / "run"
    assert main(["run", "--set", override, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and key in err and "Traceback" not in err
    assert not out.exists()


def test_cli_subprocess_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fedkd", "run", "--set", "data.dataset=nope", "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("fedkd: error: data.dataset:") and "Traceback" not in r.stderr
    assert not (tmp_path / "r").exists()
