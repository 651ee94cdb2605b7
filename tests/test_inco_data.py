"""InCo Aggregation's data: partition files, drawn partitions, readers, loader, augmentation.

Which examples each client holds decides what every InCo experiment trains on (spec 3.3),
and the authors' partition files are pickles, so the restricted reader is pinned on files
the tests write, including hostile ones. The readers run on tiny files in the official
formats written here; the real partition files (in the project's shared folder, not in
the repository) are checked by a slow test.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data import inco
from data.augment import make_augmentation
from data.cinic import CINIC_CLASSES, read_cinic_split
from data.errors import DataError
from data.fmnist import read_fmnist, read_idx, to_inco_fmnist
from data.inco import inco_augmentation, inco_stats, load_inco_data
from data.inco_partition import (
    check_partition,
    dirichlet_partition,
    homo_partition,
    read_partition_file,
    read_partition_json,
    read_partition_npy,
)
from data.registry import DATASETS, PARTITIONS, load_dataset
from data.svhn import read_svhn_mat

# ------------------------------------------------------------------ partition file helpers


def _npy_with_payload(path: Path, payload: bytes) -> Path:
    """A .npy header for one pickled object (shape (), dtype object) + any pickle bytes."""
    with open(path, "wb") as f:
        header = np.lib.format.header_data_from_array_1_0(np.empty((), dtype=object))
        np.lib.format.write_array_header_1_0(f, header)
        f.write(payload)
    return path


def _authors_style_npy(path: Path, clients: dict) -> Path:
    """Like the authors' files: protocol 3, numpy 1's ``numpy.core`` module names."""
    array = np.empty((), dtype=object)
    array[()] = clients
    payload = pickle.dumps(array, protocol=3)
    # Protocol 3 names globals as newline-terminated text, so the module can be renamed.
    payload = payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    return _npy_with_payload(path, payload)


SMALL = {0: [4, 0, 7], 1: [1, 5], 2: [2, 3, 6, 8, 9]}


class _Evil:
    """Unpickling this runs ``touch <marker>`` through os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_npy_reader_matches_json_copy(tmp_path: Path) -> None:
    np_path = tmp_path / "p.npy"
    np.save(np_path, SMALL, allow_pickle=True)  # numpy 2's own format
    js = tmp_path / "p.json"
    js.write_text(json.dumps({"description": "x", "clients": {str(k): v for k, v in
                                                              SMALL.items()}}))
    assert read_partition_npy(np_path) == SMALL
    assert read_partition_npy(_authors_style_npy(tmp_path / "a.npy", SMALL)) == SMALL
    assert read_partition_json(js) == SMALL
    assert read_partition_file(js) == read_partition_file(np_path) == SMALL


