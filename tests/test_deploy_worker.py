"""The warm worker of a SuperNode (fedkd.deploy.worker), checked without a SuperLink: a forwarded message gets
the reply direct execution gives and Context state round-trips, a killed worker is replaced, a worker that dies
mid-message or is busy makes the ClientApp run the message itself, the socket is the node user's only, and the
switch is validated. Each test stops the workers it started (by the PID file the worker writes)."""

from __future__ import annotations

import os
import signal
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedkd import keys
from fedkd.config import ConfigError, load_config
from fedkd.deploy import worker as wk

TINY = ["data.num_clients=2", "run.rounds=2", "train.local_epochs=1", "data.min_partition_size=5", "privacy.reproducible_noise=true"]


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.fixture
def node_dir(monkeypatch):
    """A short cache folder (Unix socket paths are limited to 108 bytes); workers started there are stopped."""
    d = Path(tempfile.mkdtemp(prefix="fkw-", dir="/tmp"))
    monkeypatch.setenv(wk.CACHE_ENV, str(d))
    monkeypatch.setattr(wk, "in_clientapp_process", lambda: True)  # as in a SuperNode's flwr-clientapp process
    yield d
    for pid_file in d.glob("worker-*.pid"):
        pid = _pid(d)
        if pid:
            _kill(pid)
        pid_file.unlink(missing_ok=True)
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def _pid(d: Path) -> int | None:
    files = list(d.glob("worker-*.pid"))
    return int(files[0].read_text()) if files else None


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                os.waitpid(pid, os.WNOHANG)  # our child: reap it
        except (OSError, ChildProcessError):
            pass
        time.sleep(0.05)


def _message(cfg, client: str, arrays=None, message_type: str = "train") -> Message:
    conf = ConfigRecord({keys.EXPERIMENT: cfg.to_json(), keys.CLIENT_LOGIC: client, keys.SERVER_ROUND: 1})
    content = RecordDict({keys.CONFIG: conf} | ({keys.ARRAYS: arrays} if arrays is not None else {}))
    msg = Message(content, dst_node_id=101, message_type=message_type)
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as Flower's runtime sets it on receipt
    return msg


def _ctx() -> Context:
    return Context(run_id=1, node_id=101, node_config={keys.NODE_PARTITION_ID: 0, keys.NODE_NUM_PARTITIONS: 2}, state=RecordDict(), run_config={})


def _arrays(reply: Message) -> dict[str, np.ndarray]:
    return {f"{r}/{k}": v.numpy() for r, rec in reply.content.array_records.items() for k, v in rec.items()}


def _same(a: Message, b: Message) -> None:
    assert a.metadata.reply_to_message_id == b.metadata.reply_to_message_id != ""
    assert a.metadata.message_type == b.metadata.message_type
    assert set(a.content.keys()) == set(b.content.keys())
    # the same computation; the worker process may run torch with another thread count, which changes the order of
    # float reductions (seen: a loss differing in the 9th digit under a loaded full test run), so not bit for bit
    ma = {k: dict(v) for k, v in a.content.metric_records.items()}
    mb = {k: dict(v) for k, v in b.content.metric_records.items()}
    assert ma.keys() == mb.keys() and all(ma[k] == pytest.approx(mb[k], rel=1e-6) for k in ma)
    assert {k: dict(v) for k, v in a.content.config_records.items()} == {k: dict(v) for k, v in b.content.config_records.items()}
    xa, xb = _arrays(a), _arrays(b)
    assert xa.keys() == xb.keys()
    for k in xa:
        np.testing.assert_allclose(xa[k], xb[k], rtol=1e-5, atol=1e-6)


def _direct(monkeypatch, msg, ctx):
    """The reply without a worker: FEDKD_CACHE_DIR unset, so the forward mod passes the message on."""
    from fedkd.apps import client_app

    with monkeypatch.context() as m:
        m.delenv(wk.CACHE_ENV)
        return client_app(msg, ctx)


