"""FedLGD's server strategy and config, driven in process by a stand-in client that follows the contract.

The stand-in client is *not* FedLGD's client (clients/fedlgd.py, tested in test_fedlgd_client.py):
it answers the statistics exchange as the contract says, keeps the global virtual data per version and
takes a few SGD steps on its real data, so that the server's side can be checked end to end.
"""

import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.run import Run
from torch.nn import functional as F

from fedkd import keys
from fedkd.config import ConfigError, load_config
from fedkd.data import load_federation
from fedkd.distill import class_channel_stats, list_grids
from fedkd.models import model_from_config
from fedkd.results import RunRecorder
from fedkd.server import run_server, summarize
from fedkd.simulation import LocalGrid
from fedkd.strategies.fedlgd import (
    DISCLOSURE,
    FedLGDConfig,
    build_fedlgd,
    global_from_record,
    is_local_dm_round,
    is_refresh_round,
    normalize,
    stats_from_record,
    stats_record,
)


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Small tensors: one intra-op thread is as fast, and does not spin against other processes on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class InlineGrid(LocalGrid):
    """Messages answered synchronously by a Python function, one node per partition."""

    def __init__(self, n: int, handle) -> None:
        self.node_ids = [100 + i for i in range(n)]
        self._run = Run.create_empty(1)
        self.handle = handle

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        return [self.handle(m) for m in messages]


class StandIn:
    """Follows FedLGD's client contract; records what each node received."""

    def __init__(self, cfg, fed, nan_from=None):
        self.cfg, self.fed, self.nan_from = cfg, fed, nan_from  # nan_from = (partition, round): send NaN weights there
        self.kept: dict[int, tuple[int, torch.Tensor]] = {}  # partition -> (version, images) kept in its state
        self.log: list[tuple] = []  # (round, partition, phase, got_global, version, refresh, local_dm)

    def __call__(self, msg: Message) -> Message:
        pid = msg.metadata.dst_node_id - 100
        conf = msg.content[keys.CONFIG]
        rnd, phase = int(conf[keys.SERVER_ROUND]), str(conf[keys.PHASE])
        data = self.fed.clients[pid].train
        x = torch.as_tensor(normalize(data.x, self.cfg.fedlgd))
        if phase == keys.FEDLGD_STATS_PHASE:
            assert keys.ARRAYS not in msg.content.array_records  # the stats exchange sends no model
            self.log.append((rnd, pid, phase, False, None, None, None))
            rec = stats_record(class_channel_stats(x, data.y, self.fed.num_classes))
            return Message(RecordDict({keys.FEDLGD_STATS: rec, keys.METRICS: MetricRecord({})}), reply_to=msg)
        version = int(conf[keys.FEDLGD_VERSION])
        got = keys.FEDLGD_GLOBAL in msg.content.array_records
        if got:
            self.kept[pid] = (version, global_from_record(msg.content[keys.FEDLGD_GLOBAL])[0])
        self.log.append((rnd, pid, phase, got, version, bool(conf[keys.FEDLGD_REFRESH]), bool(conf[keys.FEDLGD_LOCAL_DM])))
        if self.kept.get(pid, (None,))[0] != version:
            return Message(Error(code=0, reason="stale global virtual data"), reply_to=msg)
        torch.manual_seed(rnd * 10 + pid)
        model = model_from_config(self.cfg.model, pid, self.fed.input_shape, self.fed.num_classes)
        model.load_state_dict(msg.content[keys.ARRAYS].to_torch_state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=self.cfg.train.lr)
        for _ in range(2):
            idx = torch.randint(len(x), (16,))
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), torch.as_tensor(data.y)[idx]).backward()
            opt.step()
        rec = ArrayRecord(model.state_dict())
        if self.nan_from == (pid, rnd):
            first = next(iter(rec.keys()))
            bad = rec[first].numpy().copy()
            bad.flat[0] = np.nan
            rec[first] = Array(bad)
        return Message(RecordDict({keys.ARRAYS: rec, keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: len(data.x)})}), reply_to=msg)


def stats_bytes(fed) -> int:
    rec = stats_record(class_channel_stats(fed.clients[0].train.x, fed.clients[0].train.y, fed.num_classes))
    return sum(len(a.data) for a in rec.values())


def fedlgd_cfg(*more):
    return load_config(None, [
        "strategy.name=fedlgd", "model.name=convnet-w32", "data.dataset=digits-domains", "data.partitioner=domain",
        "data.num_clients=3", 'data.domains=["gray", "inverted", "colored"]', "data.max_samples=600", "run.rounds=3", "strategy.fraction_evaluate=0",
        "train.lr=0.01", "fedlgd.si_tgap=2", "fedlgd.ci_tgap=2", "fedlgd.server_ipc=1", "fedlgd.gm_iterations=10", *more,
    ])


