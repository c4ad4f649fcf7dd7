"""The server tries to regenerate the noise: with everything it observes (the messages it sent and
received, the experiment config with run.seed, the round, the partition ids) it re-runs a client's
computation (a fresh ClientApp, mods included) or its own aggregation, and compares with what it
actually received or released. With private randomness it must fail for dp-sgd, rqm, pbm and
gaussian; with ``privacy.reproducible_noise = true`` it must succeed (so the test can fail)."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedkd import keys
from fedkd.attacks.inline import InlineGrid, NodeHost
from fedkd.data import load_federation
from fedkd.results import RunRecorder
from fedkd.server import run_server, summarize
from fedkd.simulation import node_config
from fedkd.strategies import build_strategy
from tests.conftest import small

N = 2


class Seen:
    """What the server observes, copied at the moment it observes it (aggregation mutates replies)."""

    def __init__(self):
        self.sent, self.replies = {}, {}

    def __call__(self, rnd, sent, replies):
        if not sent or sent[0].metadata.message_type != "train":
            return
        self.sent[rnd] = [copy_message(m) for m in sent]  # Flower reuses the config object across rounds
        self.replies[rnd] = [
            (r, int(r.content[keys.NODE][keys.PARTITION_ID]), {k: np.array(v.numpy(), copy=True) for k, v in r.content[keys.ARRAYS].items()}, dict(r.content[keys.METRICS]))
            for r in replies if not r.has_error()
        ]


def copy_message(m: Message) -> Message:
    content = RecordDict()
    for k, rec in m.content.array_records.items():
        content[k] = ArrayRecord({n: Array(np.array(a.numpy(), copy=True)) for n, a in rec.items()})
    for k, rec in m.content.config_records.items():
        content[k] = ConfigRecord(dict(rec))
    return Message(content, dst_node_id=m.metadata.dst_node_id, message_type=m.metadata.message_type)


def federation(mechanism_overrides, reproducible):
    cfg = small(f"data.num_clients={N}", "model.hidden=[16]", "train.batch_size=16", f"privacy.reproducible_noise={str(reproducible).lower()}", *mechanism_overrides)
    seen = Seen()
    threads = torch.get_num_threads()
    try:
        recorder = RunRecorder(None)
        run_server(InlineGrid(N), cfg, recorder, progress=False, observers=[seen], echo=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    return cfg, seen, summarize_nowrite(cfg, recorder)


def summarize_nowrite(cfg, recorder):
    import time

    from fedkd import server

    orig = server.write_summary
    server.write_summary = lambda out_dir, s: s
    try:
        return summarize(cfg, recorder, time.perf_counter())
    finally:
        server.write_summary = orig


def rerun_clients(seen: Seen, rnd: int = 1) -> list[tuple[dict, dict]]:
    """(received arrays, regenerated arrays) per client: a fresh ClientApp fed the same message."""
    out = []
    sent = {m.metadata.dst_node_id: m for m in seen.sent[rnd]}
    for reply, pid, arrays, _ in seen.replies[rnd]:
        msg = sent[reply.metadata.src_node_id]
        host = NodeHost({msg.metadata.dst_node_id: node_config(pid, N)}, run_id=1)
        again = host.handle([msg])[0]
        assert not again.has_error(), again.error.reason
        out.append((arrays, {k: v.numpy() for k, v in again.content[keys.ARRAYS].items()}))
    return out


CLIENT_SIDE = {
    "dp-sgd": ["privacy.mechanism=dp-sgd", "privacy.noise_multiplier=1.0"],
    "rqm": ["privacy.mechanism=rqm", "privacy.clip=0.05", "privacy.extend=0.05", "privacy.keep_prob=0.5"],
    "pbm": ["privacy.mechanism=pbm", "privacy.clip=0.05", "privacy.theta=0.25"],
}


@pytest.mark.parametrize("mechanism", list(CLIENT_SIDE))
def test_server_cannot_regenerate_client_noise(mechanism):
    for reproducible in (True, False):
        cfg, seen, summary = federation([*CLIENT_SIDE[mechanism], "run.rounds=1"], reproducible)
        for got, again in rerun_clients(seen):
            assert got.keys() == again.keys()
            if mechanism == "dp-sgd":  # weights: noise and Poisson sampling
                diff = max(float(np.abs(got[k] - again[k]).max()) for k in got)
                if reproducible:
                    assert diff < 1e-5
                else:
                    assert diff > 1e-3
            else:  # level indices / binomial counts
                agree = np.mean(np.concatenate([(got[k] == again[k]).ravel() for k in got]))
                if reproducible:
                    assert agree > 0.999
                else:
                    assert agree < 0.9
        if reproducible:
            assert summary["epsilon"] is None and summary["privacy_guarantee"].startswith("NONE")
            assert summary["privacy_noise_source"].startswith("run.seed")
        else:
            assert summary["epsilon"] is not None and summary["epsilon"] > 0 and summary["privacy_noise_source"] == "os-entropy"


def test_server_cannot_regenerate_central_gaussian_noise():
    """Central DP: whoever sees the released global model (and, here, even the clean replies) cannot
    regenerate the noise the server added."""
    for reproducible in (True, False):
        cfg, seen, summary = federation(["privacy.mechanism=gaussian", "privacy.noise_multiplier=1.0"], reproducible)
        released = {k: v.numpy() for k, v in seen.sent[2][0].content[keys.ARRAYS].items()}  # round 1's noisy aggregate
        torch.manual_seed(cfg.run.seed)
        np.random.seed(cfg.run.seed)  # what Flower's wrapper would have drawn from
        spec = build_strategy(cfg, load_federation(cfg.data, cfg.run.seed))
        spec.strategy.current_arrays = seen.sent[1][0].content[keys.ARRAYS]
        spec.strategy._round = 1
        sent = {m.metadata.dst_node_id: m for m in seen.sent[1]}
        replies = [
            Message(RecordDict({keys.ARRAYS: ArrayRecord({k: Array(v.copy()) for k, v in arrays.items()}), keys.METRICS: MetricRecord(metrics)}), reply_to=sent[r.metadata.src_node_id])
            for r, _, arrays, metrics in seen.replies[1]
        ]
        again, _ = spec.strategy.aggregate_train(1, replies)
        diff = max(float(np.abs(released[k] - again[k].numpy()).max()) for k in released)
        if reproducible:
            assert diff < 1e-5
            assert summary["epsilon"] is None
        else:
            assert diff > 0.05  # noise std sigma C / n = 0.5 per coordinate
            assert summary["epsilon"] > 0 and summary["privacy_trust_model"] == "central" and summary["privacy_relation"] == "zero-out"
