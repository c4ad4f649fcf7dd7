"""The pieces that make deployed rounds fast, checked in-process (no SuperLink): one-exchange rounds give the
same client evaluation as an evaluate exchange and land in the right round, the partition cache returns the
same federation without rebuilding it, the polling grid gathers every reply, the ClientApp module is light."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedkd import keys
from fedkd.config import ConfigError, load_config
from fedkd.deploy.one_exchange import OneExchange, allowed

TINY = ["data.num_clients=2", "run.rounds=3", "train.local_epochs=1", "data.min_partition_size=5"]


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    # Building Messages outside Flower's runtimes needs a task identity (see ../shared/reference/flower-1.41.md).
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


class FakeGrid:
    def get_node_ids(self):
        return [101, 102]


def _ctx(pid: int) -> Context:
    return Context(run_id=1, node_id=101 + pid, node_config={keys.NODE_PARTITION_ID: pid, keys.NODE_NUM_PARTITIONS: 2}, state=RecordDict(), run_config={})


def _spec(cfg):
    from fedkd.data import load_federation
    from fedkd.strategies import build_strategy

    return build_strategy(cfg, load_federation(cfg.data, cfg.run.seed))


def test_one_exchange_round_returns_what_an_evaluate_exchange_would_and_records_it_one_round_back():
    from fedkd.apps import _evaluate, _train

    cfg = load_config(None, TINY)
    spec = _spec(cfg)
    recorded = []
    strat = OneExchange(spec.strategy, cfg.run.rounds, lambda rnd, who, m: recorded.append((rnd, who, m)))
    conf = ConfigRecord({keys.EXPERIMENT: cfg.to_json(), keys.CLIENT_LOGIC: spec.client})
    # round 1 trains the initial model: no evaluation asked (two-exchange runs do not evaluate it on clients)
    first = list(strat.configure_train(1, spec.initial_arrays, ConfigRecord(dict(conf)), FakeGrid()))
    assert len(first) == 2 and not any(m.content[keys.CONFIG].get(keys.EVALUATE_RECEIVED, False) for m in first)
    # the evaluate exchange is kept for the last round only; Flower's sampling is still drawn every round
    assert list(strat.configure_evaluate(1, spec.initial_arrays, ConfigRecord(dict(conf)), FakeGrid())) == []
    assert len(list(strat.configure_evaluate(cfg.run.rounds, spec.initial_arrays, ConfigRecord(dict(conf)), FakeGrid()))) == 2

    train_msgs = list(strat.configure_train(2, spec.initial_arrays, ConfigRecord(dict(conf)), FakeGrid()))
    assert all(m.content[keys.CONFIG][keys.EVALUATE_RECEIVED] for m in train_msgs)
    replies, expected = [], {}
    for pid, msg in enumerate(train_msgs):
        reply = _train(msg, _ctx(pid))
        fused = dict(reply.content.config_records[keys.RECEIVED_EVALUATION])
        # the same numbers an evaluate message with these arrays gets
        ev_msg = Message(RecordDict({keys.ARRAYS: msg.content[keys.ARRAYS], keys.CONFIG: msg.content[keys.CONFIG]}), dst_node_id=101 + pid, message_type="evaluate")
        assert fused == pytest.approx(dict(_evaluate(ev_msg, _ctx(pid)).content[keys.METRICS]))
        expected[pid] = fused
        replies.append(reply)
    arrays, _ = strat.aggregate_train(2, replies)
    assert arrays is not None
    assert [(rnd, int(who)) for rnd, who, _ in recorded] == [(1, 0), (1, 1)]  # round 1's model, round 1's rows
    assert {int(who): m for _, who, m in recorded} == expected
    assert all(keys.RECEIVED_EVALUATION not in r.content.config_records for r in replies)  # the wrapped strategy never sees it


def test_one_exchange_is_refused_where_the_strategy_does_not_allow_it():
    assert allowed(load_config(None, TINY), "weights") == (True, "")
    assert not allowed(load_config(None, TINY + ["strategy.fraction_evaluate=0.5"]), "weights")[0]
    assert not allowed(load_config(None, TINY + ["strategy.fraction_evaluate=0"]), "weights")[0]
    assert not allowed(load_config(None, TINY), "fd")[0]
    with pytest.raises(ConfigError, match="deploy.one_exchange"):
        load_config(None, TINY + ["deploy.one_exchange=on", "strategy.fraction_train=0.5"])
    with pytest.raises(ConfigError, match="deploy.one_exchange"):
        load_config(None, TINY + ["deploy.one_exchange=sometimes"])
    with pytest.raises(ConfigError, match="deploy.pull_interval"):
        load_config(None, TINY + ["deploy.pull_interval=0"])


def test_partition_cache_is_written_once_and_returns_the_same_federation(tmp_path, monkeypatch):
    import fedkd.data
    from fedkd.deploy import cache

    cfg = load_config(None, TINY)
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    built = cache.node_federation(cfg.data, cfg.run.seed)
    assert len(list(tmp_path.glob("federation-*.pkl"))) == 1

    def no_rebuild(*a, **k):
        raise AssertionError("the cache should have been read")

    monkeypatch.setattr(fedkd.data, "load_federation", no_rebuild)
    again = cache.node_federation(cfg.data, cfg.run.seed)
    for a, b in zip(built.clients, again.clients):
        np.testing.assert_array_equal(a.train.x, b.train.x)
        np.testing.assert_array_equal(a.test.y, b.test.y)
    with pytest.raises(AssertionError, match="cache"):  # another seed is another file
        cache.node_federation(cfg.data, cfg.run.seed + 1)


def test_polling_grid_collects_every_reply_across_pulls():
    from fedkd.deploy.grid import PollingGrid

    class Inner:
        def __init__(self):
            self.pulls = 0

        def push_messages(self, messages):
            return [f"id{i}" for i, _ in enumerate(messages)]

        def pull_messages(self, ids):
            self.pulls += 1
            ids = sorted(ids)
            if self.pulls == 1:
                return []
            m = Message(RecordDict(), dst_node_id=1, message_type="train")
            m.metadata.__dict__["_reply_to_message_id"] = ids[0]
            return [m]

    inner = Inner()
    replies = PollingGrid(inner, interval=0.01).send_and_receive([object(), object()])
    assert len(replies) == 2 and inner.pulls == 3
    assert PollingGrid(inner, interval=0.01).send_and_receive([]) == []


def test_clientapp_module_imports_neither_torch_nor_pandas():
    code = "import sys, fedkd.apps; print(sorted(m for m in ('torch', 'pandas', 'sklearn', 'scipy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_preloaded_federation_is_returned_without_building_one(monkeypatch):
    """The fast path's actors get the driver's federation (pickled) instead of loading the data again."""
    import pickle

    import fedkd.data
    from fedkd.deploy import cache

    cfg = load_config(None, TINY)
    fed = fedkd.data.load_federation(cfg.data, cfg.run.seed)
    monkeypatch.delenv(cache.CACHE_ENV, raising=False)
    monkeypatch.setattr(cache, "_PRELOADED", {})
    monkeypatch.setattr(fedkd.data, "load_federation", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rebuilt")))
    copy = pickle.loads(pickle.dumps(fed))
    cache.preload(cfg.data, cfg.run.seed, copy)
    assert cache.node_federation(cfg.data, cfg.run.seed) is copy
    np.testing.assert_array_equal(copy.clients[1].train.x, fed.clients[1].train.x)
    with pytest.raises(AssertionError, match="rebuilt"):  # another seed was not preloaded
        cache.node_federation(cfg.data, cfg.run.seed + 1)