@pytest.mark.parametrize("where", ["inside", "outside"])
def test_npy_reader_refuses_code(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.npy"
    if where == "inside":  # a well-formed object array whose dict holds the payload
        np.save(path, {0: [_Evil(marker)]}, allow_pickle=True)
    else:  # the whole pickle is the payload
        _npy_with_payload(path, pickle.dumps(_Evil(marker), protocol=3))
    with pytest.raises(DataError, match="refusing to load .*system"):
        read_partition_npy(path)
    assert not marker.exists()


@pytest.mark.parametrize("payload, found", [
    ({0: [1.5]}, "float"), ({0: "abc"}, "str"), ([[1, 2]], "list"), ({"0": [1]}, "key"),
    ({0: [True]}, "bool"), ({0: (1, 2)}, "tuple"),
])
def test_npy_reader_refuses_non_index_lists(tmp_path: Path, payload, found: str) -> None:
    path = tmp_path / "p.npy"
    array = np.empty((), dtype=object)
    array[()] = payload  # a 0-d object array even for a list
    np.save(path, array, allow_pickle=True)
    with pytest.raises(DataError, match=found):
        read_partition_npy(path)


def test_npy_reader_refuses_malformed_files(tmp_path: Path) -> None:
    good = _authors_style_npy(tmp_path / "good.npy", SMALL).read_bytes()
    cases = {
        "truncated.npy": good[: len(good) - 10],
        "header_only.npy": good[:128],
        "garbage.npy": b"not a numpy file at all",
        "int_array.npy": None,
        "pickle_of_int.npy": None,
    }
    for name, blob in cases.items():
        path = tmp_path / name
        if name == "int_array.npy":
            np.save(path, np.arange(3))
        elif name == "pickle_of_int.npy":
            _npy_with_payload(path, pickle.dumps(3))
        else:
            path.write_bytes(blob)
        with pytest.raises(DataError) as e:
            read_partition_npy(path)
        assert str(path) in str(e.value) and "partition_file" in str(e.value), name
    with pytest.raises(DataError, match="no such file"):
        read_partition_npy(tmp_path / "missing.npy")


def test_json_reader_refuses_malformed_files(tmp_path: Path) -> None:
    for name, text in {"a.json": "{", "b.json": '{"nope": 1}', "c.json": '{"clients": [1]}',
                       "d.json": '{"clients": {"x": [1]}}',
                       "e.json": '{"clients": {"0": [1.0]}}'}.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError):
            read_partition_json(tmp_path / name)


def test_check_partition_accepts_exact_partitions_in_client_order() -> None:
    parts = check_partition(SMALL, num_clients=3, n_train=10, path="p")
    assert [p.tolist() for p in parts] == [SMALL[0], SMALL[1], SMALL[2]]
    # A disjoint subset passes only when told (FMNIST on the CIFAR-10 file).
    check_partition({0: [0, 1], 1: [2]}, 2, n_train=5, path="p", exact=False)


@pytest.mark.parametrize("clients, num_clients, found", [
    ({0: [0, 1], 1: [1, 2]}, 2, "repeated"),                 # duplicate
    ({0: [0, 1], 1: [2]}, 2, "in no client"),                # missing index 3
    ({0: [0, 1], 1: [2, 3]}, 3, "2 clients"),                # wrong client count
    ({0: [0, 1], 2: [2, 3]}, 2, "gaps"),                     # keys not 0..N-1
    ({0: [0, 1, 2, 3], 1: []}, 2, "empty"),
    ({0: [0, 1, 2], 1: [3, 4]}, 2, r"\[3, 4\]"),             # out of range
])
def test_check_partition_refuses_non_partitions(clients, num_clients, found) -> None:
    with pytest.raises(DataError, match=found):
        check_partition(clients, num_clients, n_train=4, path="p")


# --------------------------------------------------------------------- drawn partitions


def _labels(per_class: int = 200, classes: int = 10) -> np.ndarray:
    return np.random.RandomState(1).permutation(np.repeat(np.arange(classes), per_class))


