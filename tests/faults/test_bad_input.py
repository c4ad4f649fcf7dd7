"""Bad input: one line naming the key, exit code 2, no traceback, no run directory, before anything starts."""

import pytest

from fedkd.cli import main

BASE = ["data.num_clients=2", "run.rounds=1", "train.local_epochs=1"]


def _run(args, tmp_path, capsys):
    out_dir = tmp_path / "runs"
    argv = ["run", "--no-progress", "--set", f"run.out_dir={out_dir}"]
    for s in BASE:
        argv += ["--set", s]
    rc = main(argv + args)
    err = capsys.readouterr().err.strip().splitlines()
    assert not out_dir.exists(), "a refused run must leave no run directory"
    return rc, err


@pytest.mark.parametrize(
    "args, key",
    [
        (["--set", "train.lr=inf"], "train.lr"),
        (["--set", "train.lr=nan"], "train.lr"),
        (["--set", "data.alpha=1e400"], "data.alpha"),
        (["--set", "data.client_test_fraction=0"], "data.client_test_fraction"),
        (["--set", "data.server_test_fraction=0"], "data.server_test_fraction"),
        (["--set", "data.server_test_fraction=1.5"], "data.server_test_fraction"),
        (["--set", "run.seed=4294967296"], "run.seed"),
        (["--set", "run.seed=-1"], "run.seed"),
        (["--set", 'run.rounds="3"'], "run.rounds"),
        (["--set", "run.rounds=2.5"], "run.rounds"),
        (["--set", "run.rounds=true"], "run.rounds"),
        (["--set", 'train.lr="0.1"'], "train.lr"),
        (["--set", "strategy.min_replies=3"], "strategy.min_replies"),
        (["--set", "simulation.round_timeout=0"], "simulation.round_timeout"),
        (["--set", "simulation.ray_address=127.0.0.1:1"], "simulation.ray_address"),
        (["--set", "simulation.ray_address=nohost"], "simulation.ray_address"),
        (["--set", "run.out_dir=/dev/null/x"], "run.out_dir"),
        (["--resume", "/nonexistent/run"], "--resume"),
    ],
)
def test_bad_value_is_one_line_exit_2(args, key, tmp_path, capsys):
    rc, err = _run(args, tmp_path, capsys)
    assert rc == 2
    assert len(err) == 1 and err[0].startswith(f"fedkd: error: {key}: "), err


def test_out_under_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    rc, err = _run(["--out", str(tmp_path / "afile" / "sub")], tmp_path, capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("fedkd: error: --out: "), err
    assert (tmp_path / "afile").read_text() == "x"


def test_string_number_in_toml_is_refused(tmp_path, capsys):
    conf = tmp_path / "exp.toml"
    conf.write_text('[run]\nrounds = "3"\n')
    rc = main(["run", str(conf), "--set", f"run.out_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["fedkd: error: run.rounds: must be an integer (got '3')"]
    assert not (tmp_path / "runs").exists()


def test_cuda_without_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc, err = _run(["--set", "run.device=cuda"], tmp_path, capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("fedkd: error: run.device: "), err


def test_hub_dataset_offline_fails_fast_naming_data_dir(tmp_path, capsys, monkeypatch):
    """mnist without data_dir and no network: a one-line data.data_dir error, not a minute of retries."""
    import time

    import fedkd.preflight as pf

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "0")
    import datasets.config as dc
    import huggingface_hub.constants as hc

    monkeypatch.setattr(dc, "HF_HUB_OFFLINE", dc.HF_HUB_OFFLINE)
    monkeypatch.setattr(dc, "HF_DATASETS_OFFLINE", dc.HF_DATASETS_OFFLINE)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", hc.HF_HUB_OFFLINE)
    monkeypatch.setattr(pf, "reachable", lambda host, port, timeout=3.0: "unreachable in this test")
    t = time.perf_counter()
    rc, err = _run(["--set", "data.dataset=mnist"], tmp_path, capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("fedkd: error: data.data_dir: "), err
    assert time.perf_counter() - t < 30