def test_forwarded_messages_get_the_direct_reply_and_context_state_round_trips(node_dir, monkeypatch):
    from fedkd.apps import client_app
    from fedkd.data import load_federation
    from fedkd.strategies import build_strategy

    cfg = load_config(None, TINY)
    spec = build_strategy(cfg, load_federation(cfg.data, cfg.run.seed))
    # a weights train message: same arrays and metrics as running it here
    msg = _message(cfg, "weights", spec.initial_arrays)
    direct = _direct(monkeypatch, msg, _ctx())
    via = client_app(msg, _ctx())
    _same(via, direct)
    sock = wk.socket_path(node_dir)
    assert sock.is_socket() and _pid(node_dir) not in (None, os.getpid())  # it ran in the worker
    # a stateful client ("local" keeps its own model in Context.state): two rounds through the worker
    ctx_direct, ctx_via = _ctx(), _ctx()
    for rnd in (1, 2):
        m = _message(cfg, "local")
        d = _direct(monkeypatch, m, ctx_direct)
        v = client_app(m, ctx_via)
        _same(v, d)
        assert v.content[keys.METRICS]["resumed"] == (rnd == 2)
    a = ctx_via.state[keys.STATE_MODEL].to_torch_state_dict()
    b = ctx_direct.state[keys.STATE_MODEL].to_torch_state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)  # see _same
    # the socket and its folder belong to this user only
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(node_dir.stat().st_mode) & 0o077 == 0


def test_a_killed_worker_is_replaced_and_the_message_still_runs(node_dir, monkeypatch):
    cfg = load_config(None, TINY)
    msg = _message(cfg, "local")
    first = wk.run_in_worker(node_dir, msg, _ctx())
    pid = _pid(node_dir)
    _kill(pid)  # SIGKILL: the socket file stays behind, nobody listens
    assert wk.socket_path(node_dir).exists()
    again = wk.run_in_worker(node_dir, msg, _ctx())
    assert _pid(node_dir) not in (None, pid)
    _same(again, first)


def _fake_worker(path: Path, behaviour) -> threading.Thread:
    path.unlink(missing_ok=True)  # the fake worker of an earlier call is gone
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    srv.bind(str(path))
    os.umask(old)
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        try:
            behaviour(conn)
        finally:
            conn.close()
            srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def _dies_mid_message(conn):
    wk._recv(conn)  # reads the request, then the connection drops (a crash)


def _busy(conn):
    wk._recv(conn)
    wk._send(conn, {"ok": False, "why": "the worker is busy with another message"})


@pytest.mark.parametrize("behaviour", [_dies_mid_message, _busy], ids=["dies", "busy"])
def test_the_clientapp_runs_the_message_itself_when_the_worker_fails(node_dir, monkeypatch, behaviour):
    from fedkd.apps import client_app

    cfg = load_config(None, TINY)
    msg = _message(cfg, "local")
    t = _fake_worker(wk.socket_path(node_dir), behaviour)
    with pytest.raises(wk.WorkerUnavailable):
        wk.run_in_worker(node_dir, msg, _ctx())
    t.join(5)
    t = _fake_worker(wk.socket_path(node_dir), behaviour)
    reply = client_app(msg, _ctx())  # through forward_mod: falls back to running it in this process
    t.join(5)
    _same(reply, _direct(monkeypatch, msg, _ctx()))
    assert _pid(node_dir) is None  # no real worker was started: the fake one answered


def test_a_socket_others_can_reach_is_refused(node_dir):
    path = wk.socket_path(node_dir)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    try:
        os.chmod(path, 0o666)
        with pytest.raises(wk.WorkerUnavailable, match="0600"):
            wk.connect(path)
    finally:
        srv.close()
        path.unlink()


