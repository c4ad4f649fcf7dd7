"""The fault-injection mod corrupts exactly the replies it is told to, and is inert otherwise."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedkd import keys
from fedkd.clients.faults import fault_mod
from fedkd.config import ConfigError, load_config


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    # Building Messages outside Flower's runtimes needs a task identity (see ../shared/reference/flower-1.41.md).
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _msg(cfg, server_round=2):
    conf = ConfigRecord({keys.EXPERIMENT: cfg.to_json(), keys.SERVER_ROUND: server_round})
    content = RecordDict({keys.ARRAYS: ArrayRecord({"w": Array(np.zeros((2, 3), np.float32))}), keys.CONFIG: conf})
    return Message(content=content, dst_node_id=1001, message_type="train")


def _ctx(pid):
    return Context(run_id=1, node_id=1000 + pid, node_config={keys.NODE_PARTITION_ID: pid, keys.NODE_NUM_PARTITIONS: 4}, state=RecordDict(), run_config={})


def _client(msg, context):
    rec = ArrayRecord({"w": Array(np.ones((2, 3), np.float32))})
    return Message(content=RecordDict({keys.ARRAYS: rec, keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 5})}), reply_to=msg)


def _cfg(kind, **kw):
    sets = [f"data.num_clients=4", f"faults.kind={kind}", "faults.clients=[1]", "faults.from_round=2"] + [f"faults.{k}={v}" for k, v in kw.items()]
    return load_config(None, sets)


@pytest.mark.parametrize("kind", ["nan", "inf", "shape", "count"])
def test_listed_client_from_its_round_is_corrupted(kind):
    cfg = _cfg(kind)
    out = fault_mod(_msg(cfg), _ctx(1), _client)
    w = out.content[keys.ARRAYS]["w"].numpy()
    n = out.content[keys.METRICS][keys.NUM_EXAMPLES]
    if kind == "nan":
        assert np.isnan(w).sum() == 1
    elif kind == "inf":
        assert np.isinf(w).sum() == 1
    elif kind == "shape":
        assert w.shape == (3, 3)
    else:
        assert n == 10**9


def test_other_clients_and_earlier_rounds_are_untouched():
    cfg = _cfg("nan")
    for msg, pid in ((_msg(cfg, 2), 0), (_msg(cfg, 1), 1)):
        w = fault_mod(msg, _ctx(pid), _client).content[keys.ARRAYS]["w"].numpy()
        assert np.isfinite(w).all() and w.shape == (2, 3)


def test_raise_raises_and_bad_config_is_refused():
    with pytest.raises(RuntimeError, match="fault injected"):
        fault_mod(_msg(_cfg("raise")), _ctx(1), _client)
    with pytest.raises(ConfigError, match="faults.kind"):
        _cfg("explode")
    with pytest.raises(ConfigError, match="faults.clients"):
        load_config(None, ["data.num_clients=2", "faults.kind=nan", "faults.clients=[5]"])
