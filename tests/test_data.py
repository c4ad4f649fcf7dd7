import gzip
import struct

import numpy as np
import pytest

from fedkd.config import ConfigError, DataConfig
from fedkd.data import load_federation, load_hub
from fedkd.data.idx import read_idx
from fedkd.data.synthetic import generate_subjects


def labels(fed):
    return [set(c.train.y.tolist()) | set(c.test.y.tolist()) for c in fed.clients]


def test_iid_partition_is_balanced_and_disjoint():
    fed = load_federation(DataConfig(partitioner="iid", num_clients=7), 0)
    sizes = [len(c.train) + len(c.test) for c in fed.clients]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) + len(fed.server_test) == 1797
    assert fed.input_shape == (1, 8, 8) and fed.num_classes == 10
    assert 0.19 < len(fed.server_test) / 1797 < 0.21


def test_dirichlet_is_more_skewed_at_small_alpha():
    def skew(alpha):
        fed = load_federation(DataConfig(alpha=alpha, num_clients=10, min_partition_size=5), 0)
        return np.mean([np.bincount(c.train.y, minlength=10).max() / len(c.train) for c in fed.clients])

    assert skew(0.1) > skew(100.0) + 0.3


def test_pathological_gives_each_client_k_classes():
    fed = load_federation(DataConfig(partitioner="pathological", classes_per_client=2, num_clients=5), 0)
    assert all(len(s) == 2 for s in labels(fed))


def test_partitions_are_deterministic_in_the_seed():
    a = load_federation(DataConfig(num_clients=6, min_partition_size=5), 1)
    load_federation.cache_clear()
    b = load_federation(DataConfig(num_clients=6, min_partition_size=5), 1)
    assert all(np.array_equal(x.train.y, y.train.y) for x, y in zip(a.clients, b.clients))


def test_synthetic_subjects_spread_over_clients_and_leave_non_members():
    data, model, holders, members = generate_subjects(
        num_subjects=20, records_per_subject=20, num_clients=8, subjects_per_client=3, clients_per_subject=2, separation=2.0, seed=0
    )
    held = [s for h in holders for s in h]
    assert all(len(set(h)) == 3 for h in holders)  # no client holds a subject twice
    assert set(held) == set(np.flatnonzero(members)) and members.sum() == 12  # ceil(8 * 3 / 2) members
    for s in np.flatnonzero(members):  # every member sits on 2 distinct clients, its records split between them
        assert held.count(s) == 2
        assert len(set(data.client[data.subject == s].tolist())) == 2
    for s in np.flatnonzero(~members):  # the 8 non-members: no client holds any of their records
        assert (data.client[data.subject == s] == -1).all()
    _, _, holders3, members3 = generate_subjects(
        num_subjects=30, records_per_subject=6, num_clients=5, subjects_per_client=4, clients_per_subject=3, separation=1.0, seed=1
    )
    counts = np.bincount([s for h in holders3 for s in h], minlength=30)[members3]
    assert members3.sum() == 7 and set(counts.tolist()) <= {2, 3}  # 20 slots over 7 members: 3 each, one with 2
    x, y = model.sample(0, 50, np.random.default_rng(0))
    assert x.shape == (50, 1, 8, 8) and 0 <= x.min() and x.max() <= 1
    with pytest.raises(ConfigError, match="data.num_subjects"):  # 10 x 4 / 1 = 40 members leave no non-member
        DataConfig(dataset="synthetic-subjects", num_clients=10, subjects_per_client=4, clients_per_subject=1, num_subjects=40).validate(None)
    with pytest.raises(ConfigError, match="data.clients_per_subject"):
        DataConfig(dataset="synthetic-subjects", num_clients=3, clients_per_subject=4).validate(None)


def test_subject_partitioner_on_synthetic_subjects():
    cfg = DataConfig(dataset="synthetic-subjects", partitioner="subject", num_clients=5, num_subjects=12, subjects_per_client=3, records_per_subject=10)
    fed = load_federation(cfg, 0)
    assert fed.num_clients == 5
    for c, held in zip(fed.clients, fed.extras["holders"]):
        assert set(c.train.subject.tolist()) <= set(held)
    seen = set().union(*(c.train.subject.tolist() + c.test.subject.tolist() for c in fed.clients))
    assert seen == set(np.flatnonzero(fed.extras["members"]).tolist())  # 8 members on 2 clients each, 4 non-members nowhere


def test_subject_partitioner_refuses_datasets_without_subjects():
    with pytest.raises(ConfigError) as e:
        load_federation(DataConfig(partitioner="subject", num_clients=3), 0)
    assert e.value.key == "data.partitioner"


def _write_idx(path, arr, code):
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def test_mnist_from_local_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (200, 28, 28), dtype=np.uint8)
    labs = np.repeat(np.arange(10, dtype=np.uint8), 20)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs, 0x08)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labs, 0x08)
    assert np.array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), imgs)
    fed = load_federation(DataConfig(dataset="mnist", data_dir=str(tmp_path), partitioner="iid", num_clients=4), 0)
    assert fed.input_shape == (1, 28, 28) and len(fed.server_test) == 40
    assert fed.clients[0].train.x.max() <= 1.0


def test_missing_data_dir_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_federation(DataConfig(dataset="mnist", data_dir=str(tmp_path / "none")), 0)
    assert e.value.key == "data.data_dir"


def test_hub_loader_reads_parquet_through_flwr_datasets(tmp_path):
    """FEMNIST-shaped data written locally: images, character labels, writer ids kept as subjects."""
    import io

    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(0)

    def rows(n, writers):
        out = []
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(buf, format="PNG")
            out.append({"image": {"bytes": buf.getvalue(), "path": None}, "character": int(i % 62), "writer_id": f"w{writers[i % len(writers)]}"})
        return pd.DataFrame(out)

    rows(124, [0, 1, 2, 3, 4, 5]).to_parquet(tmp_path / "train.parquet")
    train, test = load_hub("flwrlabs/femnist", image_key="image", label_key="character", subject_key="writer_id", num_classes=62, data_dir=str(tmp_path))
    assert test is None and train.x.shape == (124, 1, 28, 28) and train.num_classes == 62
    assert set(train.subject.tolist()) == set(range(6))
    fed = load_federation(DataConfig(dataset="femnist", data_dir=str(tmp_path), partitioner="subject", num_clients=3, client_test_fraction=0.2), 0)
    subjects = [set(c.train.subject.tolist()) | set(c.test.subject.tolist()) for c in fed.clients]
    assert all(len(s) >= 1 for s in subjects)
    assert not (subjects[0] & subjects[1]) and not (subjects[1] & subjects[2])  # a writer lives on one client
