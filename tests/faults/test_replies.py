"""Bad replies are dropped before aggregation, recorded (node, round, reason), and the run goes on.

Runs use the in-process InlineGrid (the real ClientApp, mods and client logic, no Ray) with the
``[faults]`` client mod corrupting client 1's training replies from round 2.
"""

import json
import math

import numpy as np
import pandas as pd
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedkd import keys
from fedkd.recording import Diverged, ReplyValidator
from tests.conftest import small


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _sent():
    content = RecordDict({keys.ARRAYS: ArrayRecord({"w": Array(np.zeros((2, 3), np.float32))}), keys.CONFIG: ConfigRecord({})})
    return Message(content=content, dst_node_id=1001, message_type="train")


def _reply(sent, arrays, n=5):
    return Message(content=RecordDict({keys.ARRAYS: ArrayRecord(arrays), keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: n})}), reply_to=sent)


@pytest.mark.parametrize(
    "arrays, n, kind",
    [
        ({"w": np.ones((2, 3), np.float32)}, 5, None),
        ({"w": np.full((2, 3), np.nan, np.float32)}, 5, "non-finite"),
        ({"w": np.full((2, 3), -np.inf, np.float32)}, 5, "non-finite"),
        ({"w": np.ones((3, 3), np.float32)}, 5, "shape"),
        ({"w": np.ones((2, 3), np.float64)}, 5, "dtype"),
        ({"w": np.ones((2, 3), np.float32), "x": np.ones(1, np.float32)}, 5, "names"),
        ({}, 5, "names"),
        ({"w": np.ones((2, 3), np.float32)}, 10**9, "num-examples"),
        ({"w": np.ones((2, 3), np.float32)}, 0, "num-examples"),
        ({"w": np.ones((2, 3), np.float32)}, 2.5, "num-examples"),
    ],
)
def test_validator(arrays, n, kind):
    sent = _sent()
    reason = ReplyValidator(max_examples=1000)(sent, _reply(sent, {k: Array(v) for k, v in arrays.items()}, n))
    if kind is None:
        assert reason is None
    else:
        assert reason is not None and reason.startswith(kind), reason


def test_encoded_replies_may_be_unsigned_subsets():
    sent = _sent()
    ok = _reply(sent, {"w": Array(np.zeros((2, 3), np.uint8))})
    assert ReplyValidator(1000, encoded=True)(sent, ok) is None
    assert ReplyValidator(1000)(sent, ok).startswith("dtype")


def _run(tmp_path, *sets, spec_hook=None):
    from fedkd.attacks.inline import InlineGrid
    from fedkd.data import load_federation
    from fedkd.results import RunRecorder
    from fedkd.server import run_server, summarize
    from fedkd.strategies import build_strategy

    cfg = small(*sets)  # 4 clients, 2 rounds, 1 local epoch
    fed = load_federation(cfg.data, cfg.run.seed)
    spec = build_strategy(cfg, fed)
    if spec_hook is not None:
        spec_hook(spec)
    recorder = RunRecorder(tmp_path / "run")
    error = None
    try:
        run_server(InlineGrid(cfg.data.num_clients), cfg, recorder, spec=spec, progress=False, echo=lambda s: None)
    except Exception as e:  # noqa: BLE001
        error = e
    summarize(cfg, recorder, recorder.t_start, status="ok" if error is None else "failed", error=None if error is None else str(error))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    df = pd.read_csv(tmp_path / "run" / "metrics.csv", dtype={"node": str})
    return summary, df, error


@pytest.mark.parametrize("kind, reason", [("nan", "non-finite"), ("inf", "non-finite"), ("shape", "shape"), ("count", "num-examples"), ("raise", "RuntimeError")])
def test_bad_client_is_dropped_and_recorded(kind, reason, tmp_path):
    summary, df, error = _run(tmp_path, f"faults.kind={kind}", "faults.clients=[1]", "faults.from_round=2")
    assert error is None and summary["status"] == "ok"
    assert summary["rounds_completed"] == 2
    # not poisoned: a NaN average gives loss NaN and accuracy 0.10 (one class everywhere)
    assert math.isfinite(summary["loss"]) and summary["accuracy"] > 0.15
    faults = summary["faults"]
    assert [(f["round"], f["node"], f["kind"]) for f in faults] == [(2, "1", "error" if kind == "raise" else "rejected")]
    assert reason in faults[0]["reason"], faults
    rows = df[df["split"] == "faults"]
    assert list(zip(rows["round"], rows["node"])) == [(2, "1")]
    # the dropped replies' metrics are not in metrics.csv; the honest clients' are
    train = df[(df["split"] == "train") & (df["round"] >= 2)]
    assert set(train["node"]) == {"0", "2", "3"}


def test_below_min_replies_fails_clearly(tmp_path):
    summary, _, error = _run(tmp_path, "faults.kind=raise", "faults.clients=[1, 2]", "faults.from_round=2", "strategy.min_replies=3")
    assert error is not None and "fewer than strategy.min_replies = 3" in str(error)
    assert summary["status"] == "failed" and summary["rounds_completed"] == 1


def test_all_clients_non_finite_is_diverged(tmp_path):
    summary, _, error = _run(tmp_path, "faults.kind=nan", "faults.clients=[0, 1, 2, 3]", "faults.from_round=2")
    assert isinstance(error, Diverged)
    assert summary["status"] == "diverged" and summary["rounds_completed"] == 1


def test_non_finite_aggregate_is_diverged(tmp_path):
    """Whatever makes the global model non-finite (here: the strategy itself), the run stops as diverged."""

    def hook(spec):
        inner = spec.strategy.aggregate_train

        def poisoned(server_round, replies):
            arrays, metrics = inner(server_round, replies)
            if server_round == 2:
                arrays = ArrayRecord({k: Array(np.full(v.numpy().shape, np.nan, v.numpy().dtype)) for k, v in arrays.items()})
            return arrays, metrics

        spec.strategy.aggregate_train = poisoned

    summary, _, error = _run(tmp_path, spec_hook=hook)
    assert isinstance(error, Diverged)
    assert summary["status"] == "diverged" and summary["rounds_completed"] == 1
