"""Data loaders: the client order, the unseen split and the error messages are contracts.

Which writers become clients, and which of them are held out, decides what every
experiment trains on (spec sections 2.1 and 6.2), so they are pinned here on small LEAF
files the tests write. Error messages are tested because a user's only guide to fixing a
data problem is the message.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from data.errors import DataError
from data.federated import ClientSplit, FederatedData, hold_out_unseen
from data.leaf import load_femnist
from data.registry import DATASETS, load_dataset
from data.synthetic import make_synthetic

PIXELS = 784


def _writer(n: int, label: int) -> dict:
    """n samples whose pixels encode the label, so we can tell writers apart after loading."""
    x = np.full((n, PIXELS), label / 100.0)
    x[:, 0] = np.arange(n) / 100.0
    return {"x": x.tolist(), "y": [label] * n}


def _leaf_file(path: Path, writers: dict[str, dict]) -> None:
    blob = {
        "users": list(writers),
        "num_samples": [len(w["y"]) for w in writers.values()],
        "user_data": writers,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(blob))


@pytest.fixture
def leaf_root(tmp_path: Path) -> Path:
    """Two train files and one test file, users out of order across and within files.

    Writer 'w3' has no test data and 'w9' no train data: neither may become a client.
    """
    femnist = tmp_path / "femnist"
    _leaf_file(femnist / "train" / "b.json", {"w4": _writer(4, 4), "w1": _writer(2, 1),
                                               "w3": _writer(3, 3)})
    _leaf_file(femnist / "train" / "a.json", {"w5": _writer(5, 5), "w2": _writer(6, 2),
                                               "w0": _writer(1, 0)})
    _leaf_file(femnist / "test" / "t.json", {"w2": _writer(2, 2), "w9": _writer(1, 9),
                                              "w0": _writer(1, 0), "w5": _writer(3, 5),
                                              "w4": _writer(2, 4), "w1": _writer(1, 1)})
    return tmp_path


# --------------------------------------------------------------------------- LEAF reader


def test_leaf_sorted_order_first_clients_and_unseen(leaf_root: Path) -> None:
    data = load_femnist(str(leaf_root), num_clients=4, frac_unseen=0.5)
    assert isinstance(data, FederatedData)
    # Eligible writers sorted: w0 w1 w2 w4 w5; first 4 taken; the last int(0.5*4)=2 unseen.
    assert data.client_ids == ["w0", "w1"]
    assert data.unseen_ids == ["w2", "w4"]
    assert data.num_clients == 2
    assert data.name == "femnist" and data.num_classes == 62
    assert data.input_shape == (28, 28, 1) and data.task == "classification"
    assert list(data.train_sizes()) == [1, 2]
    assert [c.n for c in data.test] == [1, 1]
    assert [c.n for c in data.unseen_train] == [6, 4]
    assert [c.n for c in data.unseen_test] == [2, 2]
    for split, label in zip(data.train + data.unseen_train, [0, 1, 2, 4], strict=True):
        assert split.x.dtype == np.float32 and split.y.dtype == np.int32
        assert split.x.shape == (split.n, 28, 28, 1)
        assert np.all(split.y == label)
        np.testing.assert_allclose(split.x[:, 0, 1, 0], label / 100.0, rtol=1e-6)
        # Row order within a writer is preserved.
        np.testing.assert_allclose(split.x[:, 0, 0, 0], np.arange(split.n) / 100.0, atol=1e-7)
        assert 0.0 <= split.x.min() and split.x.max() <= 1.0


def test_leaf_all_seen_and_summary(leaf_root: Path) -> None:
    data = load_femnist(str(leaf_root), num_clients=5)
    assert data.client_ids == ["w0", "w1", "w2", "w4", "w5"]
    assert data.unseen_ids == [] and data.unseen_train == [] and data.unseen_test == []
    text = data.summary()
    assert "5 clients" in text and "18 train" in text and "62 classes" in text


def test_leaf_through_registry(leaf_root: Path) -> None:
    data = load_dataset("femnist", str(leaf_root), num_clients=3, frac_unseen=0.34, seed=7)
    assert data.client_ids == ["w0", "w1"] and data.unseen_ids == ["w2"]


# --------------------------------------------------------------------------- DataError


def test_missing_folder_names_path_and_how_to_get(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_femnist(str(tmp_path / "nowhere"), num_clients=1)
    msg = str(info.value)
    assert str(tmp_path / "nowhere" / "femnist" / "train") in msg
    assert "preprocess.sh -s niid --sf 0.05 -k 0 -t sample" in msg
    assert "--data_dir" in msg


def test_folder_without_json_files(tmp_path: Path) -> None:
    (tmp_path / "femnist" / "train").mkdir(parents=True)
    (tmp_path / "femnist" / "train" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="no .json files") as info:
        load_femnist(str(tmp_path), num_clients=1)
    assert str(tmp_path / "femnist" / "train") in str(info.value)


def test_missing_test_folder(leaf_root: Path) -> None:
    for f in (leaf_root / "femnist" / "test").iterdir():
        f.unlink()
    (leaf_root / "femnist" / "test").rmdir()
    with pytest.raises(DataError) as info:
        load_femnist(str(leaf_root), num_clients=1)
    assert str(leaf_root / "femnist" / "test") in str(info.value)


def test_malformed_json_names_file(leaf_root: Path) -> None:
    bad = leaf_root / "femnist" / "train" / "c.json"
    bad.write_text('{"users": ["w7"], "num_samples": [1], "user_data": {')
    with pytest.raises(DataError, match="invalid JSON") as info:
        load_femnist(str(leaf_root), num_clients=1)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("missing", ["users", "num_samples", "user_data"])
def test_missing_top_level_key_names_file_and_key(leaf_root: Path, missing: str) -> None:
    bad = leaf_root / "femnist" / "test" / "t.json"
    blob = json.loads(bad.read_text())
    del blob[missing]
    bad.write_text(json.dumps(blob))
    with pytest.raises(DataError) as info:
        load_femnist(str(leaf_root), num_clients=1)
    assert str(bad) in str(info.value) and repr(missing) in str(info.value)


def test_missing_user_key_names_file_user_and_key(leaf_root: Path) -> None:
    bad = leaf_root / "femnist" / "train" / "a.json"
    blob = json.loads(bad.read_text())
    del blob["user_data"]["w2"]["y"]
    bad.write_text(json.dumps(blob))
    with pytest.raises(DataError) as info:
        load_femnist(str(leaf_root), num_clients=1)
    msg = str(info.value)
    assert str(bad) in msg and "'w2'" in msg and "'y'" in msg


def test_bad_row_length_names_file_and_row(leaf_root: Path) -> None:
    bad = leaf_root / "femnist" / "train" / "a.json"
    blob = json.loads(bad.read_text())
    blob["user_data"]["w2"]["x"][3] = blob["user_data"]["w2"]["x"][3][:-1]
    bad.write_text(json.dumps(blob))
    with pytest.raises(DataError, match="784") as info:
        load_femnist(str(leaf_root), num_clients=1)
    msg = str(info.value)
    assert str(bad) in msg and "row 3 of length 783" in msg


def test_uniformly_wrong_row_length(tmp_path: Path) -> None:
    _leaf_file(tmp_path / "femnist" / "train" / "a.json", {"w0": {"x": [[0.5] * 100],
                                                                  "y": [1]}})
    _leaf_file(tmp_path / "femnist" / "test" / "a.json", {"w0": _writer(1, 1)})
    with pytest.raises(DataError, match="row 0 of length 100"):
        load_femnist(str(tmp_path), num_clients=1)


def test_pixels_out_of_range_rejected(tmp_path: Path) -> None:
    # 0..255 pixels would silently train on a different input scale.
    _leaf_file(tmp_path / "femnist" / "train" / "a.json",
               {"w0": {"x": [[255.0] * PIXELS], "y": [1]}})
    _leaf_file(tmp_path / "femnist" / "test" / "a.json", {"w0": _writer(1, 1)})
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        load_femnist(str(tmp_path), num_clients=1)


def test_num_samples_mismatch_rejected(leaf_root: Path) -> None:
    bad = leaf_root / "femnist" / "test" / "t.json"
    blob = json.loads(bad.read_text())
    blob["num_samples"][0] += 1
    bad.write_text(json.dumps(blob))
    with pytest.raises(DataError, match="num_samples") as info:
        load_femnist(str(leaf_root), num_clients=1)
    assert str(bad) in str(info.value)


def test_writer_in_two_files_of_a_split_rejected(leaf_root: Path) -> None:
    _leaf_file(leaf_root / "femnist" / "train" / "c.json", {"w0": _writer(1, 0)})
    with pytest.raises(DataError, match="'w0'"):
        load_femnist(str(leaf_root), num_clients=1)


def test_too_few_writers_says_how_many(leaf_root: Path) -> None:
    with pytest.raises(DataError) as info:
        load_femnist(str(leaf_root), num_clients=6)
    msg = str(info.value)
    assert str(leaf_root / "femnist") in msg
    assert "at least 6 writers" in msg and "only 5" in msg


def test_femnist_without_data_dir() -> None:
    with pytest.raises(DataError, match="--data_dir"):
        load_dataset("femnist", None, num_clients=1, frac_unseen=0.0, seed=0)


def test_data_error_is_picklable() -> None:
    err = DataError("/some/path", "a thing", "get it somewhere", "nothing")
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.path == "/some/path"
    assert "/some/path" in str(err) and "a thing" in str(err) and "get it somewhere" in str(err)


def test_bad_arguments_fail_before_reading(tmp_path: Path) -> None:
    # The folder does not exist: a ValueError shows the arguments were checked first.
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        load_femnist(str(tmp_path), num_clients=3, frac_unseen=1.0)
    with pytest.raises(ValueError, match="positive"):
        load_femnist(str(tmp_path), num_clients=0)


# --------------------------------------------------------------------------- synthetic


def _all_arrays(data: FederatedData) -> list[np.ndarray]:
    splits = data.train + data.test + data.unseen_train + data.unseen_test
    return [a for s in splits for a in (s.x, s.y)]


def test_synthetic_deterministic_given_seed() -> None:
    a = make_synthetic(num_clients=8, seed=3)
    b = make_synthetic(num_clients=8, seed=3)
    assert a.client_ids == b.client_ids
    for u, v in zip(_all_arrays(a), _all_arrays(b), strict=True):
        np.testing.assert_array_equal(u, v)
    c = make_synthetic(num_clients=8, seed=4)
    assert any(
        u.shape != v.shape or not np.array_equal(u, v)
        for u, v in zip(_all_arrays(a), _all_arrays(c), strict=True)
    )


def test_synthetic_shapes_dtypes_and_defaults() -> None:
    data = make_synthetic()
    assert data.name == "synthetic" and data.num_clients == 30
    assert data.num_classes == 10 and data.input_shape == (60,)
    for tr, te in zip(data.train, data.test, strict=True):
        assert tr.x.dtype == np.float32 and tr.y.dtype == np.int32
        assert tr.x.shape == (tr.n, 60) and te.x.shape == (te.n, 60)
        assert 50 <= tr.n + te.n <= 200
        assert te.n == round(0.2 * (tr.n + te.n))
        assert tr.y.min() >= 0 and tr.y.max() < 10
    sizes = data.train_sizes()
    assert sizes.dtype == np.int64 and len(sizes) == 30 and len(set(sizes.tolist())) > 1


def test_synthetic_unseen_does_not_change_data() -> None:
    full = make_synthetic(num_clients=10, seed=1)
    held = make_synthetic(num_clients=10, seed=1, frac_unseen=0.2)
    assert held.client_ids == full.client_ids[:8]
    assert held.unseen_ids == full.client_ids[8:]
    np.testing.assert_array_equal(held.unseen_train[1].x, full.train[9].x)


def test_synthetic_heterogeneity_knobs_matter() -> None:
    # With alpha = beta = 0 the clients still differ (W_k ~ N(0, 1)); large beta must
    # spread the client input means much further apart.
    low = make_synthetic(num_clients=20, alpha=0.0, beta=0.0, seed=0)
    high = make_synthetic(num_clients=20, alpha=0.0, beta=5.0, seed=0)

    def spread(d: FederatedData) -> float:
        return float(np.std([c.x.mean() for c in d.train]))

    assert spread(high) > 3 * spread(low)


def test_registry_synthetic_and_unknown_name() -> None:
    assert DATASETS[:2] == ("synthetic", "femnist")
    data = load_dataset("synthetic", None, num_clients=5, frac_unseen=0.2, seed=0)
    assert data.num_clients == 4 and len(data.unseen_ids) == 1
    with pytest.raises(ValueError) as info:
        load_dataset("mnist", None, num_clients=5, frac_unseen=0.0, seed=0)
    for name in DATASETS:
        assert name in str(info.value)


# --------------------------------------------------------------------------- hold_out_unseen


def _clients(k: int) -> tuple[list[str], list[ClientSplit], list[ClientSplit]]:
    ids = [f"c{i}" for i in range(k)]
    train = [ClientSplit(np.full((i + 1, 2), i, np.float32), np.zeros(i + 1, np.int32))
             for i in range(k)]
    test = [ClientSplit(np.full((1, 2), i, np.float32), np.zeros(1, np.int32))
            for i in range(k)]
    return ids, train, test


@pytest.mark.parametrize(
    ("k", "frac", "num_unseen"),
    [(10, 0.0, 0), (10, 0.1, 1), (10, 0.25, 2), (10, 0.99, 9), (3, 0.5, 1), (1, 0.9, 0),
     (100, 0.1, 10)],
)
def test_hold_out_unseen_counts(k: int, frac: float, num_unseen: int) -> None:
    ids, train, test = _clients(k)
    data = hold_out_unseen(ids, train, test, frac, name="t", num_classes=2, input_shape=(2,))
    assert data.unseen_ids == ids[k - num_unseen:]
    assert data.client_ids == ids[: k - num_unseen]
    assert data.train == train[: k - num_unseen] and data.test == test[: k - num_unseen]
    assert data.unseen_train == train[k - num_unseen:]
    assert data.unseen_test == test[k - num_unseen:]


@pytest.mark.parametrize("frac", [-0.1, 1.0, 1.5, float("nan")])
def test_hold_out_unseen_rejects_bad_fraction(frac: float) -> None:
    ids, train, test = _clients(5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        hold_out_unseen(ids, train, test, frac, name="t", num_classes=2, input_shape=(2,))


def test_hold_out_unseen_needs_a_seen_client() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        hold_out_unseen([], [], [], 0.0, name="t", num_classes=2, input_shape=(2,))


def test_hold_out_unseen_rejects_mismatched_lengths() -> None:
    ids, train, test = _clients(3)
    with pytest.raises(ValueError, match="one entry per client"):
        hold_out_unseen(ids, train, test[:2], 0.0, name="t", num_classes=2, input_shape=(2,))


def test_client_split_checks_lengths() -> None:
    with pytest.raises(ValueError, match="as many labels"):
        ClientSplit(np.zeros((3, 2)), np.zeros(2))
    assert ClientSplit(np.zeros((3, 2)), np.zeros(3)).n == 3


# --------------------------------------------------------------------------- real FEMNIST


@pytest.mark.slow
def test_real_femnist_first_100_writers() -> None:
    root = os.environ.get("FEDEQ_DATA_DIR")
    if not root:
        pytest.skip("set FEDEQ_DATA_DIR to a folder with femnist/{train,test}/*.json")
    data = load_femnist(root, num_clients=100)
    assert data.num_clients == 100 and data.unseen_ids == []
    assert data.client_ids == sorted(data.client_ids)
    assert sum(c.n for c in data.train) == 12_823
    assert sum(c.n for c in data.test) == 1_477
    x = data.train[0].x
    assert x.dtype == np.float32 and x.shape[1:] == (28, 28, 1)
    assert 0.0 <= min(c.x.min() for c in data.train) and max(c.x.max() for c in data.train) <= 1.0
    labels = np.concatenate([c.y for c in data.train])
    assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < 62
