"""FedLGD's client (clients/fedlgd.py): what it keeps, what it sends, and whole federations on both backends."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedkd import keys
from fedkd.clients import CLIENTS
from fedkd.clients.base import ClientEnv
from fedkd.config import PRIVACY_MECHANISMS, ConfigError, load_config
from fedkd.data import load_federation
from fedkd.distill import list_grids
from fedkd.experiment import run_experiment
from fedkd.models import model_from_config
from fedkd.strategies.fedlgd import DISCLOSURE, global_record

TINY = [
    "strategy.name=fedlgd", "model.name=convnet-w32", "data.dataset=digits-domains", "data.partitioner=domain", "data.num_clients=3",
    'data.domains=["gray", "inverted", "colored"]', "data.max_samples=450", "run.rounds=2", "train.local_epochs=1", "train.lr=0.01",
    "strategy.fraction_evaluate=0", "fedlgd.ipc=2", "fedlgd.server_ipc=1", "fedlgd.warmup_iterations=2", "fedlgd.dm_iterations=2",
    "fedlgd.gm_iterations=3", "fedlgd.real_batch=8", "fedlgd.si_tgap=1", "fedlgd.ci_tgap=1", "simulation.num_actors=1",
]


def tiny(*more):
    return load_config(None, TINY + list(more))


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)




def image_arrays(msg: Message) -> list[tuple[str, tuple]]:
    """Every array in a message whose trailing shape is an image's (C, H, W), with its record and key."""
    out = []
    for name, rec in msg.content.array_records.items():
        for k, arr in rec.items():
            if len(arr.shape) >= 3 and tuple(arr.shape[-3:]) == (3, 28, 28):
                out.append((f"{name}/{k}", tuple(arr.shape)))
    return out


def train_message(cfg, fed, server_round: int, version: int, *, with_global: bool, refresh=False, local_dm=False) -> Message:
    torch.manual_seed(0)
    model = model_from_config(cfg.model, 0, fed.input_shape, fed.num_classes)
    conf = ConfigRecord({keys.EXPERIMENT: cfg.to_json(), keys.CLIENT_LOGIC: "fedlgd", keys.SERVER_ROUND: server_round,
                         keys.PHASE: keys.FEDLGD_TRAIN_PHASE, keys.FEDLGD_VERSION: version, keys.FEDLGD_REFRESH: refresh, keys.FEDLGD_LOCAL_DM: local_dm})
    content = RecordDict({keys.ARRAYS: ArrayRecord(model.state_dict()), keys.CONFIG: conf})
    if with_global:
        g = torch.Generator().manual_seed(1)
        content[keys.FEDLGD_GLOBAL] = global_record(torch.randn(fed.num_classes, 3, 28, 28, generator=g), torch.arange(fed.num_classes))
    return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)


def test_client_keeps_its_virtual_data_sends_weights_only_and_draws_from_os_entropy(tmp_path, one_thread):
    cfg = tiny(f"fedlgd.local_image_dir={tmp_path}")
    fed = load_federation(cfg.data, cfg.run.seed)
    client = CLIENTS.get("fedlgd")()
    ctx = Context(run_id=1, node_id=7, node_config={keys.NODE_PARTITION_ID: 0}, state=RecordDict(), run_config={})
    env = lambda r: ClientEnv(cfg, 0, r, fed, torch.device("cpu"))  # noqa: E731

    # round 1: warm-up of ipc images per class it holds, then training; the reply is the model's weights and scalars
    msg = train_message(cfg, fed, 1, 0, with_global=True, refresh=True)
    out = client.train(msg, ctx, env(1))
    assert set(out.content.array_records) == {keys.ARRAYS} and image_arrays(out) == []
    assert set(out.content[keys.ARRAYS].keys()) == set(msg.content[keys.ARRAYS].keys())
    assert all(isinstance(v, (int, float)) for v in out.content[keys.METRICS].values())
    m1 = out.content[keys.METRICS]
    assert m1["fedlgd_warmup_iterations"] == 2 and m1["fedlgd_align_loss"] == 0.0  # refresh round: plain CE
    local = ctx.state[keys.STATE_FEDLGD_LOCAL]
    held = np.unique(fed.clients[0].train.y)
    assert local["images"].numpy().shape == (2 * len(held), 3, 28, 28) and sorted(set(local["labels"].numpy())) == held.tolist()
    assert (tmp_path / "virtual" / "client0-round0001.png").is_file()

    # round 2: the global data is not sent again (kept version 0); no warm-up; CE + SupCon
    before = local["images"].numpy().copy()
    out = client.train(train_message(cfg, fed, 2, 0, with_global=False), ctx, env(2))
    m2 = out.content[keys.METRICS]
    assert "fedlgd_warmup_s" not in m2 and m2["fedlgd_align_loss"] > 0 and image_arrays(out) == []
    assert np.array_equal(ctx.state[keys.STATE_FEDLGD_LOCAL]["images"].numpy(), before)  # DM only in DM rounds
    # round 3: iterative DM with the received model changes the local virtual data, and a grid is written
    client.train(train_message(cfg, fed, 3, 0, with_global=False, local_dm=True), ctx, env(3))
    assert not np.array_equal(ctx.state[keys.STATE_FEDLGD_LOCAL]["images"].numpy(), before)
    assert (tmp_path / "virtual" / "client0-round0003.png").is_file() and not (tmp_path / "virtual" / "client0-round0002.png").exists()
    # evaluation: the received model on the own test split, normalised as in training
    ev = client.evaluate(train_message(cfg, fed, 3, 0, with_global=False), ctx, env(3)).content[keys.METRICS]
    assert ev[keys.NUM_EXAMPLES] == len(fed.clients[0].test) and 0 <= ev[keys.ACCURACY] <= 1
    # a version it does not hold fails the round (the server then sends the data again)
    with pytest.raises(ValueError, match="version 0, the round needs 1"):
        client.train(train_message(cfg, fed, 4, 1, with_global=False), ctx, env(4))

    # the same messages on a fresh node give other virtual images: the draws are not a function of run.seed
    ctx2 = Context(run_id=1, node_id=8, node_config={keys.NODE_PARTITION_ID: 0}, state=RecordDict(), run_config={})
    client.train(train_message(cfg, fed, 1, 0, with_global=True, refresh=True), ctx2, env(1))
    ctx3 = Context(run_id=1, node_id=9, node_config={keys.NODE_PARTITION_ID: 0}, state=RecordDict(), run_config={})
    client.train(train_message(cfg, fed, 1, 0, with_global=True, refresh=True), ctx3, env(1))
    assert not np.allclose(ctx2.state[keys.STATE_FEDLGD_LOCAL]["images"].numpy(), ctx3.state[keys.STATE_FEDLGD_LOCAL]["images"].numpy())


