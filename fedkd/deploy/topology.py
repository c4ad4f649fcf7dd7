"""The one source of truth for a deployment's processes: SuperLink and SuperNode command lines.

``fedkd deploy local`` runs exactly these argv lists as local processes; ``fedkd deploy compose`` writes them
into docker-compose.yml (and its TLS / auth override files) with container paths and service names. The
test in tests/test_deploy.py checks that the committed compose files equal what this module generates and
that, once container paths and hosts are mapped back, they equal what ``deploy local`` starts.

Ports (Flower 1.41): the SuperLink serves Fleet, Control and ServerAppIo (runtime) APIs over HTTP on one
port (``--port``, default 8000); it opens no other port unless ``--health-server-address`` is given. Each
SuperNode serves its runtime API (for its own SuperExec and ClientApp processes) on ``--port`` (default
9094, so every SuperNode on one host needs its own). Nothing else listens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

SUPERLINK_PORT = 8000
SUPERNODE_PORT = 9094  # SuperNode i listens on SUPERNODE_PORT + i unless ports are given
CONNECTION = "fedkd-local"  # name of the SuperLink connection in $FLWR_HOME/config.toml

# Environment every process of a deployment gets: no telemetry, no update check over the network.
QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}

# Polling, as far as Flower 1.41 lets it be set (see fedkd/deploy/README.md, "Where a deployed round's time goes"):
# the SuperExec that the SuperLink and every SuperNode start polls for tasks (ServerApp / ClientApp launches)
# every 1 s unless FLWR_SUPEREXEC_TASK_POLL_INTERVAL (0.01-60 s) says otherwise; every message waits on it.
# The SuperNode's 3 s sleep between pulls from the SuperLink is hard-coded; the ServerApp's 3 s between pulls
# for replies is replaced by fedkd's own loop (deploy.pull_interval, fedkd/deploy/grid.py).
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_POLL_S = "0.2"
RUNTIME_ENV = {SUPEREXEC_POLL_ENV: SUPEREXEC_POLL_S}
# Each SuperNode's partition cache (fedkd/deploy/cache.py); in a container, a folder of its own filesystem.
CACHE_ENV = "FEDKD_CACHE_DIR"
CONTAINER_CACHE_DIR = "/tmp/fedkd-cache"


@dataclass(frozen=True)
class Deployment:
    """Where everything is. ``auth`` requires ``tls`` (Flower refuses SuperNode auth without TLS)."""

    nodes: int = 2
    tls: bool = False
    auth: bool = False
    bind_host: str = "127.0.0.1"  # SuperLink --host (0.0.0.0 in a container)
    superlink_host: str = "127.0.0.1"  # how SuperNodes and `flwr` reach the SuperLink
    superlink_port: int = SUPERLINK_PORT
    node_ports: tuple[int, ...] = field(default=())  # () = SUPERNODE_PORT + i
    certs_dir: str = "certs"  # ca.crt, server.pem, server.key, node-<i>[.pub] (see fedkd.deploy.certs)
    max_retries: int | None = None  # SuperNode --max-retries (None = Flower's default, retry forever)

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"nodes must be >= 1 (got {self.nodes})")
        if self.auth and not self.tls:
            raise ValueError("SuperNode authentication needs TLS (set tls=True)")
        if self.node_ports and len(self.node_ports) != self.nodes:
            raise ValueError(f"node_ports has {len(self.node_ports)} ports for {self.nodes} nodes")

    @property
    def superlink_address(self) -> str:
        return f"{self.superlink_host}:{self.superlink_port}"

    def node_port(self, i: int) -> int:
        return self.node_ports[i] if self.node_ports else SUPERNODE_PORT + i

    def path(self, name: str) -> str:
        return f"{self.certs_dir.rstrip('/')}/{name}"

    def with_(self, **kw) -> "Deployment":
        return replace(self, **kw)


def superlink_argv(d: Deployment) -> list[str]:
    """``flower-superlink`` for ``d``; runtime dependencies are never installed (fedkd is already there)."""
    argv = ["flower-superlink", "--host", d.bind_host, "--port", str(d.superlink_port), "--disable-runtime-dependency-installation"]
    if d.tls:
        argv += ["--ssl-ca-certfile", d.path("ca.crt"), "--ssl-certfile", d.path("server.pem"), "--ssl-keyfile", d.path("server.key")]
    else:
        argv += ["--insecure"]
    if d.auth:
        argv += ["--enable-supernode-auth"]
    return argv


def supernode_argv(d: Deployment, i: int, key_index: int | None = None) -> list[str]:
    """``flower-supernode`` for partition ``i`` of ``d.nodes``; with auth it signs with key ``node-<key_index>``."""
    argv = [
        "flower-supernode",
        "--superlink", d.superlink_address,
        "--host", "127.0.0.1",
        "--port", str(d.node_port(i)),
        "--node-config", f"partition-id={i} num-partitions={d.nodes}",
    ]  # fmt: skip
    if d.max_retries is not None:
        argv += ["--max-retries", str(d.max_retries)]
    argv += ["--root-certificates", d.path("ca.crt")] if d.tls else ["--insecure"]
    if d.auth:
        argv += ["--auth-supernode-private-key", d.path(f"node-{i if key_index is None else key_index}")]
    return argv


def service_commands(d: Deployment) -> dict[str, list[str]]:
    """Service name -> argv: ``superlink`` and ``supernode-<i>``."""
    out = {"superlink": superlink_argv(d)}
    for i in range(d.nodes):
        out[f"supernode-{i}"] = supernode_argv(d, i)
    return out


def connection_toml(d: Deployment, ca_cert: str | None = None, name: str = CONNECTION) -> str:
    """``$FLWR_HOME/config.toml`` for the ``flwr`` CLI: one SuperLink connection, made the default."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{d.superlink_address}"']
    if d.tls:
        lines.append(f'root-certificates = "{ca_cert or d.path("ca.crt")}"')
    else:
        lines.append("insecure = true")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- docker-compose
