"""Private randomness: generators seeded from OS entropy, which the server (or anyone) cannot know.

Every draw a DP guarantee or an attack's difficulty rests on comes from here: DP-SGD's noise and
Poisson sampling, RQM/PBM's draws, the central Gaussian noise, clients' shuffling and dropout masks.
Seeds derived from public values (``run.seed``, round, partition id) are only for data splits, model
initialisation and client sampling.

``seed=None`` (the default everywhere) draws 63 bits from :mod:`secrets` (the OS CSPRNG) to seed the
generator. A given integer ``seed`` makes the draws reproducible: only for tests and for
``privacy.reproducible_noise = true`` (debugging), under which summary.json reports no guarantee.

Limits, said plainly: the generators are PyTorch's/NumPy's ordinary PRNGs (Mersenne Twister /
PCG64) with a secret seed, not a CSPRNG per draw, and floating-point Gaussian sampling is not
hardened against Mironov's precision attack (Opacus' ``secure_mode`` needs ``torchcsprng``, which is
not a dependency here).
"""

from __future__ import annotations

import secrets
from contextlib import contextmanager

import numpy as np
import torch


def private_seed() -> int:
    """63 bits from the OS CSPRNG."""
    return secrets.randbits(63)


def torch_generator(device: str | torch.device = "cpu", seed: int | None = None) -> torch.Generator:
    """A torch generator on ``device``: OS entropy unless a (debug) ``seed`` is given."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(private_seed() if seed is None else int(seed) % (2**63))
    return g


def numpy_generator(seed: int | None = None) -> np.random.Generator:
    """A NumPy generator: 128 bits of OS entropy unless a (debug) ``seed`` is given."""
    return np.random.default_rng(secrets.randbits(128) if seed is None else int(seed))


@contextmanager
def private_global_rng(device: str | torch.device = "cpu", seed: int | None = None):
    """Run a block with torch's *global* generator(s) seeded privately (dropout masks and any other
    draw that uses the default generator), restoring the previous global state afterwards, so model
    initialisation before and after stays seeded and reproducible."""
    device = torch.device(device)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        s = private_seed() if seed is None else int(seed) % (2**63)
        torch.manual_seed(s)
        yield
