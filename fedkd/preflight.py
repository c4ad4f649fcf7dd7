"""Checks of the environment an experiment needs, before anything starts (no run directory, no Ray).

``fedkd.config`` validates values on their own; these checks look at the machine: the device exists,
the run directory can be made, the data can be loaded, the Ray cluster answers. Each failure is a
:class:`~fedkd.config.ConfigError` naming the key, which the CLI prints as one line with exit code 2.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from fedkd.config import ConfigError, ExperimentConfig

HUB_HOST = ("huggingface.co", 443)
CONNECT_TIMEOUT_S = 3.0


def check_device(device: str) -> None:
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("run.device", f"{device!r} asked for, but no CUDA GPU is available here (use auto or cpu)")
    if ":" in device:
        idx = device.split(":", 1)[1]
        n = torch.cuda.device_count()
        if not idx.isdigit() or int(idx) >= n:
            raise ConfigError("run.device", f"{device!r}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")


def check_writable_dir(path: str | Path, key: str) -> None:
    """``path`` is, or can be made as, a writable directory (nothing is created)."""
    p = Path(path).absolute()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(key, f"cannot make {str(path)!r}: {str(probe)!r} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(key, f"cannot write under {str(probe)!r} (permission denied)")


def reachable(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """None when a TCP connection to host:port opens within ``timeout``, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def check_ray_address(address: str) -> None:
    if not address or address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("simulation.ray_address", f"expected host:port or ray://host:port (got {address!r})")
    why = reachable(host, int(port))
    if why is not None:
        raise ConfigError("simulation.ray_address", f"cannot reach a Ray cluster at {address!r} ({why})")


def go_offline() -> None:
    """Make Hugging Face libraries use their local cache only (fail at once instead of retrying for a minute)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hc

        hc.HF_HUB_OFFLINE = True
        import datasets.config as dc

        dc.HF_HUB_OFFLINE = True
        dc.HF_DATASETS_OFFLINE = True
    except ImportError:  # pragma: no cover - both are dependencies of flwr-datasets
        pass


def check_data(cfg: ExperimentConfig) -> None:
    """Load the federation (it is cached, so the run reuses it); a hub that cannot be reached is a data_dir problem."""
    from fedkd.data import load_federation

    offline = None
    if not cfg.data.data_dir:
        offline = reachable(*HUB_HOST)
        if offline is not None:
            go_offline()
    try:
        load_federation(cfg.data, cfg.run.seed)
    except ConfigError:
        raise
    except (ConnectionError, OSError) as e:
        if cfg.data.data_dir:
            raise ConfigError("data.data_dir", f"cannot load {cfg.data.dataset!r} from {cfg.data.data_dir!r} ({type(e).__name__}: {e})") from None
        why = f"the Hugging Face hub is unreachable ({offline})" if offline else f"{type(e).__name__}: {e}"
        raise ConfigError("data.data_dir", f"{cfg.data.dataset!r} without data.data_dir downloads from the hub, and {why}; set data.data_dir to local files") from None


def preflight(cfg: ExperimentConfig, out: str | Path | None = None, *, data: bool = True) -> None:
    """Every environment check of a simulation run, cheapest first."""
    check_device(cfg.run.device)
    if out is not None:
        check_writable_dir(out, "--out")
    else:
        check_writable_dir(cfg.run.out_dir, "run.out_dir")
    check_ray_address(cfg.simulation.ray_address)
    if data:
        check_data(cfg)
