"""``fedkd deploy local``: a real Flower deployment on 127.0.0.1, as local processes.

It starts one SuperLink and N SuperNodes with the command lines of :mod:`fedkd.deploy.topology` (the ones
docker-compose runs), submits the experiment with ``flwr run <app> <connection> --stream``, echoes the
ServerApp's per-round table, and stops every process it started, on success, failure and Ctrl-C.

Process hygiene: every process gets its own session (``start_new_session``) and a marker variable
``FEDKD_DEPLOY_ID=<uuid>`` in its environment. Flower's SuperLink and SuperNode start ``flower-superexec`` in a
session of its own, and that one starts the ServerApp/ClientApp processes; they all inherit the marker. Stopping
sends SIGTERM to each started process group, then to every process that carries this deployment's marker
(found in /proc), and SIGKILL to whatever is left after a grace period. Only PIDs, never names, are signalled.

Each process has its own ``FLWR_HOME`` under a scratch folder, ports are picked free on 127.0.0.1, so runs
in parallel do not collide. Logs land in ``<run dir>/deploy/``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fedkd.deploy import certs as certs_mod
from fedkd.deploy.topology import (
    CACHE_ENV,
    CONNECTION,
    QUIET_ENV,
    RUNTIME_ENV,
    Deployment,
    connection_toml,
    superlink_argv,
    supernode_argv,
)

MARKER = "FEDKD_DEPLOY_ID"
EXIT_AUTH_REFUSED = 305  # Flower's exit code (logged as "Exit Code: 305") when the SuperLink refuses a SuperNode


class DeployError(RuntimeError):
    """A deployment that could not start or finish; the message is one line."""


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that are free right now (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def app_dir() -> Path:
    """The fedkd source tree: the Flower app that ``flwr run`` packages (pyproject.toml with [tool.flwr.app])."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text():
        raise DeployError(f"no Flower app at {root}: fedkd deploy local needs fedkd's source tree (pip install -e .)")
    return root


