import os
from contextlib import contextmanager

import pytest

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

from fedkd.config import load_config  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a real deployment that waits on Flower's timers, or a strategy on Flower's own simulation engine (make test-slow; deselect with -m 'not slow')")


def small(*overrides: str):
    """A tiny digits federation: 4 clients, 2 rounds, 1 local epoch."""
    base = ["data.num_clients=4", "run.rounds=2", "train.local_epochs=1", "data.min_partition_size=5"]
    return load_config(None, base + list(overrides))


@contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` for a block (tiny models run many times faster on one thread)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    with torch_threads(1):
        yield


@pytest.fixture
def small_cfg():
    return small


@pytest.fixture(scope="session", autouse=True)
def _one_ray_session():
    """Every fast-path experiment of the test run shares one Ray start and its warm actors."""
    from fedkd.simulation import Session

    with Session() as session:
        yield session
