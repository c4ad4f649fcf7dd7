"""A warm worker per SuperNode: the ClientApp's messages run in one long-lived process (``deploy.warm_worker``).

Flower 1.41 starts a fresh ``flwr-clientapp`` process for every message a SuperNode receives; fedkd's client
side then imports torch and fedkd and loads the partitions before it can train (seconds per message). In a
``flwr-clientapp`` process with ``FEDKD_CACHE_DIR`` set (``fedkd deploy local`` and docker-compose give every
SuperNode its own folder) and ``deploy.warm_worker = true`` (the default), the ClientApp's outermost mod
(:func:`forward_mod`, in ``fedkd/apps.py``) instead hands the message to a worker process of that node, which
has torch and fedkd imported, runs the very same ``fedkd.apps.client_app`` on it, and returns the reply:

- **Wire**: a Unix-domain socket ``worker-<code>.sock`` in the node's cache folder, created 0600 (bound under
  umask 077, then renamed into place; fedkd creates the folder 0700) and its owner and mode checked before use:
  connecting needs write permission on the socket, so only the node's user can talk to it. A request is a JSON header
  (Flower's task identity) plus the message and the Context as Flower's own protobufs
  (``message_to_proto``/``context_to_proto``, the encoding the runtime uses between the SuperNode and the
  ClientApp process); the reply is the reply message and the Context after the call, whose ``state`` goes back
  into the ClientApp process's Context (Flower pushes it to the SuperNode as usual), so stateful clients work.
  ``<code>`` hashes the interpreter and fedkd's source files, so changed code never talks to an old worker.
- **Start**: the first ClientApp process of a node that finds no live worker starts one (``python -m
  fedkd.deploy.worker``, under a lock file so two processes never start two), in a session of its own, with
  the ClientApp's environment (``FEDKD_DEPLOY_ID`` included, so ``deploy local``'s stop ends it with the rest).
  A socket nobody answers (a dead worker) is removed and a new worker started.
- **End**: the worker exits when its SuperNode's SuperExec (the ClientApp process's parent) is gone, after
  ``deploy.worker_idle_s`` without a message, or on SIGTERM; it removes its socket.
- **Nothing lost**: if the worker cannot be reached, is busy with another message (it runs one at a time, as
  Flower's task identity is per process), dies mid-message, or the call raised, the ClientApp process runs the
  message itself (the same code, in-process: an exception is then raised exactly as without a worker).
  Worker output goes to ``worker.log`` in the cache folder.

Nothing here imports torch: the ClientApp process stays at Flower + numpy.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from flwr.app import Context, Message

from fedkd import keys

CACHE_ENV = "FEDKD_CACHE_DIR"
IN_WORKER = False  # True inside the worker process: the forward mod passes messages through there
START_TIMEOUT_S = 60.0  # how long a ClientApp process waits for a new worker's socket to appear
READ_TIMEOUT_S = 60.0  # the worker's limit for reading a request (a ClientApp process that died mid-send)
_MAX_SOCKET_PATH = 104  # sun_path is 108 bytes on Linux; longer paths cannot be bound


class WorkerUnavailable(Exception):
    """The message could not be run by a worker (why in the text); the caller runs it in-process."""


# --------------------------------------------------------------------------- framing
def _send(sock: socket.socket, header: dict, *parts: bytes) -> None:
    head = json.dumps(header).encode()
    chunks = [struct.pack(">I", len(head)), head, struct.pack(">I", len(parts))]
    for p in parts:
        chunks += [struct.pack(">Q", len(p)), p]
    sock.sendall(b"".join(chunks))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed mid-frame")
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket) -> tuple[dict, list[bytes]]:
    (hlen,) = struct.unpack(">I", _recv_exact(sock, 4))
    header = json.loads(_recv_exact(sock, hlen))
    (count,) = struct.unpack(">I", _recv_exact(sock, 4))
    parts = []
    for _ in range(count):
        (plen,) = struct.unpack(">Q", _recv_exact(sock, 8))
        parts.append(_recv_exact(sock, plen))
    return header, parts


def encode(message: Message, context: Context) -> tuple[bytes, bytes]:
    from flwr.common.serde import context_to_proto, message_to_proto

    return message_to_proto(message).SerializeToString(), context_to_proto(context).SerializeToString()


def decode(message_b: bytes, context_b: bytes) -> tuple[Message, Context]:
    from flwr.common.serde import context_from_proto, message_from_proto
    from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
    from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611

    return message_from_proto(ProtoMessage.FromString(message_b)), context_from_proto(ProtoContext.FromString(context_b))


# --------------------------------------------------------------------------- where
def code_fingerprint() -> str:
    """The interpreter and the size/mtime of every fedkd source file (found without importing them)."""
    import importlib.util

    import fedkd

    parts = [sys.executable, getattr(fedkd, "__version__", "")]
    roots = {Path(fedkd.__file__).parent}
    for sub in ("fedkd.clients", "fedkd.strategies", "fedkd.attacks"):
        spec = importlib.util.find_spec(sub)
        if spec is not None and spec.submodule_search_locations:
            roots.update(Path(p) for p in spec.submodule_search_locations)
    for root in sorted(roots):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                if name.endswith(".py"):
                    st = os.stat(os.path.join(dirpath, name))
                    parts.append(f"{dirpath}/{name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def socket_path(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / f"worker-{code_fingerprint()}.sock"


def enabled(msg: Message) -> tuple[bool, float]:
    """(``deploy.warm_worker``, ``deploy.worker_idle_s``) of the experiment a message carries; off without one."""
    if not msg.has_content() or keys.CONFIG not in msg.content.config_records:
        return False, 0.0
    text = msg.content.config_records[keys.CONFIG].get(keys.EXPERIMENT)
    if not text:
        return False, 0.0
    try:
        deploy = json.loads(str(text)).get("deploy", {})
        return bool(deploy.get("warm_worker", True)), float(deploy.get("worker_idle_s", 900.0))
    except (ValueError, AttributeError, TypeError):  # not fedkd's experiment JSON: the ClientApp handles it itself
        return False, 0.0


# --------------------------------------------------------------------------- the ClientApp side
def in_clientapp_process() -> bool:
    """Whether this is a deployed SuperNode's ``flwr-clientapp`` process (Flower's own test for it); the
    simulations' Ray actors run messages in warm processes already and never forward."""
    return sys.argv[0].endswith("flwr-clientapp")


