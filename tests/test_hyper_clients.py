"""The HyperFL and pFedHN client logics: what leaves a client, private randomness, the attacks' gradient setting,
refused privacy mechanisms, and both strategies end to end on both simulation backends."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, MessageType, RecordDict

from fedkd import keys
from fedkd.attacks.inline import InlineGrid
from fedkd.cli import main
from fedkd.clients.attacked import attacked_batch
from fedkd.config import ConfigError
from fedkd.data import load_federation
from fedkd.experiment import run_experiment
from fedkd.hyper_local import hyperfl_local_update
from fedkd.hypernet import hyperfl_model
from fedkd.models import model_from_config
from fedkd.recording import payload_bytes
from fedkd.results import RunRecorder
from fedkd.server import run_server
from fedkd.strategies import build_strategy

from .conftest import small
from .test_hypernet import run_inline_spec

HYPERFL = ("strategy.name=hyperfl", "model.name=hyperfl-cnn", "data.partitioner=iid", "hyperfl.hnet_epochs=1")
PFEDHN = ("model.name=pfedhn-cnn", "data.partitioner=iid", "pfedhn.inner_steps=3")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (tests/conftest.py)


def inline(cfg):
    fed = load_federation(cfg.data, cfg.run.seed)
    spec = build_strategy(cfg, fed)
    grid = InlineGrid(cfg.data.num_clients)
    df, result, sent = run_inline_spec(cfg, spec, grid)
    return spec, grid, df, result, sent


def contains(haystack: torch.Tensor, needle: torch.Tensor) -> bool:
    """Whether ``needle``'s values appear, in order, as a contiguous run of ``haystack``'s (both flattened)."""
    h, n = haystack.detach().flatten(), needle.detach().flatten()
    if len(n) > len(h):
        return False
    starts = torch.nonzero(h[: len(h) - len(n) + 1] == n[0]).flatten()
    return any(torch.equal(h[s : s + len(n)], n) for s in starts.tolist())


def hyperfl_client_model(cfg, fed, phi: dict, private: dict):
    target = model_from_config(cfg.model, 0, fed.input_shape, fed.num_classes)
    model = hyperfl_model(target, cfg.hyperfl)
    model.load_state_dict({**{f"hypernet.{k}": v for k, v in phi.items()}, **private})
    return model


def test_no_generated_weights_embeddings_or_heads_leave_a_hyperfl_client():
    cfg = small(*HYPERFL, "data.num_clients=3")
    fed = load_federation(cfg.data, 0)
    spec = build_strategy(cfg, fed)
    hnet_shapes = {k: tuple(v.shape) for k, v in spec.initial_arrays.to_torch_state_dict().items()}
    grid = InlineGrid(cfg.data.num_clients)
    checked = {"train": 0, "evaluate": 0}

    def inspect(rnd, msgs, replies):
        for r in replies:
            assert not r.has_error(), r.error.reason
            c = r.content
            assert set(c.config_records) == {keys.NODE} and set(c.metric_records) == {keys.METRICS}
            assert all(isinstance(v, (int, float)) for v in c[keys.METRICS].values())  # scalars only
            if r.metadata.message_type == MessageType.EVALUATE:
                assert not c.array_records
                checked["evaluate"] += 1
                continue
            assert set(c.array_records) == {keys.ARRAYS}
            up = c[keys.ARRAYS].to_torch_state_dict()
            assert {k: tuple(v.shape) for k, v in up.items()} == hnet_shapes  # exactly the hypernetwork
            # the client's secrets right after this reply: its embedding, its head, and the body phi_i generates
            private = grid.host.contexts[r.metadata.src_node_id].state[keys.STATE_HYPERFL].to_torch_state_dict()
            assert set(private) == {"embedding.weight", "head.fc2_weight", "head.fc2_bias"}
            with torch.no_grad():
                model = hyperfl_client_model(cfg, fed, up, private)
                generated = model.generate()
                dead = not model.hypernet.mlp(model.embedding.weight[0]).any()
            assert len(generated) == 6  # conv1, conv2, fc1: weights and biases
            # when every hidden ReLU of the hypernetwork is dead for this embedding (seen once in a full test run: the
            # embedding is drawn from OS entropy), the generated body IS the heads' biases: a function of the shared
            # phi alone, no secret; the embedding and the head must still never leave
            secrets = [*private.items(), *([] if dead else generated.items())]
            for name, secret in secrets:
                assert not any(contains(u, secret) for u in up.values()), f"{name} leaves the client"
            checked["train"] += 1

    run_server(grid, cfg, RunRecorder(None), spec=spec, progress=False, echo=lambda s: None, observers=[inspect])
    assert checked == {"train": 6, "evaluate": 6}  # 3 clients x 2 rounds each
    assert contains(torch.arange(10.0), torch.tensor([3.0, 4.0])) and not contains(torch.arange(10.0), torch.tensor([4.0, 3.0]))


def test_private_parts_and_shuffles_come_from_os_entropy_not_the_run_seed():
    """Two runs with the same seed: the same initial hypernetwork (seeded), different private embeddings, heads and
    updates (OS entropy), for HyperFL and for pFedHN-PC's personal layer."""
    runs = [inline(small(*HYPERFL, "run.rounds=1", "data.num_clients=2", "strategy.fraction_evaluate=0")) for _ in range(2)]
    (spec0, grid0, *_, sent0), (spec1, grid1, *_, sent1) = runs
    for k, v in spec0.initial_arrays.to_torch_state_dict().items():
        torch.testing.assert_close(v, torch.from_numpy(spec1.initial_arrays[k].numpy()))
    for nid in grid0.host.contexts:
        a, b = (g.host.contexts[nid].state[keys.STATE_HYPERFL].to_torch_state_dict() for g in (grid0, grid1))
        assert not torch.equal(a["embedding.weight"], b["embedding.weight"]) and not torch.equal(a["head.fc2_weight"], b["head.fc2_weight"])
    emb = [g.host.contexts[n].state[keys.STATE_HYPERFL]["embedding.weight"].numpy() for g in (grid0, grid1) for n in g.host.contexts]
    assert len({e.tobytes() for e in emb}) == 4  # every client, every run: its own draw
    up0, up1 = ([r for _, _, rs in s for r in rs if r.metadata.src_node_id == grid0.node_ids[0]][0] for s in (sent0, sent1))
    assert not (up0.content[keys.ARRAYS]["mlp.0.weight"].numpy() == up1.content[keys.ARRAYS]["mlp.0.weight"].numpy()).all()

    pc = [inline(small("strategy.name=pfedhn-pc", *PFEDHN, "run.rounds=1", "data.num_clients=2", "strategy.fraction_evaluate=0")) for _ in range(2)]
    heads = [g.host.contexts[n].state[keys.STATE_PFEDHN_HEAD]["fc3.weight"].numpy().tobytes() for _, g, *_ in pc for n in g.host.contexts]
    assert len(set(heads)) == 4