def test_fedlgd_server_protocol_end_to_end(tmp_path, capsys):
    cfg = fedlgd_cfg()
    fed = load_federation(cfg.data, cfg.run.seed)
    client = StandIn(cfg, fed, nan_from=(1, 2))
    recorder = RunRecorder(tmp_path)
    t0 = time.perf_counter()
    run_server(InlineGrid(3, client), cfg, recorder, spec=build_fedlgd(cfg, fed), progress=False, echo=lambda s: None)
    summary = summarize(cfg, recorder, t0)

    # round 1: statistics from every node first (no model sent), then training with global data v0, plain CE
    stats = [e for e in client.log if e[2] == keys.FEDLGD_STATS_PHASE]
    assert [e[0] for e in stats] == [1, 1, 1] and client.log[:3] == stats
    train = {(e[0], e[1]): e[3:] for e in client.log if e[2] == keys.FEDLGD_TRAIN_PHASE}
    assert all(train[(1, p)] == (True, 0, True, False) for p in range(3))
    # round 2: the refreshed global data (v1) goes to everyone; no refresh, no local DM
    assert all(train[(2, p)] == (True, 1, False, False) for p in range(3))
    # round 3: a refresh and a local-DM round; v1 is not sent again, except to node 1, whose NaN reply was rejected
    assert train[(3, 0)] == (False, 1, True, True) and train[(3, 2)] == (False, 1, True, True)
    assert train[(3, 1)] == (True, 1, True, True)

    df = recorder.frame()
    srv = df[df["node"] == "server"].set_index(["round", "metric"])["value"]
    # node 1's NaN reply is rejected by the server's reply checks (fedkd.recording) before FedLGD sees it
    assert srv[(2, "fedlgd_rejected_replies")] == 0 and srv[(1, "fedlgd_rejected_replies")] == 0
    assert [(f["round"], f["kind"]) for f in recorder.faults] == [(2, "rejected")] and "non-finite" in recorder.faults[0]["reason"]
    for r in (1, 3):  # gradient matching lowered its distance at both refreshes
        assert srv[(r, "fedlgd_gm_distance_after")] < 0.8 * srv[(r, "fedlgd_gm_distance_before")]
    assert srv[(3, "fedlgd_global_version")] == 2
    assert {"accuracy_domain_gray", "accuracy_domain_inverted", "accuracy_domain_colored"} <= set(df["metric"])
    assert 0 <= srv[(3, "accuracy")] <= 1

    # the disclosure, in on-wire array bytes (each array's npy serialisation, as bytes_up counts it), named in summary.json
    per_client = stats_bytes(fed)
    assert per_client < 2 * 10 * 3 * 4 + 10 + 3 * 200  # mean + std (10 x 3 float32 each), present (10 bool), 3 headers
    assert summary["disclosures"][DISCLOSURE]["bytes_up"] == 3 * per_client
    assert summary["disclosures"][DISCLOSURE]["clients"] == 3 and "standard deviation" in summary["disclosures"][DISCLOSURE]["what"]
    assert summary["bytes_up"] > 3 * per_client  # and counted in the run's uplink
    # one PNG grid per version of the global data, as sent
    assert [p.name for p in list_grids(tmp_path)] == ["global-v000-round0001.png", "global-v001-round0002.png"]
    from fedkd.cli import main

    assert main(["report", str(tmp_path)]) == 0
    assert "virtual images (2 grids" in capsys.readouterr().out


def test_schedule_follows_the_authors_loop():
    hp = FedLGDConfig()
    assert [r for r in range(1, 70) if is_refresh_round(r, hp)] == [1 + 5 * k for k in range(11)]
    assert [r for r in range(1, 70) if is_local_dm_round(r, hp)] == [1 + 5 * k for k in range(1, 11)]
    hp3 = FedLGDConfig(si_tgap=3, ci_tgap=2, image_update_times=2)
    assert [r for r in range(1, 20) if is_refresh_round(r, hp3)] == [1, 4, 7]
    assert [r for r in range(1, 20) if is_local_dm_round(r, hp3)] == [3, 5]


def test_statistics_records_are_checked():
    good = stats_record(class_channel_stats(np.random.default_rng(0).normal(size=(20, 3, 4, 4)), np.arange(20) % 10, 10))
    assert stats_from_record(good, 10, 3).present.all()
    bad_mean = good["mean"].numpy().copy()
    bad_mean[0, 0] = np.inf
    for broken in (
        ArrayRecord({"mean": Array(bad_mean), "std": good["std"], "present": good["present"]}),
        ArrayRecord({"mean": good["mean"], "std": Array(-good["std"].numpy()), "present": good["present"]}),
        ArrayRecord({"mean": good["mean"], "std": good["std"]}),
        ArrayRecord({"mean": Array(np.zeros((9, 3), np.float32)), "std": good["std"], "present": good["present"]}),
        ArrayRecord({"mean": good["mean"], "std": good["std"], "present": Array(np.zeros(10, bool))}),
    ):
        with pytest.raises(ValueError):
            stats_from_record(broken, 10, 3)