def forward_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower client mod (outermost): run the message in the node's warm worker, else ``call_next``."""
    cache_dir = os.environ.get(CACHE_ENV)
    if IN_WORKER or not cache_dir or not in_clientapp_process():
        return call_next(msg, context)
    on, idle_s = enabled(msg)
    if not on:
        return call_next(msg, context)
    try:
        return run_in_worker(cache_dir, msg, context, idle_s)
    except WorkerUnavailable as e:
        print(f"fedkd: warm worker not used ({e}); running the message in this process", file=sys.stderr, flush=True)
        return call_next(msg, context)


def run_in_worker(cache_dir: str | Path, msg: Message, context: Context, idle_s: float = 900.0) -> Message:
    """Send ``msg`` to the node's worker (starting it if needed); the reply, with ``context`` updated in place."""
    from flwr.supercore.task_identity import TaskIdentity

    path = socket_path(cache_dir)
    if len(str(path)) > _MAX_SOCKET_PATH:
        raise WorkerUnavailable(f"socket path longer than {_MAX_SOCKET_PATH} bytes: {path}")
    header = {"task_id": TaskIdentity._task_id, "run_id": TaskIdentity._run_id, "node_id": TaskIdentity._node_id}
    msg_b, ctx_b = encode(msg, context)
    sock = connect(path, idle_s)
    try:
        _send(sock, header, msg_b, ctx_b)
        answer, parts = _recv(sock)
    except (OSError, ValueError) as e:  # the worker died mid-message (EOF, reset) or sent garbage
        raise WorkerUnavailable(f"worker connection lost: {e}") from None
    finally:
        sock.close()
    if not answer.get("ok"):
        raise WorkerUnavailable(str(answer.get("why", "the worker refused the message")))
    reply, ctx = decode(parts[0], parts[1])
    context.state, context.node_config, context.run_config = ctx.state, ctx.node_config, ctx.run_config
    return reply


def _try_connect(path: Path) -> socket.socket | None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise WorkerUnavailable(f"{path} is not a socket of this user with mode 0600")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return sock
    except (ConnectionRefusedError, FileNotFoundError):
        sock.close()
        return None  # nobody listens: a dead worker's socket
    except OSError as e:
        sock.close()
        raise WorkerUnavailable(f"cannot connect to {path}: {e}") from None