def test_hyperfl_gradient_threat_setting_is_one_head_step_and_one_hypernetwork_step_on_the_batch():
    """What the attacks assume the server knows (fedkd.attacks.hyperfl_inversion): in an attacked round the client
    runs one head step and one hypernetwork step on exactly the attacked images. Replayed from its private state."""
    cfg = small(*HYPERFL, "attack.rounds=[2]", "attack.clients=[0]", "attack.batch_size=3", "strategy.fraction_evaluate=0")
    fed = load_federation(cfg.data, 0)
    spec = build_strategy(cfg, fed)
    grid = InlineGrid(cfg.data.num_clients)
    node0 = grid.node_ids[0]
    kept = {}

    def watch(rnd, msgs, replies):
        for m, r in zip(sorted(msgs, key=lambda m: m.metadata.dst_node_id), sorted(replies, key=lambda r: r.metadata.src_node_id)):
            if m.metadata.dst_node_id == node0 and m.metadata.message_type == MessageType.TRAIN:
                kept[rnd] = (m.content[keys.ARRAYS].to_torch_state_dict(), r.content[keys.ARRAYS].to_torch_state_dict(),
                             grid.host.contexts[node0].state[keys.STATE_HYPERFL].to_torch_state_dict(), dict(r.content[keys.METRICS]))

    run_server(grid, cfg, RunRecorder(None), spec=spec, progress=False, echo=lambda s: None, observers=[watch])
    phi0, phi1, _, metrics = kept[2]
    assert metrics[keys.NUM_EXAMPLES] == 3
    batch = attacked_batch(cfg, fed, 2, 0)
    model = hyperfl_client_model(cfg, fed, phi0, kept[1][2])  # the private state the client kept after round 1
    hp = dataclasses.replace(cfg.hyperfl, head_epochs=1, hnet_epochs=1, batch_size=3)
    hyperfl_local_update(model, torch.from_numpy(batch.x), torch.from_numpy(batch.y), hp, generator=torch.Generator().manual_seed(0))
    for k, v in model.shared_state().items():
        torch.testing.assert_close(phi1[k], v, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(phi0[k], phi1[k]) for k in phi0)


