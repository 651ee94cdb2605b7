"""Shakespeare loader: the TFF 90-id tokens, 81-id windows, both file layouts, errors,
and the download path (served from a local http.server)."""

import functools
import http.server
import json
import os
import tarfile
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from data.errors import DataError
from data.registry import load_dataset
from data.shakespeare import (
    BOS_ID,
    CHARS,
    EOS_ID,
    OOV_ID,
    PAD_ID,
    SEQ_LEN,
    TFF_FILES,
    URL_ENV,
    VOCAB_SIZE,
    decode,
    encode,
    leaf_windows,
    load_shakespeare,
    snippet_windows,
)

TEXT = "To be, or not to be: that is the question:\nWhether 'tis nobler in the mind to suffer"


def test_vocabulary_follows_the_tff_convention():
    assert len(CHARS) == 86 == len(set(CHARS))
    assert (PAD_ID, OOV_ID, BOS_ID, EOS_ID, VOCAB_SIZE) == (0, 87, 88, 89, 90)
    assert encode("d").tolist() == [1] and encode("\r").tolist() == [86]


def test_encode_decode_round_trip_and_oov():
    ids = encode(TEXT)
    assert ids.dtype == np.int32 and len(ids) == len(TEXT)
    assert ids.min() >= 1 and ids.max() <= 86
    assert decode(ids) == TEXT
    assert encode(TEXT.encode()).tolist() == ids.tolist()  # TFF stores bytes
    assert encode("a}b").tolist() == [encode("a")[0], OOV_ID, encode("b")[0]]
    assert encode("é").tolist() == [OOV_ID]  # one id per character, not per byte
    assert decode([BOS_ID, *encode("ab"), EOS_ID, PAD_ID, PAD_ID]) == "ab"


