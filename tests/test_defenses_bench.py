"""benchmarks/defenses.py: resumable cells, tidy rows, mean and 95% t-interval (no federation is run)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_defenses", ROOT / "benchmarks" / "defenses.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_interval_matches_scipy(bench):
    from scipy import stats

    vals = [0.91, 0.93, 0.88, 0.95]
    mean, half = bench.interval(vals)
    lo, hi = stats.t.interval(0.95, len(vals) - 1, loc=np.mean(vals), scale=stats.sem(vals))
    assert mean == pytest.approx(np.mean(vals)) and half == pytest.approx((hi - lo) / 2)
    assert bench.interval([0.5]) == (0.5, 0.0)


def test_finished_cells_are_skipped_and_the_table_is_rebuilt(bench, tmp_path, monkeypatch):
    calls = []

    def fake(args, dataset, defence, seed, work):
        calls.append((dataset, defence, seed))
        return {"accuracy": 0.5 + seed / 10, "personal_accuracy": 0.6, "psnr": None if defence == "fd" else 20.0 + seed, "bytes_up": 1000.0}

    monkeypatch.setattr(bench, "run_cell", fake)
    argv = ["--defences", "none", "fd", "--seeds", "0", "1", "--out", str(tmp_path)]
    assert bench.main(argv) == 0 and len(calls) == 4
    assert bench.main(argv + ["--seeds", "0", "1", "2"]) == 0 and len(calls) == 6  # only seed 2 is new
    df = json.loads((tmp_path / "cells" / "digits-none-s2.json").read_text())
    assert df["metrics"]["accuracy"] == pytest.approx(0.7)
    import pandas as pd

    tidy = pd.read_csv(tmp_path / "defenses.csv")
    assert set(tidy.columns) == {"dataset", "defence", "seed", "metric", "value"}
    assert len(tidy[(tidy["defence"] == "fd") & (tidy["metric"] == "psnr")]) == 0  # n/a is no row
    md = (tmp_path / "defenses.md").read_text()
    none_row = next(line for line in md.splitlines() if "| none |" in line)
    assert "0.600 ± 0.248" in none_row and "| 3 |" in none_row  # mean of 0.5, 0.6, 0.7 and its t-interval
    assert "n/a" in next(line for line in md.splitlines() if "| fd |" in line)
