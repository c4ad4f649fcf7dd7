"""The feature-shift federation (fedkd/data/domains.py): shapes, domains, label skew, determinism, errors."""

import gzip
import struct

import numpy as np
import pytest

from fedkd.config import ConfigError, DataConfig, load_config
from fedkd.data import load_federation
from fedkd.data.domains import DOMAINS, build_domains, per_domain_accuracy, stratified_shards

ALL = tuple(DOMAINS)


def domains_cfg(**kw) -> DataConfig:
    base = dict(dataset="digits-domains", partitioner="domain", num_clients=6, min_partition_size=5)
    return DataConfig(**{**base, **kw})


def test_one_domain_per_client_with_shapes_and_a_per_domain_server_test_set():
    fed = load_federation(domains_cfg(), 0)
    assert fed.input_shape == (3, 28, 28) and fed.num_classes == 10 and fed.num_clients == 6
    assert fed.extras["domains"] == list(ALL)
    for c in fed.clients:
        for split in (c.train, c.test):
            assert split.x.dtype == np.float32 and 0.0 <= split.x.min() and split.x.max() <= 1.0
            assert set(split.domain.tolist()) == {c.partition_id}  # client i holds domain i
        assert len(np.unique(c.train.y)) == 10  # no label skew by default
    # every domain is in the server's test set, in equal shares, each with every class
    counts = np.bincount(fed.server_test.domain, minlength=6)
    assert counts.min() >= 55 and counts.max() - counts.min() <= 1
    for d in range(6):
        assert len(np.unique(fed.server_test.y[fed.server_test.domain == d])) == 10
    # the domains really differ in pixel statistics: inverted is bright, gray is dark, colored is tinted
    mean = {ALL[c.partition_id]: c.train.x.mean() for c in fed.clients}
    assert mean["inverted"] > 0.75 > 0.25 > mean["gray"]
    colored = fed.clients[ALL.index("colored")].train.x
    assert np.abs(colored[:, 0] - colored[:, 1]).mean() > 0.1  # channels differ (not a gray image)
    assert np.array_equal(fed.clients[0].train.x[:, 0], fed.clients[0].train.x[:, 2])  # gray: equal channels


def test_domains_come_from_disjoint_class_stratified_shards():
    y = np.repeat(np.arange(10), 31)
    shard = stratified_shards(y, 4, np.random.default_rng(0))
    sizes = np.bincount(shard)
    assert sizes.sum() == len(y) and sizes.max() - sizes.min() <= 1
    for s in range(4):
        per_class = np.bincount(y[shard == s], minlength=10)
        assert per_class.max() - per_class.min() <= 1
    # each base image lands in exactly one domain: tag the images by their value and look for them
    x = np.zeros((40, 28, 28), np.float32)
    x[:, 0, 0] = np.arange(40) / 40.0
    out, labels, dom = build_domains(x, np.arange(40) % 10, ("gray", "gray"), seed=3)
    tags = np.round(out[:, 0, 0, 0] * 40).astype(int)
    assert sorted(tags.tolist()) == list(range(40)) and np.bincount(dom).tolist() == [20, 20]


def test_the_federation_is_deterministic_in_the_seed():
    a = load_federation(domains_cfg(), 1)
    load_federation.cache_clear()
    b = load_federation(domains_cfg(), 1)
    c = load_federation(domains_cfg(), 2)
    assert all(np.array_equal(x.train.x, y.train.x) and np.array_equal(x.train.y, y.train.y) for x, y in zip(a.clients, b.clients))
    assert not np.array_equal(a.clients[5].train.x[:20], c.clients[5].train.x[:20])


def test_dirichlet_label_skew_inside_each_domain():
    def skew(alpha):
        fed = load_federation(domains_cfg(domains=("gray", "inverted"), num_clients=4, domain_alpha=alpha), 0)
        for c in fed.clients:
            assert set(c.train.domain.tolist()) == {c.partition_id % 2}
        # total-variation distance between each client's label distribution and uniform
        return np.mean([0.5 * np.abs(np.bincount(c.train.y, minlength=10) / len(c.train) - 0.1).sum() for c in fed.clients])

    iid = load_federation(domains_cfg(domains=("gray", "inverted"), num_clients=4), 0)
    sizes = [len(c.train) + len(c.test) for c in iid.clients]
    assert max(sizes) - min(sizes) <= 2  # IID halves of each domain
    assert skew(0.0) < 0.15 and skew(0.1) > 0.4, (skew(0.0), skew(0.1))


def test_mnist_domains_from_local_idx_files(tmp_path):
    def write(path, arr):
        header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
        with gzip.open(path, "wb") as f:
            f.write(header + arr.tobytes())

    rng = np.random.default_rng(0)
    write(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (300, 28, 28), dtype=np.uint8))
    write(tmp_path / "t10k-labels-idx1-ubyte.gz", np.repeat(np.arange(10, dtype=np.uint8), 30))
    fed = load_federation(DataConfig(dataset="mnist-domains", data_dir=str(tmp_path), partitioner="domain", num_clients=3, domains=("gray", "noisy", "colored")), 0)
    assert fed.input_shape == (3, 28, 28) and len(fed.server_test) == 60
    assert sum(len(c.train) + len(c.test) for c in fed.clients) == 240


def test_bad_domain_settings_are_config_errors(tmp_path):
    cases = {
        "data.domains": ["data.domains=[\"gray\", \"svhn\"]"],
        "data.partitioner": ["data.partitioner=domain"],  # digits has no domains
        "data.num_clients": ["data.dataset=digits-domains", "data.partitioner=domain", "data.num_clients=5"],
        "data.domain_alpha": ["data.dataset=digits-domains", "data.partitioner=domain", "data.num_clients=6", "data.domain_alpha=0.5"],
    }
    for key, overrides in cases.items():
        with pytest.raises(ConfigError) as e:
            load_config(None, overrides)
        assert e.value.key == key, (key, str(e.value))
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.domains=[\"gray\", \"svhn\"]"])
    assert "valid: gray, inverted, rotated, noisy, blurred, colored" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_federation(DataConfig(dataset="mnist-domains", data_dir=str(tmp_path)), 0)
    assert e.value.key == "data.data_dir"


def test_per_domain_accuracy():
    acc = per_domain_accuracy(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]), np.array([0, 0, 1, 1]), ["a", "b", "c"])
    assert acc == {"a": 0.5, "b": 1.0}