def test_dirichlet_partition_covers_each_index_once_deterministically() -> None:
    y = _labels()
    parts = dirichlet_partition(y, num_clients=20, alpha=0.5, seed=3)
    flat = np.concatenate(parts)
    assert len(parts) == 20 and sorted(flat.tolist()) == list(range(len(y)))
    assert min(len(p) for p in parts) >= 10
    again = dirichlet_partition(y, num_clients=20, alpha=0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = dirichlet_partition(y, num_clients=20, alpha=0.5, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    # The label skew is real: some client is dominated by one class.
    top = [np.bincount(y[p], minlength=10).max() / len(p) for p in parts]
    assert max(top) > 0.5


def test_dirichlet_partition_retries_until_min_size() -> None:
    # alpha 0.3 with 20 clients on 300 examples: the first draw leaves a client below 10.
    y = _labels(per_class=30)
    with pytest.raises(ValueError, match="after 1 tries"):
        dirichlet_partition(y, num_clients=20, alpha=0.3, seed=0, max_tries=1)
    parts = dirichlet_partition(y, num_clients=20, alpha=0.3, seed=0)
    assert min(len(p) for p in parts) >= 10
    assert sorted(np.concatenate(parts).tolist()) == list(range(300))
    with pytest.raises(ValueError, match="at least 10"):
        dirichlet_partition(y, num_clients=31, alpha=0.5, seed=0)


def test_homo_partition_is_a_seeded_near_equal_split() -> None:
    parts = homo_partition(103, num_clients=10, seed=5)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 103
    assert sorted(np.concatenate(parts).tolist()) == list(range(103))
    assert all(np.array_equal(a, b) for a, b in
               zip(parts, homo_partition(103, 10, seed=5), strict=True))
    assert not np.array_equal(parts[0], homo_partition(103, 10, seed=6)[0])


# ------------------------------------------------------------------------- augmentation


def _structured(b: int = 6, c: int = 3) -> jax.Array:
    """Every pixel distinct and nonzero, so moved pixels can be traced."""
    idx = np.arange(b * 32 * 32 * c, dtype=np.float32).reshape(b, 32, 32, c)
    return jnp.asarray(idx + 1.0)


MEAN, STD = (0.5, 0.25, 0.125), (0.5, 0.5, 0.25)
PAD = -np.asarray(MEAN, np.float32) / np.asarray(STD, np.float32)


def _candidates(img: np.ndarray) -> list[np.ndarray]:
    padded = np.broadcast_to(PAD, (40, 40, 3)).copy()
    padded[4:36, 4:36] = img
    crops = [padded[r:r + 32, q:q + 32] for r in range(9) for q in range(9)]
    return crops + [c[:, ::-1] for c in crops]


def test_augmentation_is_deterministic_per_key_and_keeps_shapes() -> None:
    x = _structured()
    for name in ("cifar", "svhn", "cinic"):
        aug = jax.jit(make_augmentation(name, MEAN, STD))
        a = aug(jax.random.PRNGKey(0), x)
        assert a.shape == x.shape and a.dtype == x.dtype
        assert np.array_equal(a, aug(jax.random.PRNGKey(0), x))
        assert not np.array_equal(a, aug(jax.random.PRNGKey(1), x))
        assert np.array_equal(a, make_augmentation(name, MEAN, STD)(jax.random.PRNGKey(0), x))
    none = make_augmentation("none", MEAN, STD)
    assert np.array_equal(none(jax.random.PRNGKey(0), x), x)
    with pytest.raises(ValueError):
        make_augmentation("autoaugment", MEAN, STD)


def test_crop_and_flip_only_move_pixels() -> None:
    x = np.asarray(_structured())
    out = np.asarray(make_augmentation("cinic", MEAN, STD)(jax.random.PRNGKey(2), x))
    moved = 0
    for img, res in zip(x, out, strict=True):
        matches = [i for i, c in enumerate(_candidates(img)) if np.array_equal(c, res)]
        assert matches, "the output is not a padded crop (or its mirror) of the input"
        moved += matches[0] != 40  # index 40: offset (4, 4), unflipped = the identity
    assert moved > 0


def test_cutout_zeroes_one_clipped_square_on_all_channels() -> None:
    x = np.asarray(_structured(b=32))
    out = np.asarray(make_augmentation("svhn", MEAN, STD)(jax.random.PRNGKey(3), x))
    clipped = 0
    for img, res in zip(x, out, strict=True):
        changed = res != img
        assert np.all(res[changed] == 0)
        hole = changed.any(-1)
        assert np.array_equal(changed, np.repeat(hole[..., None], 3, -1))  # all channels
        rows, cols = np.flatnonzero(hole.any(1)), np.flatnonzero(hole.any(0))
        assert 1 <= len(rows) <= 16 and 1 <= len(cols) <= 16
        assert hole.sum() == len(rows) * len(cols)  # one rectangle
        assert np.array_equal(rows, np.arange(rows[0], rows[-1] + 1))
        clipped += len(rows) < 16 or len(cols) < 16
    assert clipped > 0  # centres near a border are clipped, not moved inwards


def test_cifar_augmentation_keeps_input_pad_or_zero_values() -> None:
    x = np.asarray(_structured())
    out = np.asarray(make_augmentation("cifar", MEAN, STD)(jax.random.PRNGKey(4), x))
    for ch in range(3):
        allowed = set(x[..., ch].ravel().tolist()) | {float(PAD[ch]), 0.0}
        assert set(out[..., ch].ravel().tolist()) <= allowed


# ---------------------------------------------------------------------- dataset readers


def _idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    blob = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(blob, mtime=0) if compress else blob)


def write_fmnist(folder: Path, n_train: int = 120, n_test: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = np.arange(n) % 10
        _idx(folder / f"{prefix}-images-idx3-ubyte.gz", x)
        _idx(folder / f"{prefix}-labels-idx1-ubyte.gz", y)
        out[prefix] = (x, y)
    return out


def test_fmnist_reader_and_resize(tmp_path: Path) -> None:
    folder = tmp_path / "fmnist"
    ref = write_fmnist(folder)
    x_train, y_train, x_test, y_test = read_fmnist(folder)
    assert np.array_equal(x_train, ref["train"][0]) and np.array_equal(y_train, ref["train"][1])
    assert np.array_equal(x_test, ref["t10k"][0]) and y_test.dtype == np.int64
    # An unpacked copy (no .gz) is read too.
    _idx(folder / "extra-idx1-ubyte", np.arange(5), compress=False)
    assert read_idx(folder / "extra-idx1-ubyte.gz").tolist() == [0, 1, 2, 3, 4]
    big = to_inco_fmnist(x_test)
    assert big.shape == (20, 32, 32, 1) and big.dtype == np.float32
    assert 0.0 <= big.min() and big.max() <= 1.0
    assert np.allclose(to_inco_fmnist(np.full((1, 28, 28), 51, np.uint8)), 0.2)
    from PIL import Image  # Pillow's float bilinear resize is the same interpolation

    pil = np.asarray(Image.fromarray(x_test[0].astype(np.float32) / 255, mode="F")
                     .resize((32, 32), Image.BILINEAR))
    assert np.allclose(big[0, ..., 0], pil, atol=1e-6)


def test_fmnist_reader_refuses_malformed_files(tmp_path: Path) -> None:
    folder = tmp_path / "fmnist"
    write_fmnist(folder)
    path = folder / "train-images-idx3-ubyte.gz"
    blob = gzip.decompress(path.read_bytes())
    for bad, found in ((blob[:-7], "truncated"), (b"\x00\x00\x0d\x03" + blob[4:], "magic"),
                       (blob[:6], "header")):
        path.write_bytes(gzip.compress(bad))
        with pytest.raises(DataError, match=found):
            read_fmnist(folder)
    path.write_bytes(gzip.compress(blob)[:-20])  # a cut gzip stream
    with pytest.raises(DataError, match="gzip"):
        read_fmnist(folder)
    path.unlink()
    with pytest.raises(DataError, match="no such file"):
        read_fmnist(folder)


def write_svhn(folder: Path, n_train: int = 120, n_test: int = 20) -> dict[str, np.ndarray]:
    from scipy.io import savemat

    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 1..10, 10 = digit 0
        savemat(folder / f"{name}_32x32.mat", {"X": x, "y": y}, do_compression=name == "train")
        out[name] = (np.transpose(x, (3, 0, 1, 2)), y.reshape(-1) % 10)
    return out


def test_svhn_reader(tmp_path: Path) -> None:
    ref = write_svhn(tmp_path / "svhn")
    for name in ("train", "test"):  # zlib-compressed and plain MAT v5
        x, y = read_svhn_mat(tmp_path / "svhn" / f"{name}_32x32.mat")
        assert x.shape == (len(y), 32, 32, 3) and x.flags.c_contiguous
        assert np.array_equal(x, ref[name][0]) and np.array_equal(y, ref[name][1])
        assert 0 in y and y.max() == 9


def test_svhn_reader_refuses_malformed_files(tmp_path: Path) -> None:
    from scipy.io import savemat

    ref = write_svhn(tmp_path / "svhn", n_train=12, n_test=12)
    del ref
    for name in ("train", "test"):
        path = tmp_path / "svhn" / f"{name}_32x32.mat"
        blob = path.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
        with pytest.raises(DataError, match="unreadable|no X or y"):
            read_svhn_mat(path)
    path = tmp_path / "bad.mat"
    path.write_bytes(b"MATLAB 5.0 MAT-file" + b"\x00" * 30)
    with pytest.raises(DataError):
        read_svhn_mat(path)
    savemat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8)})
    with pytest.raises(DataError, match="no y"):
        read_svhn_mat(path)
    savemat(path, {"X": np.zeros((28, 28, 2), np.uint8), "y": np.ones((2, 1))})
    with pytest.raises(DataError, match="32 x 32 x 3 x N"):
        read_svhn_mat(path)
    savemat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1], [11]])})
    with pytest.raises(DataError, match="1..10"):
        read_svhn_mat(path)


