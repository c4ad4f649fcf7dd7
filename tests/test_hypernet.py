"""Hypernetworks (HyperFL, pFedHN): the VJP against explicit and hand-computed gradients, the two-stage local round,
what a HyperFL client uploads, the config sections, and both strategies run in-process with their client logics."""

import copy
import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from torch.nn import functional as F

from fedkd import keys
from fedkd.config import ConfigError
from fedkd.data import load_federation
from fedkd.hyper_local import hyperfl_local_update
from fedkd.hypernet import PFedHNHypernet, check_state, classifier_names, hyperfl_model, hypernet_vjp, pfedhn_step
from fedkd.models import build_model
from fedkd.strategies.hyperfl import build_hyperfl
from fedkd.strategies.pfedhn import build_pfedhn

from .conftest import small


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny models: one torch thread (tests/conftest.py)


def digits_cfg(*overrides):
    return small("model.name=hyperfl-cnn", "data.partitioner=iid", *overrides)


def client_model(seed=0, hp=None):
    torch.manual_seed(seed)
    hp = hp or digits_cfg().hyperfl
    return hyperfl_model(build_model("hyperfl-cnn", (1, 8, 8), 10), hp, torch.Generator().manual_seed(seed + 1))


def test_target_cnns_match_the_papers_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(build_model("hyperfl-cnn", (1, 28, 28), 62)) == 416 + 12832 + 102528 + 128 * 62 + 62  # CNN_FMNIST, EMNIST
    assert count(build_model("hyperfl-cnn", (3, 32, 32), 10)) == 107690  # CifarCNN
    assert count(build_model("pfedhn-cnn", (3, 32, 32), 10)) == 1216 + 12832 + 96120 + 10164 + 850  # CNNTarget
    for name in ("hyperfl-cnn", "pfedhn-cnn"):  # the head is the last Linear, whatever precedes it
        assert classifier_names(build_model(name, (1, 8, 8), 10, dropout=0.2))[0] == ("fc2.weight" if name == "hyperfl-cnn" else "fc3.weight")


def test_backprop_through_generated_weights_is_the_explicit_vjp():
    model = client_model(3)
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    params = list(model.hypernet.parameters()) + list(model.embedding.parameters())
    auto = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    # The authors' route: dL/dtheta at the generated weights, then autograd.grad(theta, phi, grad_outputs=dL/dtheta).
    generated = model.generate()
    leaves = {k: v.detach().requires_grad_() for k, v in generated.items()}
    dl_dtheta = torch.autograd.grad(F.cross_entropy(model(x, leaves), y), list(leaves.values()))
    explicit = torch.autograd.grad(list(generated.values()), params, grad_outputs=list(dl_dtheta))
    for a, b in zip(auto, explicit):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert float(auto[-1].norm()) > 0  # the private embedding gets a gradient too


def test_pfedhn_vjp_equals_a_hand_computed_one_on_a_tiny_hypernetwork():
    torch.manual_seed(0)
    hnet = PFedHNHypernet(3, {"w": torch.Size([2, 2]), "b": torch.Size([2])}, embed_dim=2, hidden=3, n_hidden=1)
    delta = {"w": torch.randn(2, 2), "b": torch.randn(2)}
    grads = dict(zip([n for n, _ in hnet.named_parameters()], hypernet_vjp(hnet(1), delta, list(hnet.parameters()))))
    # by hand: v -> z0 = A v + a -> r = relu(z0) -> z1 = B r + b1 -> theta_k = H_k z1 + h_k; cotangent u = -delta
    v = hnet.embeddings.weight[1].detach()
    A, a = hnet.mlp[0].weight.detach(), hnet.mlp[0].bias.detach()
    B, b1 = hnet.mlp[2].weight.detach(), hnet.mlp[2].bias.detach()
    z0 = A @ v + a
    r = torch.relu(z0)
    z1 = B @ r + b1
    gz1 = torch.zeros(3)
    for k in ("w", "b"):
        u = -delta[k].reshape(-1)
        H = hnet.heads.linear[k].weight.detach()
        torch.testing.assert_close(grads[f"heads.linear.{k}.weight"], torch.outer(u, z1))
        torch.testing.assert_close(grads[f"heads.linear.{k}.bias"], u)
        gz1 += H.T @ u
    gr = B.T @ gz1
    gz0 = gr * (z0 > 0)
    torch.testing.assert_close(grads["mlp.2.weight"], torch.outer(gz1, r))
    torch.testing.assert_close(grads["mlp.2.bias"], gz1)
    torch.testing.assert_close(grads["mlp.0.weight"], torch.outer(gz0, v))
    torch.testing.assert_close(grads["mlp.0.bias"], gz0)
    emb = torch.zeros(3, 2)
    emb[1] = A.T @ gz0
    torch.testing.assert_close(grads["embeddings.weight"], emb)  # only the client's own row

    # One server step: clip to norm 50 over all parameters, then SGD (momentum's first step = the gradient).
    big = {k: 1e3 * d for k, d in delta.items()}
    raw = hypernet_vjp(hnet(1), big, list(hnet.parameters()))
    total = float(torch.sqrt(sum((g * g).sum() for g in raw)))
    before = [p.detach().clone() for p in hnet.parameters()]
    opt = hnet.optimizer(lr=0.01, momentum=0.9, weight_decay=1e-3)
    norm = pfedhn_step(hnet, opt, 1, big, clip=50.0)
    assert norm == pytest.approx(total, rel=1e-5) and total > 50
    for p0, g, p1 in zip(before, raw, hnet.parameters()):
        torch.testing.assert_close(p1.detach(), p0 - 0.01 * (g * 50.0 / (total + 1e-6) + 1e-3 * p0))