def connect(path: Path, idle_s: float = 900.0) -> socket.socket:
    """A connection to the worker at ``path``; starts one (under ``worker.lock``) when none answers."""
    sock = _try_connect(path)
    if sock is not None:
        return sock
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(folder / "worker.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another ClientApp process of this node may be starting one
        sock = _try_connect(path)
        if sock is not None:
            return sock
        path.unlink(missing_ok=True)  # stale: its worker is gone
        proc = start_worker(path, idle_s)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            sock = _try_connect(path)
            if sock is not None:
                return sock
            if proc.poll() is not None:
                raise WorkerUnavailable(f"the worker exited with code {proc.returncode} (see {folder / 'worker.log'})")
            time.sleep(0.02)
        raise WorkerUnavailable(f"no worker socket at {path} after {START_TIMEOUT_S:.0f} s")


def start_worker(path: Path, idle_s: float) -> subprocess.Popen:
    """``python -m fedkd.deploy.worker`` for ``path``, detached, with this process's environment."""
    argv = [sys.executable, "-m", "fedkd.deploy.worker", "--socket", str(path), "--parent", str(os.getppid()), "--idle", str(idle_s)]
    with open(path.parent / "worker.log", "ab") as log:
        os.chmod(path.parent / "worker.log", 0o600)
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


# --------------------------------------------------------------------------- the worker
class Worker:
    """Serves one socket: runs each message with ``fedkd.apps.client_app``, one at a time."""

    def __init__(self, path: Path, parent: int | None, idle_s: float) -> None:
        self.path, self.parent, self.idle_s = Path(path), parent, idle_s
        self.busy = threading.Lock()
        self.last = time.monotonic()
        self.active = 0
        self.stopping = threading.Event()

    def bind(self) -> socket.socket:
        """Listen at ``path``: bound under a temporary name with umask 077, chmod 0600, then renamed."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            srv.bind(str(tmp))
        finally:
            os.umask(old)
        os.chmod(tmp, 0o600)
        srv.listen(16)
        os.replace(tmp, self.path)
        return srv

    def run_message(self, header: dict, parts: list[bytes]) -> tuple[dict, list[bytes]]:
        from flwr.supercore.task_identity import TaskIdentity

        import fedkd.apps

        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = header["task_id"], header["run_id"], header["node_id"]
        msg, ctx = decode(parts[0], parts[1])
        try:
            reply = fedkd.apps.client_app(msg, ctx)
        except Exception as e:  # noqa: BLE001  the ClientApp process runs it again and raises it as Flower expects
            import traceback

            traceback.print_exc()
            return {"ok": False, "why": f"the message raised {type(e).__name__} in the worker"}, []
        return {"ok": True}, list(encode(reply, ctx))

    def handle(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(READ_TIMEOUT_S)
            header, parts = _recv(conn)
            conn.settimeout(None)
            if not self.busy.acquire(blocking=False):
                _send(conn, {"ok": False, "why": "the worker is busy with another message"})
                return
            try:
                answer, out = self.run_message(header, parts)
            finally:
                self.busy.release()
            _send(conn, answer, *out)
        except (OSError, ValueError) as e:
            print(f"fedkd worker: connection dropped: {e}", file=sys.stderr, flush=True)
        finally:
            conn.close()
            self.last = time.monotonic()
            self.active -= 1

    def parent_alive(self) -> bool:
        if self.parent is None:
            return True
        try:
            os.kill(self.parent, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def serve(self) -> None:
        srv = self.bind()
        print(f"fedkd worker {os.getpid()}: listening at {self.path} (parent {self.parent}, idle {self.idle_s:.0f} s)", flush=True)
        import fedkd.apps  # noqa: F401  (torch, fedkd.clients and its mods: once, here)
        from fedkd.clients import MODS  # noqa: F401

        srv.settimeout(1.0)
        try:
            while not self.stopping.is_set():
                try:
                    conn, _ = srv.accept()
                except TimeoutError:
                    if self.active == 0 and time.monotonic() - self.last > self.idle_s:
                        print(f"fedkd worker {os.getpid()}: idle for {self.idle_s:.0f} s, exiting", flush=True)
                        break
                    if not self.parent_alive():
                        print(f"fedkd worker {os.getpid()}: parent {self.parent} is gone, exiting", flush=True)
                        break
                    continue
                self.active += 1
                self.last = time.monotonic()
                threading.Thread(target=self.handle, args=(conn,), daemon=True).start()
        finally:
            srv.close()
            self._unlink_own()

    def _unlink_own(self) -> None:
        # remove the socket only if it is still ours (a newer worker may have replaced a socket we left)
        with contextlib.suppress(OSError):
            if self.path.is_socket() and self._owns_path():
                self.path.unlink()

    def _owns_path(self) -> bool:
        # the newest worker of a folder writes its pid next to the socket
        try:
            return int(self.path.with_suffix(".pid").read_text()) == os.getpid()
        except (OSError, ValueError):
            return False


def _stop(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    global IN_WORKER
    p = argparse.ArgumentParser(description="fedkd's warm ClientApp worker of one SuperNode (started by the ClientApp)")
    p.add_argument("--socket", required=True)
    p.add_argument("--parent", type=int, default=None, help="exit when this PID is gone (the SuperNode's SuperExec)")
    p.add_argument("--idle", type=float, default=900.0, help="exit after this many seconds without a message")
    args = p.parse_args(argv)
    IN_WORKER = True
    signal.signal(signal.SIGTERM, _stop)
    worker = Worker(Path(args.socket), args.parent, args.idle)
    worker.path.with_suffix(".pid").write_text(f"{os.getpid()}\n")
    worker.serve()
    return 0


if __name__ == "__main__":
    # as `python -m`, this file is __main__, not fedkd.deploy.worker: the forward mod reads the module's flag
    import fedkd.deploy.worker as _self

    _self.IN_WORKER = True
    sys.exit(_self.main(sys.argv[1:]))
