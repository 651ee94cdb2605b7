"""CIFAR-10/100: the pickle reader, normalisation, shard partition, download and errors.

Which images each client holds decides what every CIFAR experiment trains on (spec 6.2),
so the partition's invariants are pinned on label vectors of the real sizes; the reader
and the downloader run on tiny fake CIFAR folders and archives the tests write, served
from a local http.server. The real-data check is marked slow and needs FEDEQ_DATA_DIR.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest

from data.cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    load_cifar,
    normalize,
    read_cifar_pickles,
)
from data.download import ARCHIVES, URL_ENV, download_cifar
from data.errors import DataError
from data.partition import ShardPartition, shard_partition
from data.registry import DATASETS, load_dataset
from utils.rundir import RunDir

# --------------------------------------------------------------------------- fake folders


def _rows(x: np.ndarray) -> np.ndarray:
    """NHWC images -> the official channel-major N x 3072 rows."""
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(len(x), -1))


def _fake_split(rng: np.random.Generator, num_classes: int,
                per_class: int) -> tuple[np.ndarray, np.ndarray]:
    y = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    x = rng.integers(0, 256, size=(len(y), 32, 32, 3), dtype=np.uint8)
    return x, y


def _dump(path: Path, blob: dict, protocol: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(blob, protocol=protocol))


def write_cifar10(folder: Path, train_per_class: int = 4, test_per_class: int = 2,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Official layout, protocol 2 and bytes keys like the real files, no ``filenames``."""
    rng = np.random.default_rng(seed)
    x_train, y_train = _fake_split(rng, 10, train_per_class)
    x_test, y_test = _fake_split(rng, 10, test_per_class)
    batches = np.array_split(np.arange(len(y_train)), 5)
    for i, idx in enumerate(batches, start=1):
        _dump(folder / f"data_batch_{i}", {b"batch_label": b"training batch",
                                           b"labels": y_train[idx].tolist(),
                                           b"data": _rows(x_train[idx])}, protocol=2)
    _dump(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1",
                                  b"labels": y_test.tolist(), b"data": _rows(x_test)},
          protocol=2)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def write_cifar100(folder: Path, train_per_class: int = 2, test_per_class: int = 1,
                   seed: int = 1) -> dict[str, np.ndarray]:
    """Official key names (fine and coarse labels), written with today's default protocol."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        x, y = _fake_split(rng, 100, per_class)
        _dump(folder / split, {b"filenames": [b"x.png"] * len(y), b"batch_label": b"b",
                               b"fine_labels": y.tolist(), b"coarse_labels": (y // 5).tolist(),
                               b"data": _rows(x)}, protocol=pickle.DEFAULT_PROTOCOL)
        out[f"x_{split}"], out[f"y_{split}"] = x, y
    return out


@pytest.fixture
def c10(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    return tmp_path, write_cifar10(tmp_path / "cifar10" / "cifar-10-batches-py")


@pytest.fixture
def c100(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    return tmp_path, write_cifar100(tmp_path / "cifar100" / "cifar-100-python")


# --------------------------------------------------------------------------- reader


def test_cifar10_reader_round_trips_images_and_labels(c10) -> None:
    root, ref = c10
    x_train, y_train, x_test, y_test = read_cifar_pickles(root, "cifar10")
    assert x_train.dtype == np.uint8 and x_train.shape == (40, 32, 32, 3)
    np.testing.assert_array_equal(x_train, ref["x_train"])  # batches 1..5 in file order
    np.testing.assert_array_equal(y_train, ref["y_train"])
    np.testing.assert_array_equal(x_test, ref["x_test"])
    np.testing.assert_array_equal(y_test, ref["y_test"])


def test_cifar100_reader_uses_fine_labels(c100) -> None:
    root, ref = c100
    x_train, y_train, x_test, y_test = read_cifar_pickles(root, "cifar100")
    np.testing.assert_array_equal(x_train, ref["x_train"])
    np.testing.assert_array_equal(y_train, ref["y_train"])
    np.testing.assert_array_equal(y_test, ref["y_test"])
    assert y_train.max() == 99


@pytest.mark.parametrize("name, mean, std", [("cifar10", CIFAR10_MEAN, CIFAR10_STD),
                                             ("cifar100", CIFAR100_MEAN, CIFAR100_STD)])
def test_per_channel_normalisation(name, mean, std) -> None:
    x = np.zeros((2, 32, 32, 3), np.uint8)
    x[0] = (255, 0, 128)
    x[1, 5, 7] = (10, 20, 30)
    out = normalize(x, name)
    assert out.dtype == np.float32 and out.shape == x.shape
    want = (x.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[0, 0, 0], [(1 - mean[0]) / std[0], -mean[1] / std[1],
                                              (128 / 255 - mean[2]) / std[2]], rtol=1e-6)


def test_load_cifar10_clients_hold_their_partition(c10) -> None:
    root, ref = c10
    data = load_cifar(root, "cifar10", num_clients=10, frac_unseen=0.2, seed=3,
                      labels_per_client=2, download=False)
    assert data.name == "cifar10" and data.num_classes == 10
    assert data.input_shape == (32, 32, 3)
    assert data.num_clients == 8 and data.unseen_ids == ["client_008", "client_009"]
    part = ShardPartition.from_arrays(data.partition)
    assert part.label_table.shape == (10, 2) and part.seed == 3
    clients = list(zip(data.train + data.unseen_train, data.test + data.unseen_test,
                       strict=True))
    for i, (tr, te) in enumerate(clients):
        # 4 train / 2 test images per class, 2 shards per class: 2 + 2 train, 1 + 1 test.
        assert tr.n == 4 and te.n == 2
        assert tr.x.dtype == np.float32 and tr.y.dtype == np.int32
        np.testing.assert_allclose(tr.x, normalize(ref["x_train"][part.train[i]], "cifar10"))
        np.testing.assert_array_equal(tr.y, ref["y_train"][part.train[i]])
        np.testing.assert_array_equal(te.y, ref["y_test"][part.test[i]])
        assert set(tr.y) == set(te.y) == set(part.label_table[i])


def test_load_cifar100(c100) -> None:
    root, _ = c100
    data = load_cifar(root, "cifar100", num_clients=20, labels_per_client=5, seed=0,
                      download=False)
    assert data.num_clients == 20 and data.num_classes == 100
    assert [c.n for c in data.train] == [10] * 20 and [c.n for c in data.test] == [5] * 20
    for tr, te in zip(data.train, data.test, strict=True):
        assert set(tr.y) == set(te.y)


def test_registry_forwards_lpc_and_keeps_other_loaders(c10) -> None:
    root, _ = c10
    assert {"cifar10", "cifar100", "synthetic", "femnist"} <= set(DATASETS)
    a = load_dataset("cifar10", str(root), num_clients=10, frac_unseen=0.1, seed=5,
                     labels_per_client=2)
    b = load_cifar(root, "cifar10", num_clients=10, frac_unseen=0.1, seed=5,
                   labels_per_client=2, download=False)
    assert a.client_ids == b.client_ids and len(a.unseen_ids) == 1
    for k in a.partition:
        np.testing.assert_array_equal(a.partition[k], b.partition[k])
    syn = load_dataset("synthetic", None, num_clients=4, frac_unseen=0.0, seed=0,
                       labels_per_client=3, source="tfds")
    assert syn.num_clients == 4 and syn.partition is None
    with pytest.raises(DataError, match="--data_dir"):
        load_dataset("cifar100", None, num_clients=10, frac_unseen=0.0, seed=0)


# --------------------------------------------------------------------------- errors


def test_missing_folder_names_path(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_cifar(tmp_path, "cifar10", num_clients=10, labels_per_client=2, download=False)
    msg = str(info.value)
    assert str(tmp_path / "cifar10" / "cifar-10-batches-py") in msg
    assert "no such folder" in msg and "cifar-10-python.tar.gz" in msg


def test_missing_batch_file_names_it(c10) -> None:
    root, _ = c10
    gone = root / "cifar10" / "cifar-10-batches-py" / "data_batch_3"
    gone.unlink()
    with pytest.raises(DataError, match="no such file") as info:
        read_cifar_pickles(root, "cifar10")
    assert str(gone) in str(info.value)


@pytest.mark.parametrize("blob, match", [
    ({b"data": np.zeros((2, 3072), np.uint8), b"label": [0, 1]}, "keys b'data' and b'labels'"),
    ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, r"shape \(2, 100\)"),
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "dtype float32"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 integer labels"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"labels in \[0, 10\)"),
    ([1, 2, 3], "a pickled list"),
])
def test_malformed_batch(c10, blob, match) -> None:
    root, _ = c10
    bad = root / "cifar10" / "cifar-10-batches-py" / "test_batch"
    _dump(bad, blob, protocol=2)
    with pytest.raises(DataError, match=match) as info:
        read_cifar_pickles(root, "cifar10")
    assert str(bad) in str(info.value)


def test_not_a_pickle_and_foreign_globals_are_refused(c10) -> None:
    root, _ = c10
    bad = root / "cifar10" / "cifar-10-batches-py" / "data_batch_1"
    bad.write_bytes(b"this is not a pickle")
    with pytest.raises(DataError, match="unreadable pickle"):
        read_cifar_pickles(root, "cifar10")
    # A pickle that would call a function on load must not run it.
    bad.write_bytes(pickle.dumps({b"data": os.getcwd}))
    with pytest.raises(DataError, match="refusing to load"):
        read_cifar_pickles(root, "cifar10")


def test_partition_settings_that_do_not_divide(c10) -> None:
    root, _ = c10
    with pytest.raises(ValueError, match="multiple of the number of classes"):
        load_cifar(root, "cifar10", num_clients=5, labels_per_client=3, download=False)
    with pytest.raises(ValueError, match="fewer than"):  # 4 images per class, 10 shards
        load_cifar(root, "cifar10", num_clients=10, labels_per_client=10, download=False)


# --------------------------------------------------------------------------- partition


@pytest.mark.parametrize("num_classes", [10, 100])
def test_partition_defaults_on_real_sizes(num_classes: int) -> None:
    rng = np.random.default_rng(0)
    y_train = rng.permutation(np.repeat(np.arange(num_classes), 50000 // num_classes))
    y_test = rng.permutation(np.repeat(np.arange(num_classes), 10000 // num_classes))
    part = shard_partition(y_train, y_test, seed=100)  # 100 clients, lpc 5
    assert part.label_table.shape == (100, 5)
    # Every class appears lpc * K / C times in the table: once per shard.
    counts = np.bincount(part.label_table.ravel(), minlength=num_classes)
    assert np.all(counts == 500 // num_classes)
    for i in range(100):
        tr, te = part.train[i], part.test[i]
        assert len(tr) == 500 and len(te) == 100
        row = part.label_table[i]
        assert 1 <= len(set(row)) <= 5  # a class can be drawn twice
        assert set(y_train[tr]) == set(y_test[te]) == set(row)
        for c in set(row):  # one train shard of 100 and one test shard of 20 per draw
            k = int(np.sum(row == c))
            assert np.sum(y_train[tr] == c) == 100 * k and np.sum(y_test[te] == c) == 20 * k
    # Each image belongs to exactly one client.
    assert np.array_equal(np.sort(np.concatenate(part.train)), np.arange(50000))
    assert np.array_equal(np.sort(np.concatenate(part.test)), np.arange(10000))


def test_partition_is_deterministic_per_seed() -> None:
    y = np.repeat(np.arange(10), 30)
    a, b = shard_partition(y, y, 20, 3, seed=7), shard_partition(y, y, 20, 3, seed=7)
    c = shard_partition(y, y, 20, 3, seed=8)
    np.testing.assert_array_equal(a.label_table, b.label_table)
    for x, z in zip(a.train + a.test, b.train + b.test, strict=True):
        np.testing.assert_array_equal(x, z)
    assert not np.array_equal(a.label_table, c.label_table)
    assert any(not np.array_equal(x, z) for x, z in zip(a.train, c.train, strict=True))


def test_partition_leftovers_go_to_the_first_shards() -> None:
    # Class 0 has 7 examples and 2 shards: 4 + 3; class 1 has 6: 3 + 3.
    y = np.array([0] * 7 + [1] * 6)
    part = shard_partition(y, y, num_clients=2, labels_per_client=2, seed=0)
    sizes = sorted(len(t) for t in part.train)
    assert sizes == [6, 7]
    assert np.array_equal(np.sort(np.concatenate(part.train)), np.arange(13))


def test_partition_round_trip_and_rundir(tmp_path: Path) -> None:
    y = np.array([0] * 7 + [1] * 6 + [2] * 5)
    part = shard_partition(y, y[::-1], num_clients=3, labels_per_client=2, seed=4)
    arrays = part.to_arrays()
    back = ShardPartition.from_arrays(arrays)
    np.testing.assert_array_equal(back.label_table, part.label_table)
    for x, z in zip(back.train + back.test, part.train + part.test, strict=True):
        np.testing.assert_array_equal(x, z)
    RunDir(tmp_path).write_partition(arrays)
    with np.load(tmp_path / "partition.npz") as f:
        assert set(f.files) == set(arrays)
        for k in arrays:
            np.testing.assert_array_equal(f[k], arrays[k])
    assert [p.name for p in tmp_path.iterdir()] == ["partition.npz"]  # no temp file left


# --------------------------------------------------------------------------- download




def _archive(www: Path, tmp: Path, extra_member: str | None = None) -> str:
    """A small cifar-10-python.tar.gz in the official layout; returns its md5."""
    src = tmp / "src"
    write_cifar10(src / "cifar-10-batches-py", seed=9)
    path = www / ARCHIVES["cifar10"].filename
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        if extra_member:
            info = tarfile.TarInfo(extra_member)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_checksum_ok_unpacks_and_loads(served, tmp_path: Path) -> None:
    url, www = served
    md5 = _archive(www, tmp_path)
    root = tmp_path / "data"
    folder = download_cifar(root, "cifar10", base_url=url, md5=md5, progress=False)
    assert folder == root / "cifar10" / "cifar-10-batches-py" and folder.is_dir()
    assert os.listdir(root / "cifar10") == ["cifar-10-batches-py"]  # no temp folder left
    data = load_cifar(root, "cifar10", num_clients=10, labels_per_client=2, download=False)
    assert data.num_clients == 10


def test_download_wrong_checksum_leaves_nothing(served, tmp_path: Path) -> None:
    url, www = served
    _archive(www, tmp_path)
    root = tmp_path / "data"
    with pytest.raises(DataError, match="md5") as info:
        download_cifar(root, "cifar10", base_url=url, md5="0" * 32, progress=False)
    assert str(root / "cifar10" / "cifar-10-batches-py") in str(info.value)
    assert not (root / "cifar10").exists()


def test_load_downloads_from_env_url_and_checks_official_md5(served, tmp_path: Path,
                                                             monkeypatch) -> None:
    url, www = served
    _archive(www, tmp_path)  # not the official archive, so the official md5 must reject it
    monkeypatch.setenv(URL_ENV, url)
    root = tmp_path / "data"
    (root / "cifar10").mkdir(parents=True)  # a folder the user made stays
    with pytest.raises(DataError, match=ARCHIVES["cifar10"].md5):
        load_cifar(root, "cifar10", num_clients=10, labels_per_client=2)
    assert os.listdir(root / "cifar10") == []


def test_download_refuses_members_outside_the_folder(served, tmp_path: Path) -> None:
    url, www = served
    md5 = _archive(www, tmp_path, extra_member="../evil.txt")
    root = tmp_path / "data"
    with pytest.raises(DataError, match="unexpected archive member"):
        download_cifar(root, "cifar10", base_url=url, md5=md5, progress=False)
    assert not (root / "cifar10").exists() and not (root / "evil.txt").exists()


def test_no_network_says_where_to_put_the_files(tmp_path: Path) -> None:
    # Port 1 on localhost is closed: the connection is refused at once.
    with pytest.raises(DataError) as info:
        download_cifar(tmp_path, "cifar100", base_url="http://127.0.0.1:1/", progress=False)
    msg = str(info.value)
    assert "download failed" in msg and "tar -xzf cifar-100-python.tar.gz" in msg
    assert str(tmp_path / "cifar100" / "cifar-100-python") in msg
    assert not (tmp_path / "cifar100").exists()


# --------------------------------------------------------------------------- tfds


def test_tfds_without_tensorflow_explains(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    with pytest.raises(DataError, match="1.4 GB") as info:
        load_cifar(tmp_path, "cifar10", num_clients=10, labels_per_client=2, source="tfds")
    assert "pickle" in str(info.value) and "TensorFlow" in str(info.value)


def test_tfds_source_through_a_stand_in_module(tmp_path: Path, monkeypatch) -> None:
    rng = np.random.default_rng(2)
    x_train, y_train = _fake_split(rng, 10, 4)
    x_test, y_test = _fake_split(rng, 10, 2)
    calls = {}

    def fake_load(name, split, batch_size, as_supervised, data_dir):
        calls.update(name=name, split=split, data_dir=data_dir)
        return [(x_train, y_train), (x_test, y_test)]

    tfds = types.ModuleType("tensorflow_datasets")
    tfds.load, tfds.as_numpy = fake_load, lambda tree: tree
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", tfds)
    monkeypatch.setitem(sys.modules, "tensorflow", types.ModuleType("tensorflow"))
    data = load_cifar(tmp_path, "cifar10", num_clients=10, labels_per_client=2, source="tfds")
    assert calls == {"name": "cifar10", "split": ["train", "test"],
                     "data_dir": str(tmp_path / "tfds")}
    part = ShardPartition.from_arrays(data.partition)
    np.testing.assert_allclose(data.train[0].x, normalize(x_train[part.train[0]], "cifar10"))


# --------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_real_cifar10_default_partition() -> None:
    root = os.environ.get("FEDEQ_DATA_DIR")
    if not root:
        pytest.skip("set FEDEQ_DATA_DIR to a folder holding cifar10/cifar-10-batches-py")
    data = load_cifar(root, "cifar10", num_clients=100, seed=100, download=False)
    assert data.num_clients == 100
    assert [c.n for c in data.train] == [500] * 100 and [c.n for c in data.test] == [100] * 100
    part = ShardPartition.from_arrays(data.partition)
    for i, (tr, te) in enumerate(zip(data.train, data.test, strict=True)):
        assert set(tr.y) == set(te.y) == set(part.label_table[i])
        assert tr.x.shape == (500, 32, 32, 3) and tr.x.dtype == np.float32
    x = np.concatenate([c.x for c in data.train])  # all 50,000 training images
    np.testing.assert_allclose(x.mean(axis=(0, 1, 2), dtype=np.float64), 0.0, atol=2e-3)
    np.testing.assert_allclose(x.std(axis=(0, 1, 2), dtype=np.float64), 1.0, atol=2e-3)
    for i in range(3):
        print(f"client {i}: {data.train[i].n} train / {data.test[i].n} test, "
              f"label table {part.label_table[i].tolist()}, "
              f"train labels {sorted(set(data.train[i].y.tolist()))}")
