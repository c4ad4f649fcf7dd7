"""FedD2S: layer cuts and the deep-to-shallow schedule, config errors, and a heterogeneous mlp+cnn run end to end."""

import numpy as np
import pandas as pd
import pytest
from flwr.app import Array

from fedkd.clients.fedd2s import cut_points, layer_drops, representations, shared_depths
from fedkd.config import ConfigError
from fedkd.data import load_federation
from fedkd.experiment import run_experiment
from fedkd.models import build_model
from tests.conftest import small


def test_cut_points_and_representation_sizes():
    import torch

    x = torch.rand(3, 1, 8, 8)
    expect = {"mlp": [64, 64], "cnn": [16 * 4 * 4, 32 * 2 * 2, 64], "lenet": [12 * 4 * 4, 12 * 2 * 2, 12 * 2 * 2]}
    for name, dims in expect.items():
        model = build_model(name, (1, 8, 8), 10)
        assert len(cut_points(model)) == len(dims)
        feats, logits = representations(model, x, list(range(1, len(dims) + 1)))
        assert [feats[d].shape[1] for d in sorted(feats)] == dims
        assert torch.allclose(logits, model(x))


def test_deep_to_shallow_schedule():
    assert [layer_drops(r, 5) for r in (1, 5, 6, 10, 11)] == [0, 0, 1, 1, 2]
    assert layer_drops(100, 0) == 0
    assert shared_depths(3, 0, 1) == [1, 2, 3]
    assert shared_depths(3, 1, 1) == [1, 2]  # the deepest goes first
    assert shared_depths(3, 9, 1) == [1]  # never below keep_layers
    assert shared_depths(3, 9, 2) == [1, 2]
    assert shared_depths(2, 9, 5) == [1, 2]


def test_bad_hyperparameters_name_the_key():
    with pytest.raises(ConfigError, match=r"^fedd2s\.temperature: must be > 0"):
        small("strategy.name=fedd2s", "fedd2s.temperature=-1")
    with pytest.raises(ConfigError, match=r"^fedd2s\.keep_layers"):
        small("strategy.name=fedd2s", "fedd2s.keep_layers=0")


def test_fedd2s_heterogeneous_end_to_end(tmp_path):
    cfg = small("strategy.name=fedd2s", 'model.name=["mlp", "cnn"]', "fedd2s.drop_every=1", "privacy.reproducible_noise=true")  # seeded shuffles: a fixed bar
    summary = run_experiment(cfg, tmp_path / "run", progress=False)
    assert summary["status"] == "ok"
    assert summary["personal_accuracy"] is not None and summary["personal_accuracy"] > 0.3
    df = pd.read_csv(tmp_path / "run" / "metrics.csv", dtype={"node": str})
    for r in (1, 2):
        server = df[(df["node"] == "server") & (df["round"] == r)].set_index("metric")["value"]
        assert {"personal_accuracy_mean", "personal_accuracy_min", "personal_accuracy_max", "personal_global_accuracy_mean"} <= set(server.index)
        clients = df[(df["split"] == "test") & (df["round"] == r) & (df["metric"] == "accuracy") & (df["node"] != "server")]["value"]
        assert server["personal_accuracy_mean"] == pytest.approx(clients.mean())
        assert server["personal_accuracy_min"] == pytest.approx(clients.min())
        on_server_test = df[(df["split"] == "test") & (df["round"] == r) & (df["metric"] == "global_accuracy") & (df["node"] != "server")]["value"]
        assert server["accuracy"] == pytest.approx(on_server_test.mean()) == pytest.approx(server["personal_global_accuracy_mean"])
    assert summary["accuracy"] == pytest.approx(server["accuracy"])  # the clients' own models on the server test set
    # Knowledge only, never weights. Up: features of the shared layers + logits + labels per sample;
    # round 1 shares every layer, round 2 (drop_every=1) drops the deepest one. Down: soft labels in round 2.
    fed = load_federation(cfg.data, cfg.run.seed)
    size = lambda shape, dtype=np.float32: len(Array(np.zeros(shape, dtype)).data)  # noqa: E731
    dims = {"mlp": [64, 64], "cnn": [256, 128, 64]}
    up = down = 0
    for pid, client in enumerate(fed.clients):
        n, d = len(client.train), dims[cfg.model.for_partition(pid)]
        for shared in (d, d[:-1]):
            up += sum(size((n, k)) for k in shared) + size((n, 10)) + size((n,), np.int64)
        down += size((n, 10))
    assert summary["bytes_up_arrays"] == up
    assert summary["bytes_down"] == down
