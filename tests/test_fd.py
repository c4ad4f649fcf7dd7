"""FD (Jeong et al. 2018): leave-one-out per-label averaging, end to end with mlp + cnn clients."""

import json

import numpy as np
import pandas as pd
import pytest
from flwr.app import Array, ArrayRecord

from fedkd import keys
from fedkd.config import ConfigError
from fedkd.experiment import run_experiment
from fedkd.recording import payload_bytes
from fedkd.strategies.fd import global_logits
from tests.conftest import small

HETERO = 'model.name=["mlp", "cnn"]'


def test_global_logits_match_brute_force():
    rng = np.random.default_rng(0)
    m, k = 5, 4
    logits = rng.normal(size=(m, k, k)).astype(np.float32)
    counts = rng.integers(0, 4, size=(m, k))
    counts[:, 2] = 0
    counts[3, 2] = 7  # label 2: only client 3 holds it
    for exclude in [None, *range(m)]:
        got = global_logits(logits, counts, exclude)
        for label in range(k):
            num, den = np.zeros(k), 0
            for j in range(m):
                if j != exclude:
                    num += counts[j, label] * logits[j, label]
                    den += counts[j, label]
            if den == 0:
                assert np.isnan(got[label]).all()
            else:
                np.testing.assert_allclose(got[label], num / den, rtol=1e-5, atol=1e-6)
    assert np.isnan(global_logits(logits, counts, exclude=3)[2]).all()  # nobody else has label 2


def test_fd_end_to_end_heterogeneous_sends_only_per_label_logits(tmp_path):
    cfg = small("strategy.name=fd", HETERO, "train.local_epochs=3")
    s = run_experiment(cfg, tmp_path / "fd", progress=False)
    assert s["status"] == "ok" and s["failures"] == []
    k = 10
    per_client = payload_bytes(_rd(k))
    # up: every client, every round, exactly one (K, K) float32 array; down: the same per client from round 2
    assert s["bytes_up_arrays"] == 4 * 2 * per_client and s["bytes_up"] > s["bytes_up_arrays"]  # bytes_up: metrics too
    assert s["bytes_down"] == 4 * 1 * per_client
    df = pd.read_csv(tmp_path / "fd" / "metrics.csv", dtype={"node": str})
    srv = df[(df["node"] == "server") & (df["split"] == "test")]
    for r in (1, 2):
        got = srv[srv["round"] == r].set_index("metric")["value"]
        for stat in ("mean", "min", "max"):
            assert f"personal_accuracy_{stat}" in got and f"personal_global_accuracy_{stat}" in got
        assert got["personal_accuracy_min"] <= got["personal_accuracy_mean"] <= got["personal_accuracy_max"]
        per_node = df[(df["round"] == r) & (df["split"] == "test") & (df["metric"] == "global_accuracy") & (df["node"] != "server")]
        assert len(per_node) == 4 and got["personal_global_accuracy_mean"] == pytest.approx(per_node["value"].mean())
    summary = json.loads((tmp_path / "fd" / "summary.json").read_text())
    assert summary["personal_accuracy_mean"] > 0.3 and summary["personal_global_accuracy_mean"] > 0.2
    dl = df[(df["metric"] == "distill_loss") & (df["node"] != "server")]
    assert (dl[dl["round"] == 1]["value"] == 0).all() and (dl[dl["round"] == 2]["value"] > 0).all()
    resumed = df[df["metric"] == "resumed"].pivot_table(index="node", columns="round", values="value")
    assert (resumed[1] == 0).all() and (resumed[2] == 1).all()  # own model from Context.state in round 2


def _rd(k):
    from flwr.app import RecordDict

    return RecordDict({keys.ARRAYS: ArrayRecord({keys.LOGITS: Array(np.zeros((k, k), np.float32))})})


@pytest.mark.parametrize("value", ["0", "-1.5"])
def test_fd_temperature_must_be_positive(value):
    with pytest.raises(ConfigError) as e:
        small("strategy.name=fd", f"fd.temperature={value}")
    assert e.value.key == "fd.temperature" and "\n" not in str(e.value)


def test_fd_beta_must_be_non_negative():
    with pytest.raises(ConfigError, match="fd.beta"):
        small("strategy.name=fd", "fd.beta=-1")


@pytest.mark.slow  # Flower's own engine (test_federation.py keeps one such run in `make test`)
def test_fd_on_flowers_own_simulation_keeps_client_models_across_rounds(tmp_path):
    s = run_experiment(small("strategy.name=fd", HETERO, "simulation.backend=flower", "data.num_clients=3"), tmp_path / "fl", progress=False)
    assert s["status"] == "ok" and s["personal_accuracy_mean"] is not None
    df = pd.read_csv(tmp_path / "fl" / "metrics.csv", dtype={"node": str})
    resumed = df[(df["metric"] == "resumed")].pivot_table(index="node", columns="round", values="value")
    assert (resumed[1] == 0).all() and (resumed[2] == 1).all()  # own model from Context.state in round 2