def write_cinic(folder: Path, per_class: int = 2, seed: int = 2) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for cls in CINIC_CLASSES:
            d = folder / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"n{seed}_{per_class - i:03d}.png")
            (d / "notes.txt").write_text("not an image")  # skipped, as ImageFolder does


def test_cinic_reader_uses_imagefolder_order(tmp_path: Path) -> None:
    from PIL import Image

    write_cinic(tmp_path / "cinic10")
    grey = np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)
    Image.fromarray(grey, mode="L").save(tmp_path / "cinic10" / "train" / "cat" / "a.png")
    x, y = read_cinic_split(tmp_path / "cinic10" / "train", workers=2)
    assert x.shape == (21, 32, 32, 3) and x.dtype == np.uint8
    assert y.tolist() == sorted([k for k in range(10) for _ in range(2)] + [3])
    first_cat = int(np.flatnonzero(y == 3)[0])
    assert np.array_equal(x[first_cat], np.repeat(grey[..., None], 3, -1))  # sorted first
    ref = np.asarray(Image.open(tmp_path / "cinic10/train/airplane/n2_001.png"))
    assert np.array_equal(x[0], ref)  # n2_001 sorts before n2_002


def test_cinic_reader_refuses_malformed_folders(tmp_path: Path) -> None:
    from PIL import Image

    write_cinic(tmp_path / "cinic10")
    split = tmp_path / "cinic10" / "train"
    png = split / "dog" / "n2_001.png"
    png.write_bytes(png.read_bytes()[:40])
    with pytest.raises(DataError, match="PNG"):
        read_cinic_split(split)
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(png)
    with pytest.raises(DataError, match="32 x 32"):
        read_cinic_split(split)
    for f in (split / "frog").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="empty"):
        read_cinic_split(split)
    (split / "frog").rmdir()
    with pytest.raises(DataError, match="class folders"):
        read_cinic_split(split)
    with pytest.raises(DataError, match="no such folder"):
        read_cinic_split(tmp_path / "cinic10" / "valid")


