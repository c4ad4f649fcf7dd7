"""End-to-end federations through both simulation paths (4 clients, 2 rounds)."""

import json

import pandas as pd
import pytest

from flwr.app import ArrayRecord

from fedkd.cli import main
from fedkd.models import build_model
from fedkd.experiment import run_experiment
from tests.conftest import small


def check_run_dir(path, rounds=2):
    assert (path / "config.toml").is_file()
    summary = json.loads((path / "summary.json").read_text())
    for key in ("strategy", "dataset", "rounds", "accuracy", "loss", "wall_s", "rounds_wall_s", "bytes_up", "bytes_down", "epsilon", "delta"):
        assert key in summary
    df = pd.read_csv(path / "metrics.csv", dtype={"node": str})
    assert list(df.columns) == ["round", "node", "split", "metric", "value"]
    assert set(df["round"]) == set(range(rounds + 1))
    assert {"server", "0", "1", "2", "3"} <= set(df["node"])
    return summary, df


def test_fast_path_end_to_end_and_reproducible(tmp_path):
    cfg = small("train.local_epochs=2", "privacy.reproducible_noise=true")  # client randomness is private unless this debug switch is on
    a = run_experiment(cfg, tmp_path / "a", progress=False)
    b = run_experiment(cfg, tmp_path / "b", progress=False)
    summary, df = check_run_dir(tmp_path / "a")
    assert summary["status"] == "ok" and summary["accuracy"] > 0.5
    model = build_model("mlp", (1, 8, 8), 10)
    per_model = sum(len(a.data) for a in ArrayRecord(model.state_dict()).values())
    assert per_model >= 4 * sum(p.numel() for p in model.parameters())  # float32 + array headers
    # 4 clients x 2 rounds send their models up; down: train + evaluate messages
    assert summary["bytes_up_arrays"] == 4 * 2 * per_model and summary["bytes_up"] > summary["bytes_up_arrays"]
    assert summary["bytes_down"] == 2 * 4 * 2 * per_model
    a_csv = pd.read_csv(tmp_path / "a" / "metrics.csv")
    b_csv = pd.read_csv(tmp_path / "b" / "metrics.csv")
    keep = lambda d: d[d["split"] != "time"].reset_index(drop=True)  # noqa: E731  (round_s is wall time)
    pd.testing.assert_frame_equal(keep(a_csv), keep(b_csv))
    assert a["accuracy"] == b["accuracy"]


def test_flower_run_simulation_path(tmp_path):
    summary = run_experiment(small("simulation.backend=flower", "strategy.name=fedprox"), tmp_path / "f", progress=False)
    s, df = check_run_dir(tmp_path / "f")
    assert s["status"] == "ok" and s["strategy"] == "fedprox" and s["accuracy"] > 0.3


def test_dp_sgd_federation_reports_epsilon_per_client_and_round(tmp_path):
    s = run_experiment(small("privacy.mechanism=dp-sgd", "privacy.noise_multiplier=1.0", "model.name=cnn"), tmp_path / "dp", progress=False)
    _, df = check_run_dir(tmp_path / "dp")
    eps = df[df["metric"] == "epsilon"]
    assert len(eps) == 4 * 2  # every client, every round
    per_client = eps.pivot_table(index="node", columns="round", values="value")
    assert (per_client[2] > per_client[1]).all()  # composed over rounds
    assert s["epsilon"] == pytest.approx(eps["value"].max()) and s["delta"] == 1e-5 and s["privacy_unit"] == "record"


def test_cli_run_and_report(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["run", "--set", "data.num_clients=3", "--set", "run.rounds=1", "--set", "train.local_epochs=1", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "test_accuracy" in printed and "summary" in printed
    assert main(["report", str(out)]) == 0
    assert (out / "accuracy.png").stat().st_size > 1000 and (out / "loss.png").is_file()
    assert main(["run", "--set", "run.rounds=1", "--out", str(out)]) == 2  # never overwrite a run
