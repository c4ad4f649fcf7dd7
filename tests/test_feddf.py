"""FedDF: distillation math against brute force, config errors, and a heterogeneous mlp+cnn run end to end."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord

from fedkd.config import ConfigError
from fedkd.data import load_federation
from fedkd.experiment import run_experiment
from fedkd.models import build_model
from fedkd.strategies.feddf import FedDFConfig, distill_kl, ensemble_distill, feddf_federation, pack, proxy_split, unpack
from tests.conftest import small


def test_distill_kl_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    for temp in (1.0, 3.0):
        p = torch.softmax(t / temp, 1)
        q = torch.softmax(s / temp, 1)
        brute = sum(float((p[i] * (p[i] / q[i]).log()).sum()) for i in range(5)) / 5 * temp**2
        assert distill_kl(s, t, temp).item() == pytest.approx(brute, rel=1e-5)
    assert distill_kl(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_pack_unpack_roundtrip():
    groups = {n: ArrayRecord(build_model(n, (1, 8, 8), 10).state_dict()) for n in ("mlp", "cnn")}
    back = unpack(pack(groups))
    assert set(back) == {"mlp", "cnn"}
    for n in groups:
        assert list(back[n].keys()) == list(groups[n].keys())
        for k in groups[n]:
            np.testing.assert_array_equal(back[n][k].numpy(), groups[n][k].numpy())


def test_ensemble_distillation_moves_student_to_teacher():
    torch.manual_seed(0)
    x = torch.rand(200, 1, 8, 8).numpy()
    teacher = build_model("cnn", (1, 8, 8), 10)
    student = build_model("mlp", (1, 8, 8), 10)
    with torch.no_grad():
        t = teacher(torch.from_numpy(x)) * 3
    hp = FedDFConfig(max_steps=80, eval_every=20, patience=80, lr=1e-2)
    stats = ensemble_distill(student, t[:160], t[160:], x[:160], x[160:], hp, "cpu", seed=0)
    assert stats["val_kl_after"] < 0.5 * stats["val_kl_before"]
    assert stats["best_step"] > 0


def test_bad_hyperparameters_name_the_key():
    with pytest.raises(ConfigError, match=r"^feddf\.temperature: must be > 0"):
        small("strategy.name=feddf", "feddf.temperature=0")
    with pytest.raises(ConfigError, match=r"^feddf\.proxy_fraction:.*empty proxy split"):
        small("strategy.name=feddf", "feddf.proxy_fraction=0")
    cfg = small("strategy.name=feddf")
    tiny = load_federation(cfg.data, 0).server_test.take(np.arange(3))
    with pytest.raises(ConfigError, match=r"^feddf\.proxy_fraction: leaves an empty proxy split"):
        proxy_split(tiny, FedDFConfig(val_fraction=0.1), 0)


def test_proxy_pool_is_held_out_of_every_client_and_the_test_set():
    cfg = small("strategy.name=feddf")
    own, plain = feddf_federation(cfg), load_federation(cfg.data, 0)
    tr, va = proxy_split(own.public, cfg.feddf, 0)
    assert len(tr) + len(va) == len(own.public) == round(cfg.feddf.proxy_fraction * sum(len(c.train) + len(c.test) for c in plain.clients))
    rows = lambda d: {r.tobytes() for r in d.x.reshape(len(d), -1)}  # noqa: E731
    proxy = rows(own.public)
    assert not rows(tr) & rows(va)
    assert not proxy & rows(own.server_test), "the proxy pool is not the test set"
    np.testing.assert_array_equal(own.server_test.x, plain.server_test.x)  # same test set as every strategy
    for c in own.clients:
        assert not proxy & (rows(c.train) | rows(c.test)), f"client {c.partition_id} holds proxy data"


def test_clients_train_without_the_proxy_pool():
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fedkd import keys
    from fedkd.clients.base import client_env

    cfg = small("strategy.name=feddf")
    msg = Message(RecordDict({keys.CONFIG: ConfigRecord({keys.EXPERIMENT: cfg.to_json(), keys.SERVER_ROUND: 1})}), dst_node_id=1, message_type="train")
    env = client_env(msg, Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 4}, state=RecordDict(), run_config={}))
    assert env.federation is feddf_federation(cfg)
    rows = lambda d: {r.tobytes() for r in d.x.reshape(len(d), -1)}  # noqa: E731
    assert len(env.data.train) > 0 and not rows(env.data.train) & rows(env.federation.public)


def test_feddf_heterogeneous_end_to_end(tmp_path):
    cfg = small("strategy.name=feddf", 'model.name=["mlp", "cnn"]', "train.local_epochs=2", "feddf.max_steps=40", "feddf.eval_every=10", "feddf.patience=20")
    summary = run_experiment(cfg, tmp_path / "run", progress=False)
    assert summary["status"] == "ok" and summary["accuracy"] > 0.15  # 2 short rounds; chance is 0.1
    df = pd.read_csv(tmp_path / "run" / "metrics.csv", dtype={"node": str})
    server = df[(df["node"] == "server") & (df["round"] == 2)].set_index("metric")["value"]
    assert {"accuracy", "accuracy_mlp", "accuracy_cnn"} <= set(server.index)
    assert server["distill_steps_mlp"] > 0 and server["distill_steps_cnn"] > 0
    assert server["distill_val_kl_mlp"] <= server["distill_val_kl_before_mlp"]
    assert server["accuracy"] == pytest.approx((server["accuracy_mlp"] + server["accuracy_cnn"]) / 2)
    # FedDF sends weights: up = every client's model every round (clients 0, 2 run mlp; 1, 3 cnn)
    nbytes = {n: sum(len(a.data) for a in ArrayRecord(build_model(n, (1, 8, 8), 10).state_dict()).values()) for n in ("mlp", "cnn")}
    m, c = nbytes["mlp"], nbytes["cnn"]
    assert summary["bytes_up_arrays"] == 2 * (2 * m + 2 * c)
    # down: round-1 train messages carry both groups (architectures not known yet), then only the own group
    assert summary["bytes_down"] == 4 * (m + c) + 3 * (2 * m + 2 * c)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["strategy"] == "feddf"
