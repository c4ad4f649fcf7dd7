"""One meaning per summary metric for every registered strategy (README "Metrics").

``accuracy``: mean accuracy on the server's test set of what the strategy deploys (its global model, or
each client's own model averaged over clients); ``personal_accuracy``: mean over clients of the
accuracy on their own test splits. Each strategy runs one tiny round in process (no Ray); an observer
keeps the last round's evaluate exchange, from which both figures are recomputed independently.
"""

import numpy as np
import pytest
import torch

from fedkd import keys
from fedkd.attacks.inline import InlineGrid
from fedkd.attacks.runner import client_federation
from fedkd.clients.feddf import own_arrays
from fedkd.data import load_federation
from fedkd.models import build_model
from fedkd.results import RunRecorder
from fedkd.server import run_server, summarize
from fedkd.strategies import STRATEGIES, build_strategy
from fedkd.training import evaluate
from tests.conftest import small

# the smallest settings that still run each strategy's full protocol
EXTRA = {
    "fedmd": ["fedmd.public_epochs=1", "fedmd.private_epochs=1", "fedmd.alignment_size=50", "fedmd.public_fraction=0.1"],
    "feddf": ["feddf.max_steps=10", "feddf.eval_every=5", "feddf.patience=5"],
    "fedlgd": ["model.name=convnet-w32", "data.dataset=digits-domains", "data.partitioner=domain", 'data.domains=["gray", "inverted", "colored"]',
               "data.max_samples=600", "fedlgd.si_tgap=2", "fedlgd.ci_tgap=2", "fedlgd.server_ipc=1", "fedlgd.gm_iterations=10"],
}


def run_tiny(name: str, tmp_path):
    cfg = small(f"strategy.name={name}", "data.num_clients=3", "run.rounds=1", *EXTRA.get(name, []))
    fed = load_federation(cfg.data, cfg.run.seed)
    spec = build_strategy(cfg, fed)
    seen = []
    recorder = RunRecorder(tmp_path)
    threads = torch.get_num_threads()
    try:
        run_server(InlineGrid(cfg.data.num_clients), cfg, recorder, spec=spec, progress=False, echo=lambda s: None,
                   observers=[lambda rnd, sent, replies: seen.append((rnd, sent, replies))])
    finally:
        torch.set_num_threads(threads)
    evals = [(sent, replies) for _, sent, replies in seen if sent and sent[0].metadata.message_type.startswith("evaluate")]
    return cfg, summarize(cfg, recorder, 0.0), evals[-1]


# fedlgd: even its tiny protocol (statistics exchange, server distillation) ran past 13 minutes on the shared
# machine here; not yet covered by this test (TODO: a smaller FedLGD setting).
SLOW = {"fedlgd"}


@pytest.mark.parametrize("name", [n for n in STRATEGIES.names() if n not in SLOW])
def test_summary_metrics_mean_the_same_for_every_strategy(name, tmp_path):
    cfg, summary, (sent, replies) = run_tiny(name, tmp_path)
    assert summary["status"] == "ok"
    assert {"accuracy", "personal_accuracy"} <= set(summary)
    assert 0.0 <= summary["accuracy"] <= 1.0 and 0.0 <= summary["personal_accuracy"] <= 1.0
    replies = [r for r in replies if not r.has_error()]
    assert len(replies) == cfg.data.num_clients
    metrics = [dict(r.content[keys.METRICS]) for r in replies]
    # personal_accuracy: the clients' own-test-split accuracies, unweighted mean
    assert summary["personal_accuracy"] == pytest.approx(np.mean([m[keys.ACCURACY] for m in metrics]))
    fed = load_federation(cfg.data, cfg.run.seed)
    personal = all(keys.GLOBAL_ACCURACY in m for m in metrics)  # clients scored their own models on the server test set
    weights = {m.metadata.dst_node_id: m.content[keys.ARRAYS] for m in sent if keys.ARRAYS in m.content and len(m.content[keys.ARRAYS])}
    if not personal:  # a global model: recompute both figures from the arrays the server sent
        assert weights, f"{name}: clients report no {keys.GLOBAL_ACCURACY}, so the server must send the global model"
        own_fed = client_federation(cfg)
        server_acc, client_acc = {}, []
        for r in replies:
            node = r.content[keys.NODE]
            arch, pid = str(node[keys.MODEL_NAME]), int(node[keys.PARTITION_ID])
            model = build_model(arch, fed.input_shape, fed.num_classes, hidden=cfg.model.hidden if arch == "mlp" else None)
            model.load_state_dict(own_arrays(weights[r.metadata.src_node_id], arch).to_torch_state_dict())
            server_acc[arch] = evaluate(model, fed.server_test)[1]
            client_acc.append(evaluate(model, own_fed.clients[pid].test)[1])
        assert summary["accuracy"] == pytest.approx(np.mean(list(server_acc.values())))
        assert summary["personal_accuracy"] == pytest.approx(np.mean(client_acc))
    else:  # the clients' own models (whatever the server sent them): their replies' accuracy on the server test set, averaged
        assert summary["accuracy"] == pytest.approx(np.mean([m[keys.GLOBAL_ACCURACY] for m in metrics]))
