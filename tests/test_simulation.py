"""The fast simulation engine: dynamic assignment, per-message timeouts, actor death, client states,
GPU resource requests, and sweeps on one Ray session (the suite's, see conftest)."""

import json
import pickle
import time

import numpy as np
import pandas as pd
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedkd import keys
from fedkd.cli import main
from fedkd.config import ConfigError
from fedkd.models import model_from_config
from fedkd.simulation import ERROR_ACTOR_DIED, NODE_ID_BASE, ActorPool, FastGrid, plan_actors, state_from_dict, state_to_dict
from fedkd.sweep import grid_configs, run_sweep, split_values
from tests.conftest import small


def test_plan_actors_asks_for_gpu_shares_only_for_cuda():
    cpu = plan_actors(num_actors=0, gpus_per_actor=0.0, device="cpu", cpus=2, gpus=1)
    assert (cpu.num_actors, cpu.num_cpus, cpu.num_gpus) == (2, 1.0, 0.0)
    even = plan_actors(num_actors=4, gpus_per_actor=0.0, device="cuda", cpus=16, gpus=1)
    assert (even.num_actors, even.num_cpus, even.num_gpus, even.threads) == (4, 4.0, 0.25, 4)
    assert plan_actors(num_actors=0, gpus_per_actor=0.5, device="cuda", cpus=8, gpus=2).num_gpus == 0.5
    assert plan_actors(num_actors=2, gpus_per_actor=0.0, device="auto", cpus=2, gpus=2).num_gpus == 1.0
    assert plan_actors(num_actors=2, gpus_per_actor=0.0, device="auto", cpus=2, gpus=0).num_gpus == 0.0
    assert plan_actors(num_actors=0, gpus_per_actor=0.0, device="cpu", cpus=64, gpus=0, remote=True).num_cpus == 1.0
    with pytest.raises(ConfigError, match="run.device"):
        plan_actors(num_actors=2, gpus_per_actor=0.0, device="cuda", cpus=2, gpus=0)
    with pytest.raises(ConfigError, match="simulation.gpus_per_actor"):
        plan_actors(num_actors=2, gpus_per_actor=3.0, device="cuda", cpus=2, gpus=2)
    with pytest.raises(ConfigError, match="simulation.gpus_per_actor"):
        plan_actors(num_actors=2, gpus_per_actor=1.5, device="cuda", cpus=2, gpus=2)


def test_cuda_on_a_ray_without_gpus_is_refused_before_any_actor(_one_ray_session):
    import ray

    ray_pool = _one_ray_session.pool_for(small())
    ray_pool.start()  # the suite's Ray (no GPU here)
    if ray.cluster_resources().get("GPU", 0):
        pytest.skip("this Ray cluster has a GPU")
    pool = ActorPool(device="cuda")
    with pytest.raises(ConfigError, match="run.device"):
        pool.start()
    assert pool.slots == []


def test_state_dict_round_trip_is_exact():
    state = RecordDict({
        "model": ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3)), "b": Array(np.array([1, 2], np.int64))}),
        "m": MetricRecord({"loss": 0.5, "seen": [1, 2]}),
        "c": ConfigRecord({"history": "[[1.0, 2]]", "flag": True, "blob": b"\x00\x01"}),
    })
    back = state_from_dict(pickle.loads(pickle.dumps(state_to_dict(state))))
    assert list(back) == ["model", "m", "c"]
    np.testing.assert_array_equal(back["model"]["w"].numpy(), state["model"]["w"].numpy())
    assert back["model"]["b"].numpy().dtype == np.int64
    assert dict(back["m"]) == {"loss": 0.5, "seen": [1, 2]} and dict(back["c"]) == dict(state["c"])


def _train_messages(cfg, server_round, nodes):
    fed_shape, classes = (1, 8, 8), 10
    model = model_from_config(cfg.model, 0, fed_shape, classes)
    conf = ConfigRecord({keys.EXPERIMENT: cfg.to_json(), keys.CLIENT_LOGIC: "weights", keys.SERVER_ROUND: server_round})
    content = RecordDict({keys.ARRAYS: ArrayRecord(model.state_dict()), keys.CONFIG: conf})
    return [Message(content=content, dst_node_id=NODE_ID_BASE + n, message_type="train") for n in nodes]


def _pool(session, cfg):
    pool = session.pool_for(cfg)
    pool.start(cfg.to_json())
    return pool


def test_hung_client_costs_only_its_own_reply(_one_ray_session):
    cfg = small("faults.kind=hang", "faults.clients=[1]", "faults.hang_s=120")
    pool = _pool(_one_ray_session, cfg)
    replaced = pool.replaced
    with FastGrid(4, pool=pool, warmup=cfg.to_json()) as grid:
        grid.send_and_receive(_train_messages(cfg, 0, range(4)))  # actors warm (round 0: no fault)
        t = time.monotonic()
        grid.send_and_receive(_train_messages(cfg, 0, range(4)))
        limit = max(3.0, 4 * (time.monotonic() - t))  # a loaded machine gets a longer limit
        t = time.monotonic()
        replies = grid.send_and_receive(_train_messages(cfg, 1, range(4)), timeout=limit)
        took = time.monotonic() - t
    assert [n - NODE_ID_BASE for n, _ in grid.abandoned] == [1] and "timeout" in grid.abandoned[0][1]
    assert sorted(r.metadata.src_node_id - NODE_ID_BASE for r in replies) == [0, 2, 3]
    assert not any(r.has_error() for r in replies)
    assert pool.replaced == replaced + 1
    assert took < 2 * limit + 10  # the hung client's 120 s are not waited for