# ------------------------------------------------------------------------------ loader


def write_cifar10(folder: Path, per_class: int = 12) -> np.ndarray:
    """The official pickle layout, tiny; returns the training labels in file order."""
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True, exist_ok=True)
    y_all = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        y = rng.permutation(np.repeat(np.arange(10), per_class // 4 if name[0] == "d" else 1))
        x = rng.integers(0, 256, (len(y), 3072), dtype=np.uint8)
        (folder / name).write_bytes(pickle.dumps({b"data": x, b"labels": y.tolist()}, 2))
        y_all.append(y)
    return np.concatenate(y_all[:5])


def test_load_fixed_partition_cifar10(tmp_path: Path) -> None:
    y = write_cifar10(tmp_path / "cifar10" / "cifar-10-batches-py")
    n = len(y)
    clients = {k: list(range(k, n, 3)) for k in range(3)}
    part = tmp_path / "p.json"
    part.write_text(json.dumps({"clients": {str(k): v for k, v in clients.items()}}))
    data = load_dataset("cifar10", str(tmp_path), 3, 0.0, 0, partition="hetero-fixed",
                        partition_file=str(part))
    assert data.num_clients == 3 and data.global_test is not None
    assert data.global_test.n == 10 and data.global_test.x.shape == (10, 32, 32, 3)
    assert [c.y.tolist() for c in data.train] == [y[v].tolist() for v in clients.values()]
    assert all(t is c for t, c in zip(data.test, data.train, strict=True))
    off = data.partition["train_offsets"]
    assert data.partition["train_indices"][off[1]:off[2]].tolist() == clients[1]
    assert str(data.partition["method"]) == "hetero-fixed"
    # Spec 3.2's CIFAR-10 normalisation, not data.cifar's 4-decimal one.
    raw = pickle.loads((tmp_path / "cifar10/cifar-10-batches-py/test_batch").read_bytes())
    pix = raw[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)[0, 0]
    want = (pix / 255 - np.asarray(inco.INCO_CIFAR10_MEAN)) / np.asarray(inco.INCO_CIFAR10_STD)
    assert np.allclose(data.global_test.x[0, 0, 0], want, atol=1e-5)
    # The wrong client count, and a missing --partition_file, are data errors.
    with pytest.raises(DataError, match="3 clients"):
        load_dataset("cifar10", str(tmp_path), 4, 0.0, 0, partition="hetero-fixed",
                     partition_file=str(part))
    with pytest.raises(DataError, match="hetero-fix-100-0.5.npy"):
        load_dataset("cifar10", str(tmp_path), 3, 0.0, 0, partition="hetero-fixed")
    with pytest.raises(ValueError, match="only read with"):
        load_dataset("cifar10", str(tmp_path), 3, 0.0, 0, partition="homo",
                     partition_file=str(part))


def test_load_fmnist_and_svhn_with_drawn_partitions(tmp_path: Path) -> None:
    write_fmnist(tmp_path / "fmnist")
    write_svhn(tmp_path / "svhn")
    fm = load_inco_data("fmnist", tmp_path, 4, "homo", 0.5, None, seed=1)
    assert fm.input_shape == (32, 32, 1) and fm.global_test.x.shape == (20, 32, 32, 1)
    assert sorted(c.n for c in fm.train) == [30, 30, 30, 30]
    sv = load_inco_data("svhn", tmp_path, 4, "hetero", 0.5, None, seed=1, frac_unseen=0.25)
    assert sv.num_clients == 3 and len(sv.unseen_train) == 1
    assert sum(c.n for c in sv.train + sv.unseen_train) == 120
    assert min(c.n for c in sv.train + sv.unseen_train) >= 10
    assert np.allclose(sv.global_test.x.min(), -1.0) and sv.global_test.x.max() <= 1.0
    mean, std = inco_stats("svhn")
    assert mean == (0.5,) * 3 and inco_augmentation("svhn") == "svhn"
    again = load_inco_data("svhn", tmp_path, 4, "hetero", 0.5, None, seed=1)
    assert np.array_equal(again.partition["train_indices"], sv.partition["train_indices"])


def test_load_cinic10_fixed_partition(tmp_path: Path) -> None:
    write_cinic(tmp_path / "cinic10", per_class=1)
    part = tmp_path / "p.npy"
    np.save(part, {0: [9, 1, 2, 3, 4], 1: [5, 6, 7, 8, 0]}, allow_pickle=True)
    data = load_dataset("cinic10", str(tmp_path), 2, 0.0, 0, partition="hetero-fixed",
                        partition_file=str(part))
    assert data.train[0].y.tolist() == [9, 1, 2, 3, 4] and data.global_test.n == 10


def test_registry_routes_partitions() -> None:
    assert {"fmnist", "svhn", "cinic10", "cifar10", "cifar100"} <= set(DATASETS)
    assert PARTITIONS == ("shards", "hetero-fixed", "hetero", "homo", "dac-iid", "dac-shards")
    with pytest.raises(ValueError, match="does not support"):
        load_dataset("fmnist", "/nonexistent", 4, 0.0, 0)
    with pytest.raises(ValueError, match="does not support"):
        load_dataset("synthetic", None, 4, 0.0, 0, partition="hetero")
    with pytest.raises(ValueError, match="does not support"):
        load_dataset("cifar100", "/nonexistent", 4, 0.0, 0, partition="homo")
    with pytest.raises(ValueError, match="unknown partition"):
        load_dataset("cifar10", "/nonexistent", 4, 0.0, 0, partition="dirichlet")
    with pytest.raises(DataError, match="--data_dir"):
        load_dataset("svhn", None, 4, 0.0, 0, partition="homo")


# ---------------------------------------------------------------------------- downloads




def test_fmnist_download_checks_md5(tmp_path: Path, served, monkeypatch) -> None:
    url, www = served
    write_fmnist(www)
    sums = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(www.iterdir())}
    last = list(sums)[-1]  # fetched last, after the other three
    monkeypatch.setattr(inco, "FMNIST_FILES", {**sums, last: "0" * 32})
    monkeypatch.setenv("FEDEQ_FMNIST_URL", url)
    root = tmp_path / "root"
    with pytest.raises(DataError, match="md5"):
        load_inco_data("fmnist", root, 2, "homo", 0.5, None, 0)
    # The corrupt one was not kept, and no temporary file is left.
    assert sorted(p.name for p in (root / "fmnist").iterdir()) == list(sums)[:-1]
    monkeypatch.setattr(inco, "FMNIST_FILES", sums)
    assert load_inco_data("fmnist", root, 2, "homo", 0.5, None, 0).global_test.n == 20


def test_download_failure_is_a_quick_data_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FEDEQ_SVHN_URL", "http://127.0.0.1:9/")  # nothing listens there
    with pytest.raises(DataError, match="download failed") as e:
        load_inco_data("svhn", tmp_path, 2, "homo", 0.5, None, 0)
    assert "ufldl" in str(e.value)  # how to get the files by hand
    assert not any((tmp_path / "svhn").iterdir())  # no partial download left
    with pytest.raises(DataError, match="CINIC-10.tar.gz"):
        load_inco_data("cinic10", tmp_path, 2, "homo", 0.5, None, 0)


# ------------------------------------------------------------------------ the real files


@pytest.mark.slow
def test_real_partition_files_match_their_json_copies() -> None:
    folder = Path(os.environ.get("FEDEQ_INCO_DIR", Path(__file__).parents[2] / "shared" /
                                 "data" / "inco"))
    if not folder.is_dir():
        pytest.skip("set FEDEQ_INCO_DIR to the folder holding cifar10_hetero-fix-100-*.npy")
    for alpha, (lo, hi) in (("0.5", (163, 889)), ("1.0", (144, 1006))):
        npy = read_partition_npy(folder / f"cifar10_hetero-fix-100-{alpha}.npy")
        js = read_partition_json(folder / f"cifar10_hetero_fixed_alpha{alpha}_100clients.json")
        assert list(npy) == list(range(100)) and npy == js  # element for element, in order
        sizes = [len(p) for p in check_partition(npy, 100, 50_000, "p")]
        assert (min(sizes), max(sizes)) == (lo, hi)
