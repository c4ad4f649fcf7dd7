"""Labels that match the mathematics: strict central Gaussian rounds, what leaves a client outside the
guarantee, bytes_up counting metrics, FedMD's public set disjoint from the federation, FD's unweighted default."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedkd import keys
from fedkd.attacks.inline import InlineGrid
from fedkd.config import ConfigError
from fedkd.data import load_federation
from fedkd.recording import payload_bytes, reply_bytes
from fedkd.results import RunRecorder
from fedkd.server import run_server
from fedkd.strategies.dp_fedavg import REFUSED_ROUNDS, UniformDPFedAvg
from tests.conftest import small


def _reply(node: int, w: np.ndarray) -> Message:
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    sent = Message(RecordDict({keys.CONFIG: ConfigRecord({})}), dst_node_id=node, message_type="train")
    content = RecordDict({keys.ARRAYS: ArrayRecord({"w": Array(w)}), keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 10, keys.LOSS: 0.5})})
    return Message(content, reply_to=sent)


def test_gaussian_round_with_fewer_replies_than_calibrated_is_refused_not_under_noised():
    s = UniformDPFedAvg(FedAvg(arrayrecord_key=keys.ARRAYS), 1.0, 1.0, 3, run_key="t")
    s.current_arrays = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    REFUSED_ROUNDS["t"] = []
    arrays, _ = s.aggregate_train(1, [_reply(1, np.ones(4, np.float32)), _reply(2, np.ones(4, np.float32))])
    assert arrays is None and REFUSED_ROUNDS["t"] == [1]  # 2 replies, noise calibrated for 3
    arrays, _ = s.aggregate_train(2, [_reply(i, np.ones(4, np.float32)) for i in (1, 2, 3)])
    assert arrays is not None and REFUSED_ROUNDS["t"] == [1]
    a = arrays["w"].numpy()
    b = s.aggregate_train(3, [_reply(i, np.ones(4, np.float32)) for i in (1, 2, 3)])[0]["w"].numpy()
    assert not np.allclose(a, b)  # fresh private noise every release


def test_reply_bytes_count_metrics_and_config_values():
    r = _reply(1, np.ones(4, np.float32))
    assert reply_bytes(r.content) == payload_bytes(r.content) + 2 * 8
    r.content[keys.METRICS][keys.LABEL_COUNTS] = [1, 2, 3]
    assert reply_bytes(r.content) == payload_bytes(r.content) + 5 * 8


def test_fedmd_public_dataset_may_not_overlap_the_federation():
    with pytest.raises(ConfigError) as e:
        small("strategy.name=fedmd", "fedmd.public_dataset=digits")
    assert e.value.key == "fedmd.public_dataset" and "\n" not in str(e.value)
    from fedkd.strategies.fedmd import overlap

    fed = load_federation(small().data, 0)
    assert overlap(fed.clients[1].train, fed) == len(fed.clients[1].train)
    assert overlap(fed.server_test.take(np.arange(5)), fed) == 5
    other = load_federation(small("data.dataset=synthetic-subjects").data, 0)
    assert overlap(other.server_test, fed) == 0


class LabelWeights:
    def __init__(self):
        self.sent = []

    def __call__(self, rnd, sent, replies):
        self.sent += [list(r.content[keys.METRICS][keys.LABEL_COUNTS]) for r in replies if not r.has_error() and keys.LABEL_COUNTS in r.content[keys.METRICS]]


@pytest.mark.parametrize("weighted", [False, True])
def test_fd_sends_label_presence_by_default_and_counts_when_weighted(weighted):
    cfg = small("strategy.name=fd", "data.num_clients=2", "run.rounds=1", "model.hidden=[8]", f"fd.weighted={str(weighted).lower()}", "strategy.fraction_evaluate=0")
    obs = LabelWeights()
    threads = torch.get_num_threads()
    try:
        run_server(InlineGrid(2), cfg, RunRecorder(None), progress=False, observers=[obs], echo=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    fed = load_federation(cfg.data, cfg.run.seed)
    counts = [[int(c) for c in np.bincount(cl.train.y, minlength=10)] for cl in fed.clients]
    expected = counts if weighted else [[int(c > 0) for c in row] for row in counts]
    assert sorted(obs.sent) == sorted(expected)
