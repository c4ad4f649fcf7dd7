"""Feature-shift federations built offline: one digit *domain* per client (DIGITS-like, for FedLGD).

The paper's DIGITS benchmark gives each client a different digit dataset (MNIST, SVHN, USPS, SynthDigits,
MNIST-M): same labels, different image statistics ("feature shift"). None of those can be downloaded
here, so this module *derives* domains from one grayscale digit source by fixed image transforms:

- base images: scikit-learn's bundled 8x8 digits (``digits-domains``; resized to 20x20 and padded to
  28x28, the layout of MNIST's 20x20 box in a 28x28 frame) or MNIST from IDX files in ``data.data_dir``
  (``mnist-domains``; train and/or t10k).
- the base pool is split into one disjoint, class-stratified shard per domain (no digit image appears
  in two domains), and each shard goes through its domain's transform; every image is 3x28x28 in [0, 1].

Domains (``DOMAINS``; ``data.domains`` picks and orders them):

- ``gray``: the base digit, white on black, copied to three channels (the MNIST-like domain).
- ``inverted``: 1 - x: a dark digit on a white background.
- ``rotated``: rotated counter-clockwise by an angle drawn per image from U(30, 60) degrees (bilinear).
- ``noisy``: additive Gaussian noise, sigma 0.3, drawn independently per pixel and channel, clipped to [0, 1].
- ``blurred``: Gaussian blur, sigma 1.2 pixels (lower contrast, soft strokes).
- ``colored``: MNIST-M's blending, |background - digit| per channel, over a random smooth colour
  background (a 4x4x3 uniform colour grid upsampled bilinearly to 28x28).

What these are not: they are not SVHN, USPS, SynthDigits or MNIST-M. Every domain shares the base
source's handwriting, stroke width and digit layout; only pixel statistics (and, for ``rotated``,
geometry) differ. The MNIST-M-like domain uses synthetic smooth colour fields, not patches of BSDS500
photographs. The shift is therefore milder and more regular than DIGITS', and accuracies on these
federations are not comparable with the paper's DIGITS table.

The transforms' random draws (shard assignment, angles, noise, backgrounds) are *data generation*: fixed
by ``run.seed`` and the domain's position, identical for every client and the server, and no secret of
any client.

Partitioning (``data.partitioner = "domain"``): client ``i`` holds domain ``i % len(domains)``. A domain
with several clients is split among them IID, or with Dirichlet(``data.domain_alpha``) label skew
(flwr-datasets' DirichletPartitioner inside the domain); the client ids then go through flwr-datasets'
NaturalIdPartitioner, as the ``subject`` partitioner does with subject ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SIZE = 28  # every domain image is 3 x SIZE x SIZE
DOMAIN_DATASETS = ("digits-domains", "mnist-domains")  # the dataset names registered in datasets.py


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    transform: Callable[[np.ndarray, np.random.Generator], np.ndarray]  # (N, 28, 28) in [0, 1] -> (N, 3, 28, 28)


def _rgb(x: np.ndarray) -> np.ndarray:
    return np.repeat(x[:, None], 3, axis=1)


def _gray(x, rng):
    return _rgb(x)


def _inverted(x, rng):
    return _rgb(1.0 - x)


def _rotated(x, rng):
    from skimage.transform import rotate

    angles = rng.uniform(30.0, 60.0, size=len(x))
    out = np.stack([rotate(img, a, order=1, mode="constant", cval=0.0, preserve_range=True) for img, a in zip(x, angles)])
    return _rgb(out)


def _noisy(x, rng):
    return np.clip(_rgb(x) + rng.normal(0.0, 0.3, size=(len(x), 3, SIZE, SIZE)), 0.0, 1.0)


def _blurred(x, rng):
    from skimage.filters import gaussian

    return _rgb(np.stack([gaussian(img, sigma=1.2, mode="constant", cval=0.0, preserve_range=True) for img in x]))


def _colored(x, rng):
    from skimage.transform import resize

    coarse = rng.uniform(0.0, 1.0, size=(len(x), 4, 4, 3))  # a random 4x4 colour grid per image
    bg = np.stack([resize(c, (SIZE, SIZE, 3), order=1, mode="edge", anti_aliasing=False) for c in coarse])  # (N, 28, 28, 3); size 3 -> 3 keeps channels
    return np.abs(bg.transpose(0, 3, 1, 2) - x[:, None])  # MNIST-M's |patch - digit| blend


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("gray", "base digit, white on black, 3 channels", _gray),
        Domain("inverted", "1 - x: dark digit on white", _inverted),
        Domain("rotated", "rotated by U(30, 60) degrees", _rotated),
        Domain("noisy", "Gaussian noise per pixel and channel, sigma 0.3", _noisy),
        Domain("blurred", "Gaussian blur, sigma 1.2 px", _blurred),
        Domain("colored", "MNIST-M-style |colour background - digit|", _colored),
    )
}
DEFAULT_DOMAINS: tuple[str, ...] = tuple(DOMAINS)


def digits_28(x8: np.ndarray) -> np.ndarray:
    """sklearn's 8x8 digits (N, 8, 8) in [0, 1] -> (N, 28, 28): bilinear to 20x20, then a 4-pixel border."""
    from skimage.transform import resize

    small = np.stack([resize(img, (20, 20), order=1, mode="edge", anti_aliasing=False) for img in x8])
    return np.pad(small, ((0, 0), (4, 4), (4, 4))).astype(np.float32)


def stratified_shards(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """A shard id in 0..n-1 per sample: each class dealt round-robin (shuffled) over the shards."""
    shard = np.empty(len(y), dtype=np.int64)
    offset = 0
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        shard[idx] = (np.arange(len(idx)) + offset) % n
        offset += len(idx)  # the next class starts where this one stopped, so shard sizes stay within 1
    return shard


def build_domains(x: np.ndarray, y: np.ndarray, domains: tuple[str, ...], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Base images (N, 28, 28) in [0, 1] and labels -> (images (N', 3, 28, 28), labels, domain index).

    Each base image goes to exactly one domain (class-stratified shards); the output is ordered by domain.
    """
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; valid: {', '.join(DOMAINS)}")
    if x.ndim != 3 or x.shape[1:] != (SIZE, SIZE):
        raise ValueError(f"base images must be (N, {SIZE}, {SIZE}), got {x.shape}")
    shard = stratified_shards(y, len(domains), np.random.default_rng([seed, 0xD0]))
    xs, ys, ds = [], [], []
    for d, name in enumerate(domains):
        idx = np.flatnonzero(shard == d)
        rng = np.random.default_rng([seed, 0xD1, d])  # fixed per (seed, position): data generation, not a secret
        xs.append(DOMAINS[name].transform(x[idx].astype(np.float64), rng).astype(np.float32))
        ys.append(y[idx].astype(np.int64))
        ds.append(np.full(len(idx), d, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ds)


def client_domains(num_clients: int, num_domains: int) -> np.ndarray:
    """The domain index of each client: client i holds domain i % num_domains."""
    return np.arange(num_clients) % num_domains


def per_domain_accuracy(pred: np.ndarray, y: np.ndarray, domain: np.ndarray, names: tuple[str, ...] | list[str]) -> dict[str, float]:
    """``{name: accuracy}`` of predicted labels on each domain's samples (domains without samples are left out)."""
    out = {}
    for d, name in enumerate(names):
        m = domain == d
        if m.any():
            out[name] = float((pred[m] == y[m]).mean())
    return out