# Inside the image (see Dockerfile) the app lives in /app; these host folders are mounted.
APP_DIR = "/app"
VOLUMES = {  # host path (relative to the compose file) -> container path
    "./data": f"{APP_DIR}/data",  # datasets for data.data_dir (read by the SuperLink's test set and SuperNodes)
    "./runs": f"{APP_DIR}/runs",  # run directories written by the ServerApp (config.toml, metrics.csv, summary.json)
}
CERTS_VOLUME = ("./certs", f"{APP_DIR}/certs")  # made by `fedkd deploy certs certs --name superlink [--nodes N]`
IMAGE = "fedkd:0.1.0"
COMPOSE_NODES = 2
COMPOSE_FILES = {"plain": "docker-compose.yml", "tls": "docker-compose.tls.yml", "auth": "docker-compose.auth.yml"}


def compose_deployment(nodes: int = COMPOSE_NODES, tls: bool = False, auth: bool = False) -> Deployment:
    """The deployment inside docker-compose: SuperLink binds 0.0.0.0, SuperNodes reach it by service name."""
    return Deployment(
        nodes=nodes, tls=tls or auth, auth=auth, bind_host="0.0.0.0", superlink_host="superlink",
        certs_dir=CERTS_VOLUME[1],
    )  # fmt: skip


def _volumes(tls: bool) -> list[str]:
    vols = [f"{h}:{c}" for h, c in VOLUMES.items()]
    if tls:
        vols.append(f"{CERTS_VOLUME[0]}:{CERTS_VOLUME[1]}:ro")
    return vols


def compose_document(variant: str = "plain", nodes: int = COMPOSE_NODES) -> dict:
    """The content of one compose file: ``plain`` (the base file), or the ``tls`` / ``auth`` override."""
    if variant not in COMPOSE_FILES:
        raise ValueError(f"unknown compose variant {variant!r}; valid: {', '.join(COMPOSE_FILES)}")
    tls, auth = variant in ("tls", "auth"), variant == "auth"
    d = compose_deployment(nodes, tls=tls, auth=auth)
    commands = service_commands(d)
    services: dict[str, dict] = {}
    for name, argv in commands.items():
        if variant == "plain":
            env = dict(RUNTIME_ENV) if name == "superlink" else {**RUNTIME_ENV, CACHE_ENV: CONTAINER_CACHE_DIR}
            svc: dict = {"image": IMAGE, "command": argv, "environment": env, "volumes": _volumes(False)}
            if name == "superlink":
                svc = {"build": {"context": ".", "dockerfile": "Dockerfile"}, **svc}
                svc["ports"] = [f"{d.superlink_port}:{d.superlink_port}"]
            else:
                svc["depends_on"] = ["superlink"]
                svc["restart"] = "on-failure"  # the SuperLink may not be up yet; an unregistered node keeps retrying
        else:
            svc = {"command": argv, "volumes": _volumes(True)}
        services[name] = svc
    return {"services": services}


def compose_header(variant: str) -> str:
    base = COMPOSE_FILES["plain"]
    use = {
        "plain": "docker compose up -d            (insecure; `fedkd deploy compose` regenerates this file)",
        "tls": f"docker compose -f {base} -f {COMPOSE_FILES['tls']} up -d",
        "auth": f"docker compose -f {base} -f {COMPOSE_FILES['auth']} up -d   (TLS + SuperNode authentication)",
    }[variant]
    return (
        "# Generated by `fedkd deploy compose` from fedkd/deploy/topology.py: the same SuperLink/SuperNode command\n"
        "# lines `fedkd deploy local` runs. Do not edit by hand; change topology.py and regenerate.\n"
        f"# {use}\n"
    )