def test_bad_statistics_are_ignored_and_none_at_all_stops_the_run(tmp_path):
    cfg = fedlgd_cfg("run.rounds=1", "fedlgd.gm_iterations=1")
    fed = load_federation(cfg.data, cfg.run.seed)
    honest = StandIn(cfg, fed)

    def one_liar(msg):
        reply = honest(msg)
        if msg.metadata.dst_node_id == 102 and keys.FEDLGD_STATS in reply.content.array_records:
            rec = reply.content[keys.FEDLGD_STATS]
            rec["std"] = Array(np.full((10, 3), np.nan, np.float32))
        return reply

    recorder = RunRecorder(tmp_path / "a")
    run_server(InlineGrid(3, one_liar), cfg, recorder, spec=build_fedlgd(cfg, fed), progress=False, echo=lambda s: None)
    assert recorder.value(1, "server", "test", "fedlgd_stats_clients") == 2
    # the liar's NaN statistics are rejected by the server's reply checks before FedLGD counts them;
    # the run's traffic counter still holds them (they were disclosed all the same)
    assert recorder.value(1, "server", "test", "fedlgd_stats_bytes_up") == 2 * stats_bytes(fed)
    assert recorder.bytes_up >= 3 * stats_bytes(fed) and [f["kind"] for f in recorder.faults] == ["rejected"]

    def all_bad(msg):
        return Message(RecordDict({keys.METRICS: MetricRecord({})}), reply_to=msg)

    with pytest.raises(RuntimeError, match="valid class statistics"):
        run_server(InlineGrid(3, all_bad), cfg, RunRecorder(tmp_path / "b"), spec=build_fedlgd(cfg, fed), progress=False, echo=lambda s: None)


def test_bad_fedlgd_settings_name_the_key():
    cases = {
        "fedlgd.ipc": "fedlgd.ipc=0",
        "fedlgd.temperature": "fedlgd.temperature=0",
        "fedlgd.image_momentum": "fedlgd.image_momentum=1",
        "fedlgd.dsa_strategy": "fedlgd.dsa_strategy=color_blur",
        "fedlgd.gm_iterations": "fedlgd.gm_iterations=-1",
        "model.name": "model.name=mlp",
        "privacy.mechanism": "privacy.mechanism=rqm",
    }
    for key, setting in cases.items():
        with pytest.raises(ConfigError) as e:
            fedlgd_cfg(setting)
        assert e.value.key == key, (key, str(e.value))
    assert load_config(None, ["fedlgd.ipc=10"]).fedlgd.ipc == 10  # the section exists for every strategy


def test_client_side_pieces():
    from fedkd.distill import alignment_loss, embedding_mean_distance
    from fedkd.models import ConvNet
    from fedkd.strategies.fedlgd import local_dm, local_loss, local_virtual_init

    hp = FedLGDConfig(ipc=3, real_batch=8, lambda_sim=10.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 12, 12, generator=g)
    y = torch.tensor([0, 2] * 20)  # this client holds classes 0 and 2 only
    images, labels = local_virtual_init(x, y, 4, hp, g)
    assert images.shape == (6, 3, 12, 12) and labels.tolist() == [0, 0, 0, 2, 2, 2]
    torch.manual_seed(0)
    factory = lambda: ConvNet((3, 12, 12), 4, width=8, depth=2)  # noqa: E731
    judge = factory()
    before = embedding_mean_distance(judge, images, labels, x, y)
    assert len(local_dm(images, labels, x, y, hp, g, net_factory=factory, iterations=20)) == 20
    assert embedding_mean_distance(judge, images, labels, x, y) < before
    model = factory()
    gx, gy = torch.randn(8, 3, 12, 12, generator=g), torch.arange(4).repeat_interleave(2)
    loss, ce, align = local_loss(model, x[:5], y[:5], gx, gy, hp, refresh=False)
    emb, logits = model.embed_and_logits(x[:5])
    assert torch.isclose(ce, F.cross_entropy(logits, y[:5]))
    assert torch.isclose(align, alignment_loss(emb, y[:5], model.embed(gx), gy)) and torch.isclose(loss, ce + 10 * align)
    loss, ce, align = local_loss(model, x[:5], y[:5], gx, gy, hp, refresh=True)
    assert torch.equal(loss, ce) and float(align) == 0.0