def test_pfedhn_pc_keeps_its_personal_layer_and_momentum_and_returns_only_the_generated_delta():
    cfg = small("strategy.name=pfedhn-pc", *PFEDHN, "run.rounds=2", "strategy.fraction_train=0.5")
    spec, grid, df, result, sent = inline(cfg)
    generated = set(spec.strategy.hnet.shapes)
    assert "fc3.weight" not in generated
    trained = set()
    for rnd, msgs, replies in sent:
        for r in replies:
            assert not r.has_error(), r.error.reason
            if r.metadata.message_type == MessageType.TRAIN:
                assert set(r.content.array_records) == {keys.ARRAYS} and set(r.content[keys.ARRAYS]) == generated
                trained.add(r.metadata.src_node_id)
            else:
                assert not r.content.array_records
    for nid, ctx in grid.host.contexts.items():  # every node was evaluated, so every node has its own last layer
        own = ctx.state[keys.STATE_PFEDHN_HEAD]
        assert {"fc3.weight", "fc3.bias"} <= set(own)
        assert ({"momentum/fc3.weight", "momentum/fc3.bias"} <= set(own)) == (nid in trained)
    srv = df[df["node"] == "server"].pivot_table(index="round", columns="metric", values="value")
    assert len(trained) >= 2 and (srv[keys.HYPER_REJECTED] == 0).all() and np.isfinite(srv.loc[2, "personal_accuracy_mean"])


@pytest.mark.parametrize("strategy", ["hyperfl", "pfedhn", "pfedhn-pc"])
@pytest.mark.parametrize("mechanism", ["dp-sgd", "gaussian", "rqm", "pbm"])
def test_every_privacy_mechanism_is_refused(strategy, mechanism):
    model = "hyperfl-cnn" if strategy == "hyperfl" else "pfedhn-cnn"
    extra = ["privacy.noise_multiplier=1.0"] if mechanism in ("dp-sgd", "gaussian") else []
    with pytest.raises(ConfigError) as e:
        small(f"strategy.name={strategy}", f"model.name={model}", f"privacy.mechanism={mechanism}", *extra)
    assert e.value.key == "privacy.mechanism" and "\n" not in str(e.value) and strategy in str(e.value)


def test_cli_refuses_a_privacy_mechanism_with_exit_2_and_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--set", "strategy.name=pfedhn", "--set", "model.name=pfedhn-cnn", "--set", "privacy.mechanism=gaussian",
            "--set", "privacy.noise_multiplier=1", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "privacy.mechanism" in err and "Traceback" not in err and not out.exists()


# Flower's own engine for every strategy is in `make test-slow` (test_federation.py keeps it in `make test`)
@pytest.mark.parametrize("strategy,backend", [("hyperfl", "fast"), pytest.param("hyperfl", "flower", marks=pytest.mark.slow), ("pfedhn", "fast"),
                                              ("pfedhn-pc", "fast"), pytest.param("pfedhn-pc", "flower", marks=pytest.mark.slow)])
def test_end_to_end_on_both_backends(tmp_path, strategy, backend):
    model = "hyperfl-cnn" if strategy == "hyperfl" else "pfedhn-cnn"
    cfg = small(f"strategy.name={strategy}", f"model.name={model}", "data.partitioner=iid", "data.num_clients=3",
                f"simulation.backend={backend}", "hyperfl.hnet_epochs=1", "pfedhn.inner_steps=3", "simulation.num_actors=1")
    s = run_experiment(cfg, tmp_path / "run", progress=False)
    assert s["status"] == "ok" and not s.get("failures"), s.get("failures") or s.get("error")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    df = pd.read_csv(tmp_path / "run" / "metrics.csv", dtype={"node": str})
    own = df[(df["node"] != "server") & (df["split"] == "test") & (df["round"] == 2)].pivot_table(index="node", columns="metric", values="value")
    assert len(own) == 3  # every client evaluated its personalised model
    assert summary["accuracy"] == pytest.approx(own[keys.GLOBAL_ACCURACY].mean())  # server test set, as for every strategy
    assert summary["personal_accuracy_mean"] == pytest.approx(own[keys.ACCURACY].mean())  # own test splits
    # HyperFL: the hypernetwork up and down; pFedHN: theta_i down (train and evaluate), theta_new - theta_i up
    spec = build_strategy(cfg, load_federation(cfg.data, 0))
    shapes = spec.strategy.hnet_shapes if strategy == "hyperfl" else spec.strategy.hnet.shapes
    per = payload_bytes(RecordDict({keys.ARRAYS: ArrayRecord({k: torch.zeros(v) for k, v in shapes.items()})}))
    # one upload per train reply, one theta_i per train and evaluate message (replies counted from metrics.csv: under a
    # heavily loaded machine Flower's engine has sampled fewer nodes in a round; the accounting must hold either way)
    clients = df[df["node"] != "server"]
    n_train, n_test = (clients[clients["split"] == split].groupby("round")["node"].nunique().sum() for split in ("train", "test"))
    assert n_train >= 2 and n_test == 2 * 3
    assert s["bytes_up_arrays"] == n_train * per and s["bytes_down"] == (n_train + n_test) * per  # bytes_up also counts metrics
