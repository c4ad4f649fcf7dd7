"""FedMD (Li & Wang 2019): public split held out, scores up / consensus down, mlp + cnn clients."""

import numpy as np
import pandas as pd
import pytest
from flwr.app import Array, ArrayRecord, RecordDict

from fedkd import keys
from fedkd.config import ConfigError
from fedkd.data import load_federation
from fedkd.experiment import run_experiment
from fedkd.models import build_model
from fedkd.recording import payload_bytes
from fedkd.strategies import build_strategy
from fedkd.strategies.fedmd import alignment_indices, fedmd_data
from tests.conftest import small

HETERO = 'model.name=["mlp", "cnn"]'


def test_public_split_is_held_out_before_partitioning():
    cfg = small("strategy.name=fedmd", "fedmd.public_fraction=0.2")
    fed, public = fedmd_data(cfg)
    full = load_federation(cfg.data, cfg.run.seed)
    pool = sum(len(c.train) + len(c.test) for c in full.clients)
    private = sum(len(c.train) + len(c.test) for c in fed.clients)
    assert len(public) == round(0.2 * pool) and private + len(public) == pool
    assert len(np.unique(public.y)) == 10  # stratified
    np.testing.assert_array_equal(fed.server_test.y, full.server_test.y)  # same global test set
    # no public image is in any client's data (digits has a few exact duplicates: compare against
    # the duplicates of the full pool, which the split cannot separate)
    rows = lambda d: {x.tobytes() for x in d.x}  # noqa: E731
    client_rows = set().union(*(rows(c.train) | rows(c.test) for c in fed.clients))
    overlap = rows(public) & client_rows
    all_x = np.concatenate([np.concatenate([c.train.x, c.test.x]) for c in full.clients])
    _, n = np.unique(all_x.reshape(len(all_x), -1), axis=0, return_counts=True)
    assert len(overlap) <= int((n > 1).sum())


def test_alignment_indices_are_a_seeded_subset():
    a = alignment_indices(144, 100, seed=7)
    assert len(a) == len(set(a)) == 100 and a.max() < 144
    np.testing.assert_array_equal(a, alignment_indices(144, 100, seed=7))
    assert len(alignment_indices(50, 5000, seed=1)) == 50  # capped at the public set


def test_fedmd_end_to_end_heterogeneous_sends_scores_not_weights(tmp_path):
    align = 60
    cfg = small("strategy.name=fedmd", HETERO, f"fedmd.alignment_size={align}", "fedmd.public_epochs=5", "fedmd.private_epochs=5")
    s = run_experiment(cfg, tmp_path / "md", progress=False)
    assert s["status"] == "ok" and s["failures"] == []
    scores = payload_bytes(RecordDict({keys.ARRAYS: ArrayRecord({keys.LOGITS: Array(np.zeros((align, 10), np.float32))})}))
    weights = payload_bytes(RecordDict({keys.ARRAYS: ArrayRecord(build_model("mlp", (1, 8, 8), 10).state_dict())}))
    assert scores < weights
    # up: each client's (A, K) class scores each round, nothing else; down: the (A, K) consensus
    assert s["bytes_up_arrays"] == 4 * 2 * scores and s["bytes_up"] > s["bytes_up_arrays"]
    assert s["bytes_down"] == 4 * 2 * scores
    df = pd.read_csv(tmp_path / "md" / "metrics.csv", dtype={"node": str})
    srv = df[(df["node"] == "server") & (df["split"] == "test")]
    for r in (1, 2):
        got = srv[srv["round"] == r].set_index("metric")["value"]
        assert {"personal_accuracy_mean", "personal_accuracy_min", "personal_accuracy_max", "personal_global_accuracy_mean"} <= set(got.index)
    pre = df[(df["metric"] == "pre_accuracy") & (df["round"] == 1)]
    assert len(pre) == 4  # the transfer-learning baseline, per client
    assert (df[df["metric"] == "digest_loss"]["value"] > 0).all()
    assert s["personal_accuracy_mean"] > 0.3 and s["accuracy"] == pytest.approx(s["personal_global_accuracy_mean"])


@pytest.mark.parametrize("value", ["0", "1", "-0.1"])
def test_empty_public_split_is_a_config_error(value):
    with pytest.raises(ConfigError) as e:
        small("strategy.name=fedmd", f"fedmd.public_fraction={value}")
    assert e.value.key == "fedmd.public_fraction"


def test_public_split_that_rounds_to_nothing_stops_before_the_run():
    cfg = small("strategy.name=fedmd", "fedmd.public_fraction=0.0001")
    with pytest.raises(ConfigError) as e:
        build_strategy(cfg, load_federation(cfg.data, cfg.run.seed))
    assert e.value.key == "fedmd.public_fraction" and "empty" in str(e.value)


def test_public_dataset_must_match_the_inputs():
    with pytest.raises(ConfigError, match="fedmd.public_dataset"):
        small("strategy.name=fedmd", "fedmd.public_dataset=nope")
