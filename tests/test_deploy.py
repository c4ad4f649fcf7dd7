"""Deployment: real SuperLink + SuperNodes on 127.0.0.1 (no Docker), and the compose files that mirror them.

The end-to-end tests are tiny (2 nodes, 2 rounds, 1 local epoch, no client-side evaluation): in deployment
every message starts a fresh ClientApp process and both sides poll every 3 s, so a round costs seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fedkd.cli import main
from fedkd.deploy import certs
from fedkd.deploy.local import EXIT_AUTH_REFUSED, LocalDeployment, stage_app
from fedkd.deploy.topology import (
    COMPOSE_FILES,
    VOLUMES,
    compose_deployment,
    compose_document,
    service_commands,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "run.rounds=2", "--set", "train.local_epochs=1", "--set", "strategy.fraction_evaluate=0", "--set", "data.min_partition_size=5"]


def leftovers(needle: str) -> list[str]:
    """Live processes whose environment mentions ``needle`` (e.g. this test's tmp folder)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle.encode() in env and stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
            out.append(f"{entry.name}: {cmd[:120]}")
    return out


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """Deployments put FLWR_HOME etc. under tmp_path, so leftovers can be found by that path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield tmp_path
    assert leftovers(str(tmp_path)) == []


def check_run(run_dir: Path, nodes: int = 2, rounds: int = 2) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok", summary
    assert summary["rounds_completed"] == rounds
    assert summary["backend"] == "deployment"
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert (run_dir / "config.toml").is_file()
    df = pd.read_csv(run_dir / "metrics.csv")
    trained = set(df[(df["split"] == "train") & (df["node"] != "server")]["node"].astype(int))
    assert trained == set(range(nodes))
    return summary


# --------------------------------------------------------------------------- compose <-> deploy local
def _normalise(argv: list[str], d) -> list[str]:
    """Name what legitimately differs between compose and local: the SuperLink's bind host and address,
    ports, and the certificate folder. Everything else must be identical."""
    certs_prefix = d.certs_dir.rstrip("/") + "/"
    out = []
    for prev, a in zip([None, *argv], argv):
        if prev == "--superlink":
            a = "<superlink>" if a == d.superlink_address else a
        elif prev == "--port":
            a = "<port>"
        elif prev == "--host" and argv[0] == "flower-superlink":
            a = "<bind>" if a == d.bind_host else a
        elif a.startswith(certs_prefix):
            a = "<certs>/" + a[len(certs_prefix):]
        out.append(a)
    return out


@pytest.mark.parametrize("variant", list(COMPOSE_FILES))
def test_compose_files_agree_with_deploy_local(variant, tmp_path):
    doc = yaml.safe_load((ROOT / COMPOSE_FILES[variant]).read_text())
    # as many SuperNodes as the committed files have (`fedkd deploy compose --nodes N` may have changed it)
    nodes = sum(name.startswith("supernode-") for name in yaml.safe_load((ROOT / COMPOSE_FILES["plain"]).read_text())["services"])
    assert nodes >= 1
    assert doc == compose_document(variant, nodes), f"{COMPOSE_FILES[variant]} is stale: run `fedkd deploy compose --nodes {nodes}`"

    tls, auth = variant in ("tls", "auth"), variant == "auth"
    cd = compose_deployment(nodes, tls=tls, auth=auth)
    local = LocalDeployment(nodes, tls=tls, auth=auth, workdir=tmp_path)  # what `deploy local` would start
    ld = local.deployment
    local_cmds = service_commands(ld)
    assert set(doc["services"]) == set(local_cmds) == {"superlink", *(f"supernode-{i}" for i in range(nodes))}
    mounts = [v.split(":")[1] for v in doc["services"]["superlink"]["volumes"]]
    for name, svc in doc["services"].items():
        # the same flags, values and order, once hosts, ports and the certificate folder are named
        assert _normalise(svc["command"], cd) == _normalise(local_cmds[name], ld), name
        # every file a command reads lies in a mounted volume; data and runs are mounted everywhere
        vols = [v.split(":")[1] for v in svc["volumes"]]
        assert set(VOLUMES.values()) <= set(vols)
        for a in svc["command"]:
            if a.startswith("/"):
                assert any(a.startswith(m + "/") for m in vols), (name, a)
    if variant == "plain":
        assert doc["services"]["superlink"]["ports"] == [f"{cd.superlink_port}:{cd.superlink_port}"]
        assert all(m in mounts for m in VOLUMES.values())
        for i in range(nodes):
            cmd = doc["services"][f"supernode-{i}"]["command"]
            assert cmd[cmd.index("--node-config") + 1] == f"partition-id={i} num-partitions={nodes}"
            assert cmd[cmd.index("--superlink") + 1] == f"superlink:{cd.superlink_port}"


def test_stage_app_leaves_the_source_tree_alone(tmp_path):
    before = (ROOT / "pyproject.toml").read_text()
    staged = (stage_app(ROOT, tmp_path) / "pyproject.toml").read_text()
    assert "[tool.flwr.app.components]" in staged and "tool.flwr.federations" not in staged
    assert (ROOT / "pyproject.toml").read_text() == before


def test_run_config_set_key_overrides_the_experiment():
    from fedkd.apps import config_from_run_config

    cfg = config_from_run_config({"config": "configs/default.toml", "set": "run.rounds=3 data.num_clients=2", "out": ""}, app_dir=ROOT)
    assert (cfg.run.rounds, cfg.data.num_clients) == (3, 2)


def test_certificates_cover_loopback_and_keys_are_openssh(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    assert main(["deploy", "certs", str(tmp_path), "--nodes", "2", "--name", "superlink"]) == 0
    f = certs.tls_files(tmp_path)
    cert = x509.load_pem_x509_certificate(f.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "superlink"} <= set(san.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    ca = x509.load_pem_x509_certificate(f.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    priv, pub = certs.node_key_paths(tmp_path, 1)
    key = load_ssh_private_key(priv.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert load_ssh_public_key(pub.read_bytes()).public_numbers() == key.public_key().public_numbers()


def test_deploy_local_rejects_bad_input_before_starting_anything(tmp_path, capsys):
    assert main(["deploy", "local", "--nodes", "0", "--out", str(tmp_path / "r")]) == 2
    assert "--nodes" in capsys.readouterr().err
    assert main(["deploy", "local", "--nodes", "2", "--set", "data.num_clients=3", "--out", str(tmp_path / "r")]) == 2
    assert main(["deploy", "local", "--nodes", "2", "--tls", "--certs", str(tmp_path / "none"), "--out", str(tmp_path / "r")]) == 2
    assert "--certs" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- real deployments
def test_deploy_local_two_nodes_completes(scratch):
    out = scratch / "run"
    assert main(["deploy", "local", "--nodes", "2", *TINY, "--out", str(out), "--timeout", "300"]) == 0
    check_run(out)
    # what ran is what docker-compose.yml runs (hosts, ports and paths aside)
    ran = json.loads((out / "deploy" / "commands.json").read_text())
    doc = compose_document("plain")
    for name in ("superlink", "supernode-0", "supernode-1"):
        assert [a for a in ran[name] if a.startswith("--")] == [a for a in doc["services"][name]["command"] if a.startswith("--")]


def test_tls_with_the_scripts_certificates_and_auth_refuses_an_unregistered_node(scratch):
    """The TLS variant (certificates from the script) with SuperNode authentication on top: one deployed run
    covers both, since Flower only authenticates SuperNodes over TLS."""
    keys = scratch / "certs"
    # the script's CA + server certificate and three key pairs, of which only node-0 and node-1 get registered
    subprocess.run([sys.executable, "-m", "fedkd.deploy.certs", str(keys), "--nodes", "3"], check=True, capture_output=True)
    out = scratch / "run"
    from fedkd.config import load_config
    from fedkd.server import new_run_dir

    cfg = load_config(None, ["data.num_clients=2", *[a for a in TINY if a != "--set"]])
    run_dir = new_run_dir(cfg, out)
    with LocalDeployment(2, auth=True, certs_dir=keys, log_dir=out / "deploy", echo=lambda s: None) as dep:
        rogue = dep.spawn_supernode("supernode-unregistered", 0, key_index=2)
        assert dep.submit({"config": str(run_dir / "config.toml"), "out": str(run_dir)}, timeout=300) == 0
        rc = rogue.popen.wait(timeout=120)
        assert rc != 0
        assert f"Exit Code: {EXIT_AUTH_REFUSED}" in rogue.log.read_text()  # "could not establish a connection to the SuperLink"
        assert all(p.alive() for p in dep.procs if p.name in ("superlink", "supernode-0", "supernode-1"))
    check_run(out)
    ran = json.loads((out / "deploy" / "commands.json").read_text())
    link = ran["superlink"]
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    assert link[link.index("--ssl-certfile") + 1] == str(keys.resolve() / "server.pem")
    for i in range(2):
        node = ran[f"supernode-{i}"]
        assert "--insecure" not in node and node[node.index("--root-certificates") + 1] == str(keys.resolve() / "ca.crt")
        assert node[node.index("--auth-supernode-private-key") + 1] == str(keys.resolve() / f"node-{i}")


def test_ctrl_c_stops_every_process(scratch):
    env = dict(os.environ, TMPDIR=str(scratch), PYTHONUNBUFFERED="1")
    p = subprocess.Popen(
        [sys.executable, "-m", "fedkd", "deploy", "local", "--nodes", "2", *TINY, "--out", str(scratch / "run")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal, even when the runner ignores SIGINT
    )  # fmt: skip
    seen = []
    deadline = time.monotonic() + 120
    for line in p.stdout:
        seen.append(line)
        if "SuperNodes started" in line or time.monotonic() > deadline:
            break
    assert leftovers(str(scratch)), "the deployment should be running now"
    p.send_signal(signal.SIGINT)
    rest, _ = p.communicate(timeout=60)
    assert p.returncode == 130, "".join(seen) + rest
    assert "interrupted" in rest
    summary = json.loads((scratch / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted"


def test_failure_stops_every_process_and_keeps_a_summary(scratch, capsys):
    out = scratch / "run"
    # the run is given 1 s: flwr run is stopped, the command fails with one line, nothing is left running
    assert main(["deploy", "local", "--nodes", "2", *TINY, "--out", str(out), "--timeout", "1"]) == 1
    assert "flwr run exited with code" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"


def test_dockerfile_installs_every_package_folder_with_the_constraints():
    import tomllib

    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM python:3.11-slim" in text
    assert "pip install -c constraints.txt ." in text and "download.pytorch.org/whl/cpu" in text
    folders = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    for folder in folders | {"configs"}:
        assert f"COPY {folder} ./{folder}" in text, folder


@pytest.mark.slow
def test_supernode_killed_and_restarted_mid_run_rejoins_and_the_run_completes(scratch):
    """SIGKILL SuperNode 1 once round 1 is recorded, start it again: the SuperLink answers the lost message with
    an error when the dead node's heartbeat runs out (Flower: up to 2 x 30 s), the round goes on with node 0,
    the restarted node registers anew and trains in the last round; the run ends ok."""
    import threading

    from fedkd.config import load_config
    from fedkd.server import new_run_dir

    cfg = load_config(None, ["data.num_clients=2", "run.rounds=3", "train.local_epochs=1", "data.min_partition_size=5"])
    out = scratch / "run"
    run_dir = new_run_dir(cfg, out)
    with LocalDeployment(2, log_dir=out / "deploy", echo=lambda s: None) as dep:
        rc: list[int] = []
        t = threading.Thread(target=lambda: rc.append(dep.submit({"config": str(run_dir / "config.toml"), "out": str(run_dir)}, timeout=600)))
        t.start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and t.is_alive():
            try:
                df = pd.read_csv(run_dir / "metrics.csv")
                if ((df["node"] == "server") & (df["round"] == 1)).any():
                    break
            except (OSError, pd.errors.EmptyDataError):
                pass
            time.sleep(0.5)
        dead = dep.node(1)
        dep.kill_node(1)
        assert not dead.alive()
        new = dep.restart_node(1)
        assert new is not dead and new.alive()
        t.join(timeout=600)
        assert rc == [0]
    summary = check_run(out, rounds=3)
    df = pd.read_csv(out / "metrics.csv", dtype={"node": str})
    trained = df[(df["split"] == "train") & (df["metric"] == "loss")]
    assert "1" in set(trained[trained["round"] == 3]["node"])  # the restarted node trained after it rejoined
    assert "1" in set(trained[trained["round"] == 1]["node"])
    assert summary["rounds_completed"] == 3