def stage_app(src: Path, dest: Path) -> Path:
    """A copy of the app's pyproject.toml to hand to ``flwr run``, so the source tree is never modified.

    ``flwr run <dir>`` rewrites a pyproject.toml that still has ``[tool.flwr.federations]`` tables (it moves them
    to $FLWR_HOME and comments them out); the staged copy has them removed. The FAB built from it holds only
    this file: the SuperLink and SuperNodes run the installed fedkd (runtime dependency installation is off),
    exactly as in the Docker image.
    """
    keep, lines = True, []
    for line in (src / "pyproject.toml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            keep = not stripped.strip("[]").startswith("tool.flwr.federations")
        if keep:
            lines.append(line)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return dest


# --------------------------------------------------------------------------- /proc helpers
def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def marked_pids(deploy_id: str) -> list[int]:
    """Live processes (not zombies) whose environment carries ``FEDKD_DEPLOY_ID=deploy_id``."""
    needle = f"{MARKER}={deploy_id}".encode()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        if needle in _environ(pid).split(b"\0") and not _is_zombie(pid):
            out.append(pid)
    return out


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------- the deployment
@dataclass
class Proc:
    name: str
    argv: list[str]
    popen: subprocess.Popen
    log: Path
    essential: bool = False  # the run cannot go on without it (SuperLink, the N SuperNodes)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 5) -> str:
        try:
            lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return " | ".join(lines[-n:])


@dataclass
class LocalDeployment:
    """A SuperLink and SuperNodes on 127.0.0.1. Use as a context manager: leaving it stops everything.

    ``workdir`` holds FLWR_HOME folders and generated certificates (a temporary folder, removed on stop,
    unless given); ``log_dir`` the process logs.
    """

    nodes: int
    tls: bool = False
    auth: bool = False
    log_dir: Path | None = None
    workdir: Path | None = None
    certs_dir: Path | None = None  # existing certificates/keys to use instead of making new ones
    echo: Callable[[str], None] = print
    startup_timeout: float = 60.0
    deploy_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    procs: list[Proc] = field(default_factory=list)
    died: Proc | None = None  # the essential process whose death ended the run, if any
    runtime_env: dict[str, str] = field(default_factory=lambda: dict(RUNTIME_ENV))  # Flower settings by environment
    node_cache: bool = True  # each SuperNode caches its partition (fedkd/deploy/cache.py) under <workdir>/cache

    def __post_init__(self) -> None:
        if self.auth:
            self.tls = True  # Flower requires TLS for SuperNode authentication
        self._tmp = None
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fedkd-deploy-")
            self.workdir = Path(self._tmp.name)
        self.workdir = Path(self.workdir).resolve()
        self.log_dir = Path(self.log_dir or self.workdir / "logs").resolve()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        ports = free_ports(self.nodes + 1)
        certs = Path(self.certs_dir or self.workdir / "certs").resolve()
        self.deployment = Deployment(
            nodes=self.nodes, tls=self.tls, auth=self.auth, superlink_port=ports[0],
            node_ports=tuple(ports[1:]), certs_dir=str(certs),
        )  # fmt: skip
        self.cli_home = self.workdir / "flwr-cli"

    # ---------------------------------------------------------------- environment
    def env(self, home: str) -> dict[str, str]:
        """Child environment: the venv's bin first on PATH (flower-superexec must be found), own FLWR_HOME,
        the SuperExec poll interval (``runtime_env``) and, for a SuperNode, its own partition cache folder."""
        env = dict(os.environ)
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        env.update(QUIET_ENV)
        env.update(self.runtime_env)
        if self.node_cache and home.startswith("home-supernode"):
            env[CACHE_ENV] = str(self.workdir / "cache" / home.removeprefix("home-"))
        env[MARKER] = self.deploy_id
        env["FLWR_HOME"] = str(self.workdir / home)
        Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
        return env

    def _exe(self, argv: list[str]) -> list[str]:
        """Run console scripts from this interpreter's venv, whatever the caller's PATH."""
        exe = Path(sys.executable).parent / argv[0]
        return [str(exe) if exe.exists() else argv[0], *argv[1:]]

    def spawn(self, name: str, argv: list[str], home: str | None = None) -> Proc:
        log = self.log_dir / f"{name}.log"
        fh = open(log, "ab")
        try:
            popen = subprocess.Popen(
                self._exe(argv), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env(home or f"home-{name}"), cwd=self.workdir, start_new_session=True,
            )  # fmt: skip
        finally:
            fh.close()
        proc = Proc(name, argv, popen, log)
        self.procs.append(proc)
        self._write_commands()
        return proc

    def _write_commands(self) -> None:
        """``<log dir>/commands.json``: name -> argv of every process started (as in docker-compose.yml)."""
        cmds = {p.name: p.argv for p in self.procs}
        (self.log_dir / "commands.json").write_text(json.dumps(cmds, indent=1) + "\n")

    # ---------------------------------------------------------------- start
    def prepare_certs(self) -> None:
        if not self.tls or self.certs_dir is not None:
            return
        certs_mod.make_tls(self.deployment.certs_dir)
        if self.auth:
            certs_mod.make_node_keys(self.deployment.certs_dir, self.nodes)

    def start(self) -> "LocalDeployment":
        d = self.deployment
        self.prepare_certs()
        self.cli_home.mkdir(parents=True, exist_ok=True)
        (self.cli_home / "config.toml").write_text(connection_toml(d))
        link = self.spawn("superlink", superlink_argv(d))
        link.essential = True
        self._wait_port(d.superlink_port, link)
        self.echo(f"fedkd deploy: SuperLink on {d.superlink_address} ({'TLS' if d.tls else 'insecure'}{', node auth' if d.auth else ''})")
        if self.auth:
            for i in range(self.nodes):
                self.register(certs_mod.node_key_paths(d.certs_dir, i)[1])
        for i in range(self.nodes):
            self.spawn(f"supernode-{i}", supernode_argv(d, i)).essential = True
        self.echo(f"fedkd deploy: {self.nodes} SuperNodes started (ports {', '.join(str(d.node_port(i)) for i in range(self.nodes))})")
        return self

    def _wait_port(self, port: int, proc: Proc) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise DeployError(f"{proc.name} exited with code {proc.popen.returncode}: {proc.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.2)
        raise DeployError(f"{proc.name} did not open port {port} within {self.startup_timeout:.0f} s: {proc.log_tail()}")

    def flwr(self, *args: str, timeout: float | None = 120) -> subprocess.CompletedProcess:
        """The ``flwr`` CLI against this deployment's connection (its own FLWR_HOME)."""
        return subprocess.run(
            self._exe(["flwr", *args]), env=self.env("flwr-cli"), cwd=self.workdir, capture_output=True,
            text=True, timeout=timeout, start_new_session=True,
        )  # fmt: skip

    def register(self, public_key: Path) -> None:
        """Register a SuperNode's public key with the SuperLink (``flwr supernode register``)."""
        res = self.flwr("supernode", "register", str(public_key), CONNECTION)
        if res.returncode != 0:
            tail = " ".join((res.stdout + res.stderr).split())[-300:]
            raise DeployError(f"flwr supernode register {public_key.name} failed (exit {res.returncode}): {tail}")

    def spawn_supernode(self, name: str, partition_id: int, key_index: int | None = None, max_retries: int | None = None) -> Proc:
        """One more SuperNode (e.g. with a key that is not registered); it is stopped with the rest."""
        d = self.deployment.with_(max_retries=max_retries, node_ports=())
        argv = supernode_argv(d, partition_id, key_index=key_index)
        port = free_ports(1)[0]
        i = argv.index("--port")
        argv[i + 1] = str(port)
        return self.spawn(name, argv)

    # ---------------------------------------------------------------- faults
    def node(self, i: int) -> Proc:
        """The current process of SuperNode ``i`` (the latest one started under that name)."""
        for proc in reversed(self.procs):
            if proc.name == f"supernode-{i}":
                return proc
        raise KeyError(f"no supernode-{i}")

    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Kill SuperNode ``i`` (its process group; SIGKILL: a crash, nothing is cleaned up or deregistered).

        It stops counting as essential, so the run goes on without it. Its SuperExec and ClientApp processes,
        which run in sessions of their own, exit when they see their parent gone (Flower's parent monitor);
        whatever is left is stopped with the deployment."""
        proc = self.node(i)
        proc.essential = False
        _signal(proc.popen.pid, sig, group=True)
        try:
            proc.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _signal(proc.popen.pid, signal.SIGKILL, group=True)
            proc.popen.wait(timeout=10)

    def restart_node(self, i: int) -> Proc:
        """Start SuperNode ``i`` again with its command line, FLWR_HOME and partition cache. Without node
        authentication it registers as a new node; the SuperLink sends it work from the next round on."""
        old = self.node(i)
        if old.alive():
            raise DeployError(f"supernode-{i} is still running (pid {old.popen.pid})")
        proc = self.spawn(old.name, old.argv)
        proc.essential = True
        return proc

    # ---------------------------------------------------------------- run
    def submit(self, run_config: dict[str, str], app: Path | None = None, timeout: float | None = None, staged: bool = False) -> int:
        """``flwr run APP CONNECTION --stream``; echoes its output and returns its exit code.

        ``app`` is a source tree whose pyproject.toml gets staged (see :func:`stage_app`), or, with ``staged``,
        a folder to hand to ``flwr run`` as it is (e.g. :func:`fedkd.deploy.floor.stage`).
        """
        app = Path(app) if staged and app is not None else stage_app(app or app_dir(), self.workdir / "app")
        rc_arg = " ".join(f'{k}="{v}"' for k, v in run_config.items())
        argv = ["flwr", "run", str(app), CONNECTION, "--stream", "--run-config", rc_arg]
        log = self.log_dir / "flwr-run.log"
        popen = subprocess.Popen(
            self._exe(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.env("flwr-cli"), cwd=self.workdir, start_new_session=True, text=True, bufsize=1,
        )  # fmt: skip
        proc = Proc("flwr-run", argv, popen, log)
        self.procs.append(proc)
        self._write_commands()
        timer = None
        if timeout:
            timer = threading.Timer(timeout, lambda: _signal(popen.pid, signal.SIGTERM, group=True))
            timer.daemon = True
            timer.start()
        def watchdog() -> None:  # a dead SuperLink/SuperNode would leave the ServerApp waiting: end the run
            while popen.poll() is None:
                dead = [p for p in self.procs if p.essential and not p.alive()]
                if dead:
                    self.died = dead[0]
                    _signal(popen.pid, signal.SIGTERM, group=True)
                    return
                time.sleep(1.0)

        threading.Thread(target=watchdog, daemon=True).start()
        try:
            with open(log, "a") as fh:
                assert popen.stdout is not None
                for line in popen.stdout:
                    fh.write(line)
                    fh.flush()
                    self._echo_stream(line.rstrip("\n"))
            return popen.wait()
        finally:
            if timer is not None:
                timer.cancel()

    def _echo_stream(self, line: str) -> None:
        """The ServerApp's own lines (table, run directory, accuracy); Flower's log lines stay in the log file."""
        text = line.strip()
        if not text:
            return
        if text.startswith(("fedkd", "round", "Successfully started run")) or text.split()[0].isdigit() or "Error" in text:
            self.echo(line.rstrip())

    # ---------------------------------------------------------------- stop
    def stop(self, grace: float = 5.0) -> list[int]:
        """Stop everything this deployment started. Returns PIDs that had to be killed (SIGKILL)."""
        for proc in reversed(self.procs):
            if proc.alive():
                _signal(proc.popen.pid, signal.SIGTERM, group=True)
        for pid in marked_pids(self.deploy_id):
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            for proc in self.procs:
                proc.popen.poll()
            if not marked_pids(self.deploy_id) and not any(p.alive() for p in self.procs):
                break
            time.sleep(0.1)
        killed = []
        for proc in self.procs:
            if proc.alive():
                _signal(proc.popen.pid, signal.SIGKILL, group=True)
                killed.append(proc.popen.pid)
        for pid in marked_pids(self.deploy_id):
            _signal(pid, signal.SIGKILL)
            killed.append(pid)
        for proc in self.procs:
            try:
                proc.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            if proc.popen.stdout is not None:
                proc.popen.stdout.close()
        # wait for the killed processes (re-parented to init) to be gone
        deadline = time.monotonic() + 5
        while marked_pids(self.deploy_id) and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return killed

    def __enter__(self) -> "LocalDeployment":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------- the command
def _raise_interrupt(signum, frame):  # SIGTERM -> the same cleanup path as Ctrl-C
    raise KeyboardInterrupt


def deploy_local(
    cfg,
    nodes: int,
    *,
    tls: bool = False,
    auth: bool = False,
    out: str | Path | None = None,
    certs_dir: str | Path | None = None,
    echo: Callable[[str], None] = print,
    timeout: float | None = None,
) -> dict:
    """Run experiment ``cfg`` on a local deployment of ``nodes`` SuperNodes. Returns the run's summary.

    ``cfg.data.num_clients`` must equal ``nodes`` (each SuperNode holds one partition). The resolved config
    is written to the run directory first and handed to the ServerApp with ``flwr run --run-config``.
    """
    from fedkd.config import ConfigError
    from fedkd.data import load_federation
    from fedkd.results import read_run, write_summary
    from fedkd.server import new_run_dir
    from fedkd.strategies import build_strategy

    if nodes < 1:
        raise ConfigError("--nodes", f"must be >= 1 (got {nodes})")
    if certs_dir is not None:
        tls = True  # certificates are only for TLS
        _check_certs(Path(certs_dir), nodes, tls, auth)
    if cfg.data.num_clients != nodes:
        raise ConfigError("data.num_clients", f"must equal --nodes ({nodes}) in a deployment (got {cfg.data.num_clients})")
    # Everything that can fail before a process starts fails here: the data, its partitioning, the strategy.
    build_strategy(cfg, load_federation(cfg.data, cfg.run.seed))
    app = app_dir()
    run_dir = new_run_dir(cfg, out).resolve()
    echo(f"run directory: {run_dir}")
    old_handler = signal.signal(signal.SIGTERM, _raise_interrupt) if threading.current_thread() is threading.main_thread() else None
    dep = LocalDeployment(nodes, tls=tls, auth=auth, log_dir=run_dir / "deploy", certs_dir=certs_dir, echo=echo)
    t0 = time.perf_counter()
    try:
        dep.start()
        rc = dep.submit({"config": str(run_dir / "config.toml"), "out": str(run_dir)}, app=app, timeout=timeout)
        dead = dep.died
        if rc != 0 or not (run_dir / "summary.json").is_file():
            why = f"; {dead.name} exited with code {dead.popen.returncode}: {dead.log_tail(2)}" if dead else ""
            raise DeployError(f"flwr run exited with code {rc}{why} (logs in {run_dir / 'deploy'})")
    except KeyboardInterrupt:
        _summary_if_missing(cfg, run_dir, "interrupted", "KeyboardInterrupt")
        raise
    except BaseException as e:
        _summary_if_missing(cfg, run_dir, "failed", f"{type(e).__name__}: {e}")
        raise
    finally:
        killed = dep.stop()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        if killed:
            echo(f"fedkd deploy: killed {len(killed)} process(es) that ignored SIGTERM")
    summary, _ = read_run(run_dir)
    # the whole deployment: processes starting, flwr run, the rounds, stopping (wall_s is the ServerApp's own)
    summary["deploy_wall_s"] = time.perf_counter() - t0
    summary = write_summary(run_dir, summary)
    summary["run_dir"] = str(run_dir)
    if summary.get("status") != "ok":
        raise DeployError(f"the deployed run ended with status {summary.get('status')}: {summary.get('error')}")
    return summary


def _summary_if_missing(cfg, run_dir: Path, status: str, error: str) -> None:
    """A run the ServerApp could not close itself still gets summary.json (status, error, what finished)."""
    from fedkd.results import write_summary

    if (run_dir / "summary.json").exists():
        return
    rounds_done = 0
    try:
        import pandas as pd

        df = pd.read_csv(run_dir / "metrics.csv")
        rounds_done = int(df[(df["node"] == "server") & (df["round"] > 0)]["round"].nunique())
    except (OSError, ValueError, KeyError):
        pass
    write_summary(run_dir, {
        "status": status, "run": cfg.run.name, "strategy": cfg.strategy.name, "dataset": cfg.data.dataset,
        "num_clients": cfg.data.num_clients, "rounds": cfg.run.rounds, "rounds_completed": rounds_done,
        "backend": "deployment", "error": error,
    })  # fmt: skip


def _check_certs(directory: Path, nodes: int, tls: bool, auth: bool) -> None:
    from fedkd.config import ConfigError

    files = certs_mod.tls_files(directory)
    need = [files.ca_cert, files.server_cert, files.server_key] if tls else []
    if auth:
        need += [p for i in range(nodes) for p in certs_mod.node_key_paths(directory, i)]
    missing = [p.name for p in need if not p.is_file()]
    if missing:
        raise ConfigError("--certs", f"{directory} lacks {', '.join(missing)} (make them with: fedkd deploy certs {directory} --nodes {nodes})")