def test_fedlgd_runs_the_convnet_only():
    from fedkd.models import build_model

    assert build_model("convnet-w32", (3, 28, 28), 10).embedding_dim == 32 * 3 * 3  # the reduced-width ConvNet
    for bad in ("model.name=cnn", 'model.name=["convnet", "convnet-w32"]'):
        with pytest.raises(ConfigError) as e:
            tiny(bad)
        assert e.value.key == "model.name"


def test_fedlgd_refuses_every_privacy_mechanism(capsys):
    from fedkd.cli import main

    for mech in PRIVACY_MECHANISMS:
        if mech == "none":
            continue
        extra = ["privacy.noise_multiplier=1.0"] if mech in ("dp-sgd", "gaussian") else []
        with pytest.raises(ConfigError) as e:
            tiny(f"privacy.mechanism={mech}", *extra)
        assert e.value.key == "privacy.mechanism", (mech, str(e.value))
    args = ["run", "--no-progress"] + [a for s in TINY for a in ("--set", s)] + ["--set", "privacy.mechanism=rqm"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "privacy.mechanism" in err[0]


def exchanges():
    log = []

    def observe(server_round, sent, replies):
        log.append((server_round, sent, replies))

    return log, observe


@pytest.mark.parametrize("backend", ["fast", pytest.param("flower", marks=pytest.mark.slow)])  # flower: make test-slow
def test_two_round_federation_end_to_end(backend, tmp_path, capsys):
    cfg = tiny(f"simulation.backend={backend}")
    log, observe = exchanges()
    out = tmp_path / "run"
    summary = run_experiment(cfg, out, progress=False, observers=[observe], echo=lambda s: None)
    assert summary["status"] == "ok" and summary["strategy"] == "fedlgd" and 0 <= summary["accuracy"] <= 1
    assert not summary.get("failures")

    # what went up: round 1's class statistics once per client, otherwise weights and scalar metrics only
    replies = [(r, m) for r, _, rs in log for m in rs]
    stats = [m for _, m in replies if keys.FEDLGD_STATS in m.content.array_records]
    assert len(stats) == 3 and all(set(m.content.array_records) == {keys.FEDLGD_STATS} for m in stats)
    train = [(r, m) for r, m in replies if keys.ARRAYS in m.content.array_records]
    assert len(train) == 2 * 3
    for _, m in train + [(1, s) for s in stats]:
        assert image_arrays(m) == [], image_arrays(m)
        assert set(m.content.array_records) <= {keys.ARRAYS, keys.FEDLGD_STATS}
    # the local virtual data is kept in Context.state: warmed up in round 1 only, re-distilled in round 2 (a DM round)
    warm = {(r, int(m.content[keys.NODE][keys.PARTITION_ID])) for r, m in train if "fedlgd_warmup_s" in m.content[keys.METRICS]}
    assert warm == {(1, 0), (1, 1), (1, 2)}
    assert all("fedlgd_dm_s" in m.content[keys.METRICS] for r, m in train if r == 2)

    disclosure = json.loads((out / "summary.json").read_text())["disclosures"][DISCLOSURE]
    assert disclosure["clients"] == 3 and 0 < disclosure["bytes_up"] < summary["bytes_up"]
    names = [p.name for p in list_grids(out)]
    assert names == ["client0-round0001.png", "client0-round0002.png", "client1-round0001.png", "client1-round0002.png",
                     "client2-round0001.png", "client2-round0002.png", "global-v000-round0001.png", "global-v001-round0002.png"]
    from fedkd.cli import main

    assert main(["report", str(out)]) == 0
    assert "virtual images (8 grids" in capsys.readouterr().out