def test_snippet_windows_wrap_pad_and_shift():
    x, y = snippet_windows(["abc"])
    assert x.shape == y.shape == (1, SEQ_LEN) and x.dtype == y.dtype == np.int32
    assert x[0, :5].tolist() == [BOS_ID, *encode("abc"), EOS_ID]
    assert y[0, :4].tolist() == [*encode("abc"), EOS_ID]
    assert not x[0, 5:].any() and not y[0, 4:].any()

    # 79 characters + BOS + EOS = 81 ids: exactly one window, no padding.
    x, y = snippet_windows(["a" * 79])
    assert x.shape == (1, SEQ_LEN) and y[0, -1] == EOS_ID and x[0, 0] == BOS_ID
    # 80 characters = 82 ids: a second window holding only EOS, then padding.
    x, y = snippet_windows(["a" * 80])
    assert x.shape == (2, SEQ_LEN)
    assert x[1, 0] == EOS_ID and not x[1, 1:].any() and not y[1].any()
    assert y[0, -1] == encode("a")[0]
    # Windows never straddle snippets, and each row's targets are its inputs shifted by one.
    x, y = snippet_windows([TEXT * 3, "", "xyz"])
    ids = np.concatenate([[BOS_ID], encode(TEXT * 3), [EOS_ID]])
    n = -(-len(ids) // (SEQ_LEN + 1))
    assert x.shape[0] == n + 2
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    # The snippet's windows, each input row plus its last target, are the ids in order.
    rebuilt = np.concatenate([x[:n], y[:n, -1:]], axis=1).ravel()
    np.testing.assert_array_equal(rebuilt[:len(ids)], ids)
    assert not rebuilt[len(ids):].any()
    assert x[n, :2].tolist() == [BOS_ID, EOS_ID]  # an empty snippet still yields a window


def test_leaf_samples_become_80_80_windows():
    text = (TEXT * 3)[:90]
    xs = [text[i:i + SEQ_LEN] for i in range(5)]
    ys = [text[i + SEQ_LEN] for i in range(5)]
    x, y = leaf_windows(xs, ys)
    assert x.shape == y.shape == (5, SEQ_LEN)
    for i in range(5):
        assert decode(x[i]) == text[i:i + SEQ_LEN]
        assert decode(y[i]) == text[i + 1:i + SEQ_LEN + 1]


# --------------------------------------------------------------------------- files

def _snippets(client: str, n: int) -> list[bytes]:
    return [f"{client} speaks line {i}. ".encode() * (i + 1) for i in range(n)]


def _write_tff(base: Path, train: dict, test: dict) -> None:
    base.mkdir(parents=True, exist_ok=True)
    for split, clients in (("train", train), ("test", test)):
        with h5py.File(base / TFF_FILES[split], "w") as f:
            for cid, snippets in clients.items():
                f.create_dataset(f"examples/{cid}/snippets", data=np.array(snippets, "S"))


def _tiny_tff(base: Path) -> None:
    clients = ["bob", "alice", "carol"]
    _write_tff(base, {c: _snippets(c, 2 + i) for i, c in enumerate(clients)},
               {c: _snippets(c, 1) for c in clients if c != "bob"} | {"dave": _snippets("d", 1)})


def test_tff_h5_layout(tmp_path):
    _tiny_tff(tmp_path / "shakespeare")
    data = load_shakespeare(tmp_path, num_clients=2, frac_unseen=0.5, download=False)
    # Clients in both files, sorted: alice, carol (bob has no test data, dave no train).
    assert data.client_ids == ["alice"] and data.unseen_ids == ["carol"]
    assert (data.task, data.num_classes, data.input_shape) == ("text", 90, (80,))
    expected = snippet_windows(_snippets("alice", 3))
    np.testing.assert_array_equal(data.train[0].x, expected[0])
    np.testing.assert_array_equal(data.train[0].y, expected[1])
    assert data.unseen_train[0].x.shape[1] == SEQ_LEN and data.test[0].x.dtype == np.int32
    with pytest.raises(DataError, match="at least 4 clients"):
        load_shakespeare(tmp_path, num_clients=4, download=False)


def test_leaf_json_layout(tmp_path):
    base = tmp_path / "shakespeare"
    text = TEXT * 2
    sample = lambda n, off: ([text[i:i + 80] for i in range(off, off + n)],
                             [text[i + 80] for i in range(off, off + n)])
    for split, n in (("train", 4), ("test", 2)):
        (base / split).mkdir(parents=True)
        users = ["u2", "u1"]
        blob = {"users": users, "num_samples": [n, n],
                "user_data": {u: dict(zip("xy", sample(n, k), strict=True))
                              for k, u in enumerate(users)}}
        (base / split / "all_data.json").write_text(json.dumps(blob))
    data = load_shakespeare(tmp_path, num_clients=2, download=False)
    assert data.client_ids == ["u1", "u2"] and data.task == "text"
    assert data.train[0].x.shape == (4, 80) and data.test[1].y.shape == (2, 80)
    assert decode(data.train[1].y[0]) == text[1:81]  # u2 starts at offset 0


def test_missing_files_say_where_and_how(tmp_path):
    with pytest.raises(DataError) as err:
        load_shakespeare(tmp_path, num_clients=1, download=False)
    msg = str(err.value)
    assert str(tmp_path / "shakespeare" / TFF_FILES["train"]) in msg
    assert "tff-datasets-public" in msg and "LEAF" in msg
    with pytest.raises(DataError, match="--data_dir"):
        load_dataset("shakespeare", None, 1, 0.0, 0)


def test_malformed_files_are_named(tmp_path):
    base = tmp_path / "shakespeare"
    base.mkdir()
    (base / TFF_FILES["train"]).write_bytes(b"not an hdf5 file")
    (base / TFF_FILES["test"]).write_bytes(b"not an hdf5 file")
    with pytest.raises(DataError, match="h5py cannot open") as err:
        load_shakespeare(tmp_path, num_clients=1, download=False)
    assert TFF_FILES["train"] in str(err.value)

    for split in ("train", "test"):
        with h5py.File(base / TFF_FILES[split], "w") as f:
            f.create_dataset("clients/a", data=np.zeros(3))
    with pytest.raises(DataError, match="'examples'"):
        load_shakespeare(tmp_path, num_clients=1, download=False)

    _write_tff(base, {"a": _snippets("a", 1)}, {"a": _snippets("a", 1)})
    with h5py.File(base / TFF_FILES["test"], "w") as f:
        f.create_dataset("examples/a/snippets", data=np.zeros(3))
    with pytest.raises(DataError, match="byte strings") as err:
        load_shakespeare(tmp_path, num_clients=1, download=False)
    assert TFF_FILES["test"] in str(err.value)

    leaf = tmp_path / "leaf"
    for split in ("train", "test"):
        (leaf / "shakespeare" / split).mkdir(parents=True)
        blob = {"users": ["u"], "num_samples": [1],
                "user_data": {"u": {"x": ["too short"], "y": ["!"]}}}
        (leaf / "shakespeare" / split / "d.json").write_text(json.dumps(blob))
    with pytest.raises(DataError, match="80-character") as err:
        load_shakespeare(leaf, num_clients=1, download=False)
    assert "d.json" in str(err.value)
    (leaf / "shakespeare" / "train" / "d.json").write_text("{broken")
    with pytest.raises(DataError, match="invalid JSON"):
        load_shakespeare(leaf, num_clients=1, download=False)


# --------------------------------------------------------------------------- download

@pytest.fixture
def served(tmp_path):
    """A local http.server over tmp_path/www; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_download_from_a_mirror(tmp_path, served, monkeypatch):
    www, url = served
    src = tmp_path / "src"
    _tiny_tff(src)
    with tarfile.open(www / "shakespeare.tar.bz2", "w:bz2") as tar:
        for name in TFF_FILES.values():
            tar.add(src / name, arcname=name)
    monkeypatch.setenv(URL_ENV, url)
    root = tmp_path / "root"
    data = load_dataset("shakespeare", str(root), 2, 0.0, 0)
    assert data.client_ids == ["alice", "carol"]
    assert sorted(os.listdir(root)) == ["shakespeare"]  # no temporary folder left
    assert sorted(os.listdir(root / "shakespeare")) == sorted(TFF_FILES.values())


def test_failed_download_leaves_nothing(tmp_path, served, monkeypatch):
    _, url = served  # the archive is not there: 404
    monkeypatch.setenv(URL_ENV, url + "/missing")
    root = tmp_path / "root"
    with pytest.raises(DataError, match="download failed") as err:
        load_shakespeare(root, num_clients=1)
    assert url + "/missing/shakespeare.tar.bz2" in str(err.value)
    assert os.listdir(root) == []


# --------------------------------------------------------------------------- real data

@pytest.mark.slow
def test_real_tff_shakespeare():
    root = os.environ.get("FEDEQ_DATA_DIR")
    if not root:
        pytest.skip("set FEDEQ_DATA_DIR to a folder holding shakespeare/*.h5")
    data = load_shakespeare(root, num_clients=200, frac_unseen=0.1, download=False)
    assert data.num_clients == 180 and len(data.unseen_ids) == 20
    base = Path(root) / "shakespeare"
    counts = {}
    for split in ("train", "test"):
        with h5py.File(base / TFF_FILES[split], "r") as f:
            ids = data.client_ids + data.unseen_ids
            counts[split] = sum(len(f["examples"][c]["snippets"]) for c in ids)
    splits = {"train": data.train + data.unseen_train, "test": data.test + data.unseen_test}
    windows = {s: sum(c.n for c in v) for s, v in splits.items()}
    for split in splits.values():
        for c in split:
            assert c.x.shape[1:] == c.y.shape[1:] == (SEQ_LEN,)
            assert c.x.min() >= 0 and c.x.max() < VOCAB_SIZE and c.x[0, 0] == BOS_ID
            np.testing.assert_array_equal(c.x[:, 1:], c.y[:, :-1])
    assert windows["train"] > counts["train"] and windows["test"] > counts["test"]
    print(f"\nshakespeare: 200 clients (180 seen, 20 unseen); snippets {counts}; "
          f"windows {windows}")