def test_the_switch_is_read_from_the_message_and_validated():
    cfg_on = load_config(None, TINY)
    cfg_off = load_config(None, TINY + ["deploy.warm_worker=false", "deploy.worker_idle_s=30"])
    assert wk.enabled(_message(cfg_on, "weights")) == (True, 900.0)
    assert wk.enabled(_message(cfg_off, "weights")) == (False, 30.0)
    assert wk.enabled(Message(RecordDict(), dst_node_id=1, message_type="train"))[0] is False
    with pytest.raises(ConfigError, match="deploy.warm_worker"):
        load_config(None, TINY + ["deploy.warm_worker=2"])
    with pytest.raises(ConfigError, match="deploy.worker_idle_s"):
        load_config(None, TINY + ["deploy.worker_idle_s=0"])


def test_warm_worker_off_runs_in_process(node_dir, monkeypatch):
    from fedkd.apps import client_app

    cfg = load_config(None, TINY + ["deploy.warm_worker=false"])
    msg = _message(cfg, "local")
    _same(client_app(msg, _ctx()), _direct(monkeypatch, msg, _ctx()))
    assert not wk.socket_path(node_dir).exists() and _pid(node_dir) is None


def test_a_forwarding_clientapp_process_imports_neither_torch_nor_fedkd_clients(node_dir):
    """The point of the worker: the per-message process stays at Flower + numpy (a fake worker answers here)."""
    import subprocess
    import sys

    from flwr.app import MetricRecord

    def answer(conn):
        header, parts = wk._recv(conn)
        msg, ctx = wk.decode(*parts)
        ctx.state["seen"] = ConfigRecord({"round": 1})
        wk._send(conn, {"ok": True}, *wk.encode(Message(RecordDict({"metrics": MetricRecord({"x": 1.0})}), reply_to=msg), ctx))

    t = _fake_worker(wk.socket_path(node_dir), answer)
    code = f"""
import sys
sys.argv[0] = "/venv/bin/flwr-clientapp"
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = 1
from flwr.app import ConfigRecord, Context, Message, RecordDict
import fedkd.apps
conf = ConfigRecord({{"{keys.EXPERIMENT}": sys.stdin.read(), "{keys.CLIENT_LOGIC}": "weights"}})
msg = Message(RecordDict({{"{keys.CONFIG}": conf}}), dst_node_id=101, message_type="train")
msg.metadata.__dict__["_message_id"] = msg.object_id
ctx = Context(run_id=1, node_id=101, node_config={{"partition-id": 0}}, state=RecordDict(), run_config={{}})
reply = fedkd.apps.client_app(msg, ctx)
print(dict(reply.content["metrics"]), dict(ctx.state["seen"]), sorted(m for m in ("torch", "fedkd.clients", "pandas", "sklearn") if m in sys.modules))
"""
    cfg = load_config(None, TINY)
    out = subprocess.run([sys.executable, "-c", code], input=cfg.to_json(), capture_output=True, text=True, timeout=120)
    t.join(5)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[0] == "{'x': 1.0} {'round': 1} []"


def test_the_worker_exits_when_its_parent_is_gone_and_when_idle(node_dir):
    import subprocess
    import sys

    parent = subprocess.Popen(["sleep", "600"])
    sock_a, sock_b = node_dir / "a.sock", node_dir / "b.sock"
    run = [sys.executable, "-m", "fedkd.deploy.worker"]
    orphan = subprocess.Popen(run + ["--socket", str(sock_a), "--parent", str(parent.pid), "--idle", "600"])
    idle = subprocess.Popen(run + ["--socket", str(sock_b), "--idle", "1"])
    try:
        deadline = time.monotonic() + 60
        while not (sock_a.exists() and sock_b.exists()) and time.monotonic() < deadline:
            time.sleep(0.05)
        parent.kill()
        parent.wait()
        assert orphan.wait(timeout=60) == 0 and idle.wait(timeout=60) == 0
        assert not sock_a.exists() and not sock_b.exists()  # each removed its own socket
    finally:
        for p in (parent, orphan, idle):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_message_without_fedkd_config_json_is_not_forwarded():
    conf = ConfigRecord({keys.EXPERIMENT: "not json"})
    assert wk.enabled(Message(RecordDict({keys.CONFIG: conf}), dst_node_id=1, message_type="train")) == (False, 0.0)