def test_hyperfl_round_trains_head_then_hypernetwork_and_uploads_only_the_hypernetwork():
    cfg = digits_cfg()
    fed = load_federation(cfg.data, 0)
    x, y = torch.from_numpy(fed.clients[0].train.x), torch.from_numpy(fed.clients[0].train.y)
    model = client_model(1, cfg.hyperfl)
    g = torch.Generator().manual_seed(0)
    snap = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}  # noqa: E731
    s0 = snap(model)
    hyperfl_local_update(model, x, y, dataclasses.replace(cfg.hyperfl, hnet_epochs=0), generator=g)
    s1 = snap(model)
    changed = {k for k in s0 if not torch.equal(s0[k], s1[k])}
    assert changed == {k for k in s0 if k.startswith("head.")}  # stage 1: the head only
    res = hyperfl_local_update(model, x, y, dataclasses.replace(cfg.hyperfl, head_epochs=0, hnet_epochs=1), generator=g)
    s2 = snap(model)
    changed = {k for k in s1 if not torch.equal(s1[k], s2[k])}
    assert "embedding.weight" in changed and not any(k.startswith("head.") for k in changed)
    assert {k for k in changed if k.startswith("hypernet.")} == {k for k in s0 if k.startswith("hypernet.")}
    assert res.steps == -(-len(y) // cfg.hyperfl.batch_size) and np.isfinite(res.loss)

    up = model.shared_state()
    assert set(up) == {k.removeprefix("hypernet.") for k in s0 if k.startswith("hypernet.")}
    private = list(model.private_state().values()) + [t.detach() for t in model.generate().values()]
    for arr in up.values():  # no embedding, head or generated weight is among the uploaded tensors
        assert not any(arr.shape == p.shape and torch.equal(arr, p) for p in private)
    assert set(model.private_state()) == {"embedding.weight", "head.fc2_weight", "head.fc2_bias"}


def test_hyperfl_server_averages_hypernetworks_by_size_and_refuses_leaky_or_broken_replies(monkeypatch):
    cfg = digits_cfg()
    fed = load_federation(cfg.data, 0)
    strategy = build_hyperfl(cfg, fed).strategy
    hnet = client_model(0, cfg.hyperfl).hypernet
    base = {k: v.detach() for k, v in hnet.state_dict().items()}
    states = [{k: v + i for k, v in base.items()} for i in range(3)]
    leaky = {**states[0], "embedding.weight": torch.zeros(1, 64)}
    nan = {k: v.clone() for k, v in states[0].items()}
    next(iter(nan.values()))[0] = float("nan")
    replies = [fake_reply(1000 + i, ArrayRecord(s), n) for i, (s, n) in enumerate(zip(states, (10, 30, 60)))]
    replies += [fake_reply(1003, ArrayRecord(leaky), 10), fake_reply(1004, ArrayRecord(nan), 10)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics[keys.HYPER_REJECTED] == 2
    avg = arrays.to_torch_state_dict()
    for k in base:
        torch.testing.assert_close(avg[k], base[k] + (0 * 10 + 1 * 30 + 2 * 60) / 100)
    assert any("unexpected ['embedding.weight']" in r for r in strategy.rejected[1])
    assert check_state(states[0], {k: v.shape for k, v in base.items()}) is None


def test_config_sections_have_the_papers_defaults_and_refuse_bad_values():
    cfg = small()
    h, p = cfg.hyperfl, cfg.pfedhn
    assert (h.embed_dim, h.hidden_dim, h.head_epochs, h.head_lr, h.hnet_epochs, h.hnet_lr, h.clip, h.batch_size) == (64, 128, 1, 0.1, 5, 0.02, 50.0, 50)
    assert (h.head_momentum, h.hnet_momentum, h.head_weight_decay, h.hnet_weight_decay) == (0.5, 0.5, 5e-4, 5e-4)
    assert (p.hidden_dim, p.n_hidden, p.inner_steps, p.inner_lr, p.batch_size, p.clip) == (100, 3, 50, 5e-3, 64, 50.0)
    assert (p.server_lr("pfedhn"), p.server_lr("pfedhn-pc"), p.momentum, p.weight_decay, p.inner_weight_decay) == (1e-2, 5e-2, 0.9, 1e-3, 5e-5)
    assert p.embedding_size(50) == 13 and p.embedding_size(10) == 3
    for bad, key in (("hyperfl.hnet_lr=0", "hyperfl.hnet_lr"), ("hyperfl.head_momentum=1", "hyperfl.head_momentum"),
                     ("pfedhn.inner_steps=0", "pfedhn.inner_steps"), ("pfedhn.lr=-1", "pfedhn.lr"), ("pfedhn.momentum=1.5", "pfedhn.momentum")):
        with pytest.raises(ConfigError, match=f"^{key}: "):
            small(bad)
    with pytest.raises(ConfigError, match="^model.name: "):
        build_hyperfl(small('model.name=["cnn", "mlp"]'), load_federation(small().data, 0))


# --------------------------------------------------------------------------- in-process runs (InlineGrid, real clients)
def fake_reply(node_id: int, arrays: ArrayRecord, n: int) -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    msg = Message(RecordDict({keys.CONFIG: ConfigRecord()}), dst_node_id=node_id, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = f"m{node_id}"
    return Message(RecordDict({keys.ARRAYS: arrays, keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: n})}), reply_to=msg)


def run_inline_spec(cfg, spec, grid=None):
    """Run ``spec`` on an InlineGrid (the real ClientApp and client logics in this process; ``grid.host.contexts``
    holds every node's Context). Returns the metric rows, the run's result and every (round, messages, replies)."""
    from fedkd.attacks.inline import InlineGrid
    from fedkd.results import RunRecorder
    from fedkd.server import run_server

    recorder = RunRecorder(None)
    sent = []
    result = run_server(grid or InlineGrid(cfg.data.num_clients), cfg, recorder, spec=spec, progress=False, echo=lambda s: None,
                        observers=[lambda rnd, msgs, replies: sent.append((rnd, msgs, replies))])
    return pd.DataFrame(recorder.rows), result, sent


def test_hyperfl_runs_in_process_and_evaluates_personal_models():
    cfg = digits_cfg("run.rounds=2", "hyperfl.hnet_epochs=2")
    spec = build_hyperfl(cfg, load_federation(cfg.data, 0))
    assert spec.client == "hyperfl"  # the real client logic (clients/hyperfl.py)
    df, result, sent = run_inline_spec(cfg, spec)
    hnet_keys = set(spec.initial_arrays)
    for rnd, msgs, replies in sent:
        assert all(set(m.content[keys.ARRAYS]) == hnet_keys for m in msgs)  # train and evaluate: the hypernetwork down
        for r in replies:
            assert not r.has_error(), r.error.reason if r.has_error() else ""
            if r.metadata.message_type == MessageType.TRAIN:  # the hypernetwork up, nothing else
                assert set(r.content.array_records) == {keys.ARRAYS} and set(r.content[keys.ARRAYS]) == hnet_keys
            else:
                assert not r.content.array_records
    # the final hypernetwork is the last round's replies averaged by training-set size
    last = [r for rnd, msgs, replies in sent if rnd == 2 and msgs[0].metadata.message_type == MessageType.TRAIN for r in replies]
    n = np.array([r.content[keys.METRICS][keys.NUM_EXAMPLES] for r in last], dtype=np.float64)
    for k, v in result.arrays.to_torch_state_dict().items():
        avg = sum(w * r.content[keys.ARRAYS][k].numpy().astype(np.float64) for w, r in zip(n / n.sum(), last))
        np.testing.assert_allclose(v.numpy(), avg, rtol=1e-4, atol=1e-6)
    srv = df[df["node"] == "server"].pivot_table(index="round", columns="metric", values="value")
    own = df[(df["node"] != "server") & (df["split"] == "test") & (df["metric"] == keys.GLOBAL_ACCURACY) & (df["round"] == 2)]
    assert list(srv.index) == [1, 2] and len(own) == 4
    assert srv.loc[2, "accuracy"] == pytest.approx(own["value"].mean()) == pytest.approx(srv.loc[2, "personal_global_accuracy_mean"])
    assert 0 <= srv.loc[2, "personal_accuracy_mean"] <= 1 and srv.loc[2, keys.HYPER_REJECTED] == 0


@pytest.mark.parametrize("variant", ["pfedhn", "pfedhn-pc"])
def test_pfedhn_round_is_one_vjp_step_per_reply_with_partial_participation(variant):
    cfg = small("model.name=pfedhn-cnn", "data.partitioner=iid", "run.rounds=3", "strategy.fraction_train=0.5", "pfedhn.inner_steps=3")
    spec = build_pfedhn(cfg, load_federation(cfg.data, 0), variant)
    assert spec.client == variant  # the real client logics (clients/pfedhn.py)
    strategy = spec.strategy
    # replay the server independently from its initial state and the recorded messages
    ref = copy.deepcopy(strategy.hnet)
    ref.load_state_dict(spec.initial_arrays.to_torch_state_dict())
    opt = ref.optimizer(cfg.pfedhn.server_lr(variant), cfg.pfedhn.momentum, cfg.pfedhn.weight_decay)
    df, result, sent = run_inline_spec(cfg, spec)
    generated = set(strategy.hnet.shapes)
    assert ("fc3.weight" in generated) == (variant == "pfedhn")  # pFedHN-PC keeps the last layer on the client
    assert sorted(strategy.rows.values()) == [0, 1, 2, 3]
    train = [(msgs, replies) for _, msgs, replies in sent if msgs and msgs[0].metadata.message_type == MessageType.TRAIN]
    assert [len(m) for m, _ in train] == [2, 2, 2]  # half of the 4 nodes per round
    for msgs, replies in train:
        at_start = copy.deepcopy(ref)
        for m in msgs:  # each sampled node gets its own theta_i = h(v_i; phi) at the round's start
            row = strategy.rows[m.metadata.dst_node_id]
            with torch.no_grad():
                want = at_start(row)
            assert set(m.content[keys.ARRAYS]) == generated
            for k, v in m.content[keys.ARRAYS].to_torch_state_dict().items():
                torch.testing.assert_close(v, want[k])
        for r in sorted(replies, key=lambda r: r.metadata.src_node_id):  # one step per reply, in node order
            assert not r.has_error() and set(r.content[keys.ARRAYS]) == generated
            pfedhn_step(ref, opt, strategy.rows[r.metadata.src_node_id], r.content[keys.ARRAYS].to_torch_state_dict(), 50.0, jacobian_at=at_start)
    final = result.arrays.to_torch_state_dict()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(final[k], v)
    assert final["embeddings.weight"].shape == (4, cfg.pfedhn.embedding_size(4))
    assert all("embeddings.weight" not in m.content[keys.ARRAYS] for _, msgs, _ in sent for m in msgs)
    srv = df[df["node"] == "server"].pivot_table(index="round", columns="metric", values="value")
    assert (srv[keys.HYPER_REJECTED] == 0).all() and (srv[keys.PFEDHN_GRAD_NORM] > 0).all()
    own = df[(df["node"] != "server") & (df["metric"] == keys.ACCURACY) & (df["split"] == "test") & (df["round"] == 3)]
    assert len(own) == 4 and srv.loc[3, "personal_accuracy_mean"] == pytest.approx(own["value"].mean())


def test_pfedhn_refuses_replies_it_cannot_use():
    cfg = small("model.name=pfedhn-cnn", "data.partitioner=iid")
    strategy = build_pfedhn(cfg, load_federation(cfg.data, 0)).strategy
    strategy.sent = {1000: strategy.row(1000)}
    strategy.generator_copy = copy.deepcopy(strategy.hnet)
    before = strategy.state().to_torch_state_dict()
    good = {k: torch.zeros(s) for k, s in strategy.hnet.shapes.items()}
    bad_shape = {**good, "fc3.bias": torch.zeros(3)}
    arrays, _ = strategy.aggregate_train(1, [fake_reply(1000, ArrayRecord(bad_shape), 5), fake_reply(1001, ArrayRecord(good), 5)])
    assert strategy.train_stats[1][keys.HYPER_REJECTED] == 2  # wrong shape; a node that was sent nothing
    assert "fc3.bias has shape (3,)" in strategy.rejected[1][0] and "was not sent a model" in strategy.rejected[1][1]
    for k, v in arrays.to_torch_state_dict().items():
        torch.testing.assert_close(v, before[k])
