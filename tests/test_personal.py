"""Personalised evaluation statistics and the local-only baseline (no bytes on the wire)."""

import numpy as np
import pandas as pd
import pytest

from fedkd import keys
from fedkd.experiment import run_experiment
from fedkd.strategies.personal import personal_stats
from tests.conftest import small


def test_personal_stats_match_a_plain_loop():
    rng = np.random.default_rng(1)
    clients = [{keys.ACCURACY: a, keys.GLOBAL_ACCURACY: g, keys.LOSS: l, keys.GLOBAL_LOSS: gl} for a, g, l, gl in rng.random((5, 4))]
    s = personal_stats(clients)
    for key, name in ((keys.ACCURACY, "personal_accuracy"), (keys.GLOBAL_ACCURACY, "personal_global_accuracy")):
        vals = [c[key] for c in clients]
        assert s[f"{name}_mean"] == pytest.approx(sum(vals) / len(vals))
        assert s[f"{name}_min"] == min(vals) and s[f"{name}_max"] == max(vals)
    assert s["accuracy"] == s["personal_global_accuracy_mean"]
    assert s["loss"] == pytest.approx(np.mean([c[keys.GLOBAL_LOSS] for c in clients]))
    assert personal_stats([]) == {}


def test_local_only_sends_nothing_and_reports_personal_rows(tmp_path):
    s = run_experiment(small("strategy.name=local", 'model.name=["cnn", "mlp"]', "train.local_epochs=3"), tmp_path / "loc", progress=False)
    assert s["status"] == "ok" and s["bytes_up_arrays"] == 0 and s["bytes_down"] == 0  # metrics only (counted in bytes_up)
    assert s["personal_accuracy_mean"] > 0.3
    df = pd.read_csv(tmp_path / "loc" / "metrics.csv", dtype={"node": str})
    srv = df[(df["node"] == "server") & (df["metric"] == "personal_accuracy_mean")]
    assert list(srv["round"]) == [1, 2]
    own = df[(df["node"] != "server") & (df["split"] == "test") & (df["metric"] == "accuracy") & (df["round"] == 2)]
    assert s["personal_accuracy_mean"] == pytest.approx(own["value"].mean())
