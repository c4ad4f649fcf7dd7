"""The defence benchmark (fedkd/bench): its statistics, one tiny grid through every stage and output, resumption,
refusals and failures."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from fedkd.bench import defenses as bd
from fedkd.bench.stats import t_interval
from fedkd.cli import main


def test_t_interval_matches_scipy_and_covers_the_mean_at_its_level():
    from scipy import stats

    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, 5)
    mean, half = t_interval(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert mean == pytest.approx(x.mean()) and mean - half == pytest.approx(lo) and mean + half == pytest.approx(hi)
    # brute force: over many draws of 3 seeds the 95% interval covers the true mean about 95% of the time
    covered = [abs(t_interval(d)[0] - 1.0) <= t_interval(d)[1] for d in rng.normal(1.0, 1.0, (4000, 3))]
    assert 0.94 < np.mean(covered) < 0.96
    assert math.isnan(t_interval([0.7])[1])  # one seed: no spread is claimed
    with pytest.raises(ValueError):
        t_interval([])


def _args(tmp_path, *extra):
    return ["bench", "defenses", "--quick", "--attack-steps", "5", "--rounds", "1", "--clients", "2", "--local-epochs", "1",
            "--candidates", "20", "--references", "2", "--canaries", "20", "--workers", "1", "--out", str(tmp_path / "b"), *extra]


@pytest.fixture
def refused_row(monkeypatch):
    """A row the framework must refuse: DP-SGD on FD, whose clients upload logits (no mechanism can wrap them)."""
    entries = dict(bd.DEFENCES._entries)
    entries["fd-dp-sgd"] = bd.Defence(("strategy.name=fd", "privacy.mechanism=dp-sgd", "privacy.target_epsilon=8"), "refused on purpose",
                                      inversion=(), global_model=False, datasets=("digits",))
    monkeypatch.setattr(bd.DEFENCES, "_entries", entries)


def test_a_tiny_grid_runs_every_stage_and_writes_every_output(tmp_path, refused_row, capsys, one_thread):
    # two cells at a time as Ray tasks (the parallel path), then the refused row (registered here only: in this process)
    assert main(_args(tmp_path, "--datasets", "digits", "--defences", "none", "fd", "--seeds", "0", "1", "--workers", "2")) == 0
    assert main(_args(tmp_path, "--datasets", "digits", "--defences", "none", "fd", "fd-dp-sgd", "--seeds", "0", "1")) == 0
    out = tmp_path / "b"
    df = pd.read_csv(out / "defenses.csv")
    none = df[df["defence"] == "none"]
    for metric in ("accuracy", "personal_accuracy", "bytes_up", "wall_s", "psnr", "class_baseline_psnr", "baseline_psnr", "record_auc",
                   "record_tpr_at_1pct_fpr", "record_lira-offline_auc", "audit_epsilon_lb"):
        assert sorted(none[none["metric"] == metric]["seed"]) == [0, 1], metric
    assert none[none["metric"] == "attack_steps"]["value"].eq(5).all()  # the budget asked for, not the paper's
    fd = df[df["defence"] == "fd"]
    assert "accuracy" in set(fd["metric"]) and not {"psnr", "record_auc", "audit_epsilon_lb"} & set(fd["metric"])
    cells = pd.read_csv(out / "cells.csv")
    refused = cells[cells["defence"] == "fd-dp-sgd"]
    assert (refused["status"] == "refused").all() and refused["reason"].str.contains("privacy.mechanism").all()
    assert "no model or gradient is uploaded" in cells[cells["defence"] == "fd"]["not_applicable"].iloc[0]
    md = (out / "defenses.md").read_text()
    assert "WEAKENED" in md and "| none | 2 |" in md and "±" in md and "| fd-dp-sgd | 0 | refused" in md
    assert (out / "defenses-digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page and "fd-dp-sgd" in page and "refused" in page

    # a rerun skips every finished cell and rebuilds the same table
    capsys.readouterr()
    assert main(_args(tmp_path, "--datasets", "digits", "--defences", "none", "fd", "fd-dp-sgd", "--seeds", "0", "1", "0")) == 0
    assert "6 cells, 6 done before, 0 to run" in capsys.readouterr().out  # and seed 0 twice is one cell
    assert pd.read_csv(out / "defenses.csv").equals(df)


def test_a_failed_stage_loses_the_stages_before_it_nothing_and_is_retried(tmp_path, monkeypatch, one_thread):
    calls = []
    real_utility = bd.STAGE_FNS["utility"]

    def utility(*a):
        calls.append("utility")
        return real_utility(*a)

    def broken(*a):
        raise RuntimeError("the machine fell over")

    monkeypatch.setitem(bd.STAGE_FNS, "utility", utility)
    monkeypatch.setitem(bd.STAGE_FNS, "audit", broken)
    args = _args(tmp_path, "--datasets", "digits", "--defences", "none", "--seeds", "0", "--stages", "utility", "audit")
    assert main(args) == 1  # unfinished: says so
    out = tmp_path / "b"
    assert not (out / "cells" / "digits-none-s0.json").exists()
    assert "the machine fell over" in json.loads((out / "cells" / "digits-none-s0" / "failed.json").read_text())["reason"]
    assert (out / "cells" / "digits-none-s0" / "utility.json").exists()
    monkeypatch.setitem(bd.STAGE_FNS, "audit", lambda *a: {"audit_epsilon_lb": 0.25})
    assert main(args) == 0
    assert calls == ["utility"]  # the finished stage was not run again
    df = pd.read_csv(out / "defenses.csv")
    assert df[df["metric"] == "audit_epsilon_lb"]["value"].tolist() == [0.25]


def test_bad_input_is_refused_in_one_line(tmp_path, capsys):
    assert main(["bench", "defenses", "--defences", "nope", "--out", str(tmp_path / "b")]) == 2  # default datasets include mnist
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope" in err and "dp-sgd-eps8" in err and "Traceback" not in err
    assert main(["bench", "defenses", "--datasets", "cifar", "--out", str(tmp_path / "b")]) == 2
    assert main(["bench", "defenses", "--datasets", "digits", "--attack-batch", "0", "--out", str(tmp_path / "b")]) == 2
    assert main(["bench", "defenses", "--references", "1", "--out", str(tmp_path / "b")]) == 2


def test_every_registered_row_builds_a_valid_config_on_the_datasets_it_runs_on():
    """Rows other than the refused ones load (the full grid fails late otherwise); refusals name the key."""
    s = bd.BenchSettings(out="/nonexistent", mnist_dir="/nonexistent")
    from fedkd.config import ConfigError, load_config

    for name in bd.DEFENCES.names():
        for ds in bd.DEFENCES.get(name).datasets:
            if ds == "mnist":
                continue  # needs the IDX files; the same overrides as digits otherwise
            try:
                load_config(None, bd.base_overrides(ds, name, 0, s))
            except ConfigError as e:  # pragma: no cover - the message says which row broke
                pytest.fail(f"{name} on {ds}: {e}")


def test_finished_cells_made_with_other_settings_are_not_reused(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bd.STAGE_FNS, "utility", lambda *a: {"accuracy": 0.5})
    args = ["bench", "defenses", "--datasets", "digits", "--defences", "fd", "--seeds", "0", "--workers", "1", "--out", str(tmp_path / "b")]
    assert main(args + ["--rounds", "2"]) == 0
    capsys.readouterr()
    assert main(args + ["--rounds", "3"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_a_stage_that_died_half_way_is_run_again_from_scratch(tmp_path, monkeypatch, one_thread):
    """The inversion stage's federation finished, then the attack died: the rerun must not trip over its run directory."""
    import fedkd.attacks.runner as runner

    real = runner.attack_run_dir
    monkeypatch.setattr(runner, "attack_run_dir", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed mid-attack")))
    args = _args(tmp_path, "--datasets", "digits", "--defences", "none", "--seeds", "0", "--stages", "utility", "inversion")
    assert main(args) == 1
    assert (tmp_path / "b" / "runs" / "digits-none-s0" / "inversion").exists()
    monkeypatch.setattr(runner, "attack_run_dir", real)
    assert main(args) == 0
    df = pd.read_csv(tmp_path / "b" / "defenses.csv")
    assert "psnr" in set(df["metric"]) and not (tmp_path / "b" / "cells" / "digits-none-s0" / "failed.json").exists()
    # a later run asking for more stages does not take the two-stage cell as finished
    assert main(args[:-3] + ["--stages", "utility", "inversion", "audit"]) == 0
    assert "audit_epsilon_lb" in set(pd.read_csv(tmp_path / "b" / "defenses.csv")["metric"])