def test_dead_actor_is_replaced_and_client_states_survive(_one_ray_session):
    cfg = small("faults.kind=exit", "faults.clients=[1]", "faults.from_round=2", "privacy.mechanism=dp-sgd", "privacy.noise_multiplier=1.0")
    pool = _pool(_one_ray_session, cfg)
    replaced = pool.replaced
    history = lambda states, pid: json.loads(states[pid][keys.STATE_DP_HISTORY]["items"]["history"])  # noqa: E731
    steps = lambda states, pid: sum(h[-1] for h in history(states, pid))  # noqa: E731  (accountant: (sigma, q, steps))
    with FastGrid(4, pool=pool, warmup=cfg.to_json()) as grid:
        r1 = grid.send_and_receive(_train_messages(cfg, 1, range(4)))
        assert len(r1) == 4 and not any(r.has_error() for r in r1)
        after1 = grid.client_states()
        assert all(steps(after1, p) > 0 for p in range(4))
        r2 = grid.send_and_receive(_train_messages(cfg, 2, range(4)))
        states = grid.client_states()
    by_node = {r.metadata.src_node_id - NODE_ID_BASE: r for r in r2}
    assert sorted(by_node) == [0, 1, 2, 3]
    assert by_node[1].has_error() and by_node[1].error.code == ERROR_ACTOR_DIED
    assert not any(by_node[p].has_error() for p in (0, 2, 3))
    assert pool.replaced >= replaced + 2  # its first batch's actor, then its own (it runs alone the second time)
    assert history(states, 1) == history(after1, 1)  # the dead client's state is its last good one
    assert all(steps(states, p) == 2 * steps(after1, p) for p in (0, 2, 3))
    with FastGrid(4, pool=pool) as other:  # the checkpoint contract: states move between grids
        other.restore_client_states(states)
        assert other.client_states() == states
        with pytest.raises(ValueError, match="partition ids"):
            other.restore_client_states({7: {}})


def test_experiments_in_a_session_reuse_the_actors(_one_ray_session, tmp_path):
    from fedkd.experiment import run_experiment

    cfg = small("data.num_clients=6", "run.rounds=1", "privacy.reproducible_noise=true")  # seeded shuffles: same result on any actor
    pool = _pool(_one_ray_session, cfg)
    actors = [s.actor._actor_id.hex() for s in pool.slots]
    started = _one_ray_session.pools_started
    a = run_experiment(cfg, tmp_path / "a", progress=False)
    b = run_experiment(cfg, tmp_path / "b", progress=False)
    assert a["status"] == b["status"] == "ok" and a["accuracy"] == b["accuracy"]  # any actor, same result
    assert _one_ray_session.pools_started == started and [s.actor._actor_id.hex() for s in pool.slots] == actors


def test_guided_batches_shrink_as_the_queue_drains(_one_ray_session):
    cfg = small()
    pool = _pool(_one_ray_session, cfg)
    grid = FastGrid(4, pool=pool, max_batch=16)
    grid._queue.extend(["x"] * 1000)
    assert grid._batch_size(2) == 16
    grid._queue.clear()
    grid._queue.extend(["x"] * 10)
    assert grid._batch_size(2) == 3
    grid._queue.clear()
    grid._queue.append("x")
    assert grid._batch_size(2) == 1


def test_split_values_and_grid_names():
    assert split_values('0.01,0.05') == ["0.01", "0.05"]
    assert split_values('["mlp","cnn"],"mlp"') == ['["mlp","cnn"]', '"mlp"']
    configs = grid_configs(None, {"train.lr": [0.01, 0.05], "model.name": ['["mlp","cnn"]']}, ["data.num_clients=3", "strategy.name=fd"])
    assert list(configs) == ['train.lr=0.01_model.name=-mlp-cnn', 'train.lr=0.05_model.name=-mlp-cnn']
    assert configs['train.lr=0.05_model.name=-mlp-cnn'].train.lr == 0.05
    assert list(configs['train.lr=0.05_model.name=-mlp-cnn'].model.name) == ["mlp", "cnn"]
    with pytest.raises(ConfigError, match="train.lr"):
        grid_configs(None, {"train.lr": ["-1"]})


def test_sweep_runs_in_one_session_and_resumes(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--set", "data.num_clients=3", "--set", "run.rounds=1", "--set", "train.local_epochs=1", "--grid", "run.seed=0,1", "--out", str(out)]
    assert main(args) == 0
    table = pd.read_csv(out / "sweep.csv")
    assert list(table["name"]) == ["run.seed=0", "run.seed=1"] and set(table["status"]) == {"ok"}
    assert (out / "run.seed=1" / "metrics.csv").is_file()
    (out / "run.seed=1" / "summary.json").unlink()  # as if killed during the second experiment
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "run.seed=0: finished before, skipped" in printed and "run.seed=1: finished" not in printed
    table = pd.read_csv(out / "sweep.csv")
    assert list(table["skipped"]) == [True, False] and set(table["status"]) == {"ok"}
    assert main(["sweep", "--grid", "train.lr=-1", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
