"""Every reader fails on a malformed file with DataError, never with anything else.

Each reader gets a small valid file written here (and must read it), then seeded
mutations of it: byte truncations (the empty file included), whole-file replacements, and
field changes of the wrong type or shape, all invalid by construction, each of which must
raise DataError. A few random byte overwrites ("noise") may happen to leave a file
readable, so those must only never raise anything other than DataError.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from data.cifar import read_cifar_pickles
from data.cinic import CINIC_CLASSES, read_cinic
from data.errors import DataError
from data.fmnist import read_fmnist
from data.inco_partition import check_partition, read_partition_file
from data.leaf import load_femnist
from data.shakespeare import load_shakespeare
from data.svhn import read_svhn

MIN_CASES = 50  # invalid cases per reader (the issue asks for at least 50)
Payload = bytes | Callable[[Path], None]  # the target file's new bytes, or an edit of root


def _truncations(raw: bytes, rng: np.random.Generator, n: int, end: int | None = None
                 ) -> list[tuple[str, bytes]]:
    """The empty file, a few short prefixes, and n seeded cut points before `end`."""
    end = len(raw) if end is None else end
    cuts = {0, 1, 2, 8, end - 1} | set(rng.integers(1, end, n).tolist())
    return [(f"truncated at {c} of {len(raw)} bytes", raw[:c]) for c in sorted(cuts)]


def _noise(raw: bytes, rng: np.random.Generator, n: int) -> list[tuple[str, bytes]]:
    out = []
    for _ in range(n):
        b = bytearray(raw)
        at = rng.integers(0, len(b), rng.integers(1, 9))
        for i in at:
            b[i] = int(rng.integers(0, 256))
        out.append((f"bytes overwritten at {sorted(at.tolist())}", bytes(b)))
    return out


def _run(tmp_path: Path, base: Path, target: str, read: Callable[[Path], object],
         cases: list[tuple[str, Payload]], *, must_fail: bool = True) -> None:
    """Each case on a fresh copy of `base`; collects every case that did not raise
    DataError (or, with must_fail=False, that raised anything else)."""
    bad = []
    for i, (label, payload) in enumerate(cases):
        root = tmp_path / f"case{i}"
        shutil.copytree(base, root)
        if callable(payload):
            payload(root)
        else:
            (root / target).write_bytes(payload)
        try:
            read(root)
        except DataError:
            pass
        except Exception as e:  # noqa: BLE001 - the point of the test
            bad.append(f"{label}: {type(e).__name__}: {e}")
        else:
            if must_fail:
                bad.append(f"{label}: read without an error")
        shutil.rmtree(root)
    assert not bad, f"{len(bad)} of {len(cases)} cases:\n" + "\n".join(bad)


class _Whole:
    """What an edit returns to replace the whole document."""

    def __init__(self, value: object):
        self.value = value


def _json_cases(doc: dict, edits: list[tuple[str, Callable[[dict], object]]]
                ) -> list[tuple[str, bytes]]:
    """Field changes: each edit mutates a copy of the document (or returns a _Whole)."""
    out = []
    for label, edit in edits:
        d = copy.deepcopy(doc)
        new = edit(d)
        out.append((label, json.dumps(new.value if isinstance(new, _Whole) else d).encode()))
    return out


def _setter(path: tuple, value: object) -> Callable[[dict], None]:
    def edit(d):
        node = d
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def _deleter(path: tuple) -> Callable[[dict], None]:
    def edit(d):
        node = d
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return edit


WRONG = ["text", None, {}, [], 1.5, [[1, 2], 3]]  # values of the wrong type


def _count(cases: list) -> list:
    assert len(cases) >= MIN_CASES, len(cases)
    return cases


# --------------------------------------------------------------------------- LEAF FEMNIST

def _femnist_doc(rng: np.random.Generator) -> dict:
    users = ["w0", "w1"]
    return {"users": users, "num_samples": [3, 3], "user_data": {
        u: {"x": rng.random((3, 784)).round(2).tolist(), "y": rng.integers(0, 62, 3).tolist()}
        for u in users}}


@pytest.fixture(scope="module")
def femnist_base(tmp_path_factory) -> tuple[Path, bytes, dict]:
    doc = _femnist_doc(np.random.default_rng(0))
    base = tmp_path_factory.mktemp("femnist")
    raw = json.dumps(doc).encode()
    for split in ("train", "test"):
        (base / "femnist" / split).mkdir(parents=True)
        (base / "femnist" / split / "a.json").write_bytes(raw)
    return base, raw, doc


def _read_femnist(root: Path) -> object:
    return load_femnist(str(root), num_clients=2)


def _femnist_edits(rng: np.random.Generator) -> list[tuple[str, Callable]]:
    def user():
        return str(rng.choice(["w0", "w1"]))

    edits: list[tuple[str, Callable]] = [(f"document is {v!r}", lambda d, v=v: _Whole(v))
                                         for v in (["x"], "x", 1, None)]
    for key in ("users", "num_samples", "user_data"):
        edits.append((f"no {key}", _deleter((key,))))
        edits += [(f"{key} = {v!r}", _setter((key,), v)) for v in ("w0", 3, None)]
    edits += [
        ("a user not in user_data", lambda d: (d["users"].append("w9"),
                                               d["num_samples"].append(3))),
        ("user listed twice", lambda d: d.update(users=["w0", "w0"])),
        ("one count short", lambda d: d["num_samples"].pop()),
        ("user name a number", _setter(("users", 0), 5)),
    ]
    for v in (4, -1, "3", None, 2.5):
        edits.append((f"num_samples[1] = {v!r}", _setter(("num_samples", 1), v)))
    for v in (["x"], "x", None, 1):
        edits.append((f"user_data[u] = {v!r}", _setter(("user_data", user()), v)))
    for key in ("x", "y"):
        edits.append((f"no {key}", _deleter(("user_data", user(), key))))
        edits += [(f"{key} = {v!r}", _setter(("user_data", user(), key), v)) for v in WRONG]
    for _ in range(12):
        u, row, col = user(), int(rng.integers(3)), int(rng.integers(784))
        v = [1.5, -0.5, "a", [0.1], {}, None, 2][int(rng.integers(7))]
        edits.append((f"x[{row}][{col}] = {v!r}", _setter(("user_data", u, "x", row, col), v)))
    edits += [
        ("a row dropped", lambda d: d["user_data"]["w0"]["x"].pop()),
        ("a pixel dropped", lambda d: d["user_data"]["w1"]["x"][1].pop()),
        ("a pixel added", lambda d: d["user_data"]["w0"]["x"][2].append(0.5)),
        ("a row is text", _setter(("user_data", "w1", "x", 0), "row")),
        ("a row is empty", _setter(("user_data", "w1", "x", 0), [])),
        ("a label dropped", lambda d: d["user_data"]["w0"]["y"].pop()),
    ]
    for v in (62, -1, 1.5, "a", None, [1], {}):
        edits.append((f"y[0] = {v!r}", _setter(("user_data", user(), "y", 0), v)))
    return edits


def test_femnist_reader_fuzz(femnist_base, tmp_path):
    base, raw, doc = femnist_base
    assert _read_femnist(base).num_clients == 2  # the valid file reads
    rng = np.random.default_rng(1)
    cases = _truncations(raw, rng, 20) + _json_cases(doc, _femnist_edits(rng))
    _run(tmp_path, base, "femnist/train/a.json", _read_femnist, _count(cases))
    _run(tmp_path, base, "femnist/train/a.json", _read_femnist, _noise(raw, rng, 10),
         must_fail=False)


# --------------------------------------------------------------------------- CIFAR pickles

def _cifar_batch(rng: np.random.Generator, label_key: bytes, classes: int) -> dict:
    return {b"batch_label": b"fuzz", label_key: rng.integers(0, classes, 4).tolist(),
            b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8)}


class _Exec:
    def __reduce__(self):
        import os
        return (os.system, ("true",))


@pytest.fixture(scope="module", params=["cifar10", "cifar100"])
def cifar_base(request, tmp_path_factory):
    name = request.param
    rng = np.random.default_rng(2)
    key, classes, folder, files, target = (
        (b"labels", 10, "cifar-10-batches-py",
         [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "data_batch_1")
        if name == "cifar10" else
        (b"fine_labels", 100, "cifar-100-python", ["train", "test"], "train"))
    base = tmp_path_factory.mktemp(name)
    (base / name / folder).mkdir(parents=True)
    for f in files:
        (base / name / folder / f).write_bytes(
            pickle.dumps(_cifar_batch(rng, key, classes), protocol=2))
    return name, base, f"{name}/{folder}/{target}", _cifar_batch(rng, key, classes), key, classes


def test_cifar_reader_fuzz(cifar_base, tmp_path):
    name, base, target, batch, key, classes = cifar_base

    def read(root):
        return read_cifar_pickles(root, name)

    assert read(base)[0].shape[1:] == (32, 32, 3)
    rng = np.random.default_rng(3)
    raw = pickle.dumps(batch, protocol=2)
    x, y = batch[b"data"], batch[key]
    values: list[tuple[str, object]] = [(f"file holds {v!r}", v) for v in
                                        ([1, 2], None, 1, "x", x)]
    values += [(f"no {k!r}", {kk: v for kk, v in batch.items() if kk != k})
               for k in (b"data", key)]
    for label, data in [("data as lists", x.tolist()), ("data float32", x.astype(np.float32)),
                        ("data int64", x.astype(np.int64)), ("data bool", x > 128),
                        ("data 3071 wide", x[:, :-1]),
                        ("data 3073 wide", np.pad(x, ((0, 0), (0, 1)))),
                        ("data NHWC", x.reshape(4, 32, 32, 3)), ("data flat", x.reshape(-1)),
                        ("data 0-d", np.uint8(3)), ("data text", "pixels"), ("data None", None),
                        ("data dict", {}), ("data empty", np.zeros((0,), np.uint8))]:
        values.append((label, {**batch, b"data": data}))
    for label, labels in [("labels text", "0123"), ("labels None", None), ("labels dict", {}),
                          ("labels 2-d", [[v] for v in y]), ("one label short", y[:-1]),
                          ("one label extra", [*y, 0]), ("label = classes", [classes, *y[1:]]),
                          ("label -1", [-1, *y[1:]]), ("float labels", [v + 0.5 for v in y]),
                          ("float label array", np.asarray(y, np.float64) + 0.5),
                          ("a None label", [None, *y[1:]]), ("ragged labels", [[1, 2], *y[1:]]),
                          ("bool labels", np.ones(4, bool)), ("huge label", [2**70, *y[1:]]),
                          ("a text label", ["a", *y[1:]])]:
        values.append((label, {**batch, key: labels}))
    cases = [(label, pickle.dumps(v, protocol=2)) for label, v in values]
    cases += [("pickle runs os.system", pickle.dumps(_Exec(), protocol=2)),
              ("not a pickle", b"hello world\n" * 10),
              ("pickle protocol 5 of a forbidden global",
               pickle.dumps({b"data": _Exec()}, protocol=5))]
    cases += _truncations(raw, rng, 20)
    _run(tmp_path, base, target, read, _count(cases))
    _run(tmp_path, base, target, read, _noise(raw, rng, 10), must_fail=False)


# --------------------------------------------------------------------- Shakespeare, TFF h5

SNIPPETS = [b"To be, or not to be, that is the question:", b"Whether 'tis nobler"]


def _write_h5(path: Path, build: Callable | None = None) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        if build is not None:
            build(f)
            return
        for c in ("alice", "bob"):
            f.create_dataset(f"examples/{c}/snippets", data=np.array(SNIPPETS, dtype=object),
                             dtype=h5py.string_dtype("ascii"))


@pytest.fixture(scope="module")
def tff_base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("tff")
    (base / "shakespeare").mkdir()
    for split in ("train", "test"):
        _write_h5(base / "shakespeare" / f"shakespeare_{split}.h5")
    return base


def _read_tff(root: Path) -> object:
    return load_shakespeare(root, num_clients=2, source="tff", download=False)


def _h5_edits() -> list[tuple[str, Callable]]:
    import h5py

    strings = h5py.string_dtype("ascii")

    def one(snippets_of_bob: Callable) -> Callable:
        def build(f):
            f.create_dataset("examples/alice/snippets", data=np.array(SNIPPETS, dtype=object),
                             dtype=strings)
            f.create_group("examples/bob")
            snippets_of_bob(f["examples/bob"])
        return build

    edits = [
        ("no examples group", lambda f: f.create_group("other")),
        ("examples is a dataset", lambda f: f.create_dataset("examples", data=[1, 2])),
        ("examples empty", lambda f: f.create_group("examples")),
        ("one client only", lambda f: f.create_dataset(
            "examples/alice/snippets", data=np.array(SNIPPETS, dtype=object), dtype=strings)),
        ("a client is a dataset", lambda f: (f.create_group("examples/alice"),
                                             f.create_dataset("examples/bob", data=[1]))),
        ("a dangling soft link", lambda f: (
            f.create_dataset("examples/alice/snippets", data=np.array(SNIPPETS, dtype=object),
                             dtype=strings),
            f["examples"].__setitem__("bob", h5py.SoftLink("/nowhere")))),
        ("a dangling external link", lambda f: (
            f.create_dataset("examples/alice/snippets", data=np.array(SNIPPETS, dtype=object),
                             dtype=strings),
            f["examples"].__setitem__("bob", h5py.ExternalLink("missing.h5", "/x")))),
        ("no snippets", one(lambda g: g.create_dataset("other", data=[1]))),
        ("snippets a group", one(lambda g: g.create_group("snippets"))),
        ("int snippets", one(lambda g: g.create_dataset("snippets", data=[1, 2, 3]))),
        ("float snippets", one(lambda g: g.create_dataset("snippets", data=[1.5]))),
        ("2-d snippets", one(lambda g: g.create_dataset(
            "snippets", data=np.array([SNIPPETS, SNIPPETS], dtype=object), dtype=strings))),
        ("scalar snippet", one(lambda g: g.create_dataset(
            "snippets", data=SNIPPETS[0], dtype=strings))),
        ("compound snippets", one(lambda g: g.create_dataset(
            "snippets", data=np.zeros(2, dtype=[("a", "i4"), ("b", "f4")])))),
        ("empty snippets dataset", one(lambda g: g.create_dataset(
            "snippets", shape=None, dtype="f4"))),
    ]
    return edits


def test_tff_h5_reader_fuzz(tff_base, tmp_path):
    assert _read_tff(tff_base).num_clients == 2
    target = "shakespeare/shakespeare_train.h5"
    raw = (tff_base / target).read_bytes()
    rng = np.random.default_rng(4)
    cases: list[tuple[str, Payload]] = _truncations(raw, rng, 30)
    cases += [("a text file", b"not an HDF5 file\n" * 20),
              ("an npz", _npz_bytes()), ("the signature only", raw[:8] + b"\0" * 100)]
    for label, build in _h5_edits():
        cases.append((label, lambda root, b=build: _write_h5(root / target, b)))
    cases.append(("train file is a folder", lambda root: (
        (root / target).unlink(), (root / target).mkdir())))
    _run(tmp_path, tff_base, target, _read_tff, _count(cases))
    _run(tmp_path, tff_base, target, _read_tff, _noise(raw, rng, 15), must_fail=False)


def _npz_bytes() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, a=np.arange(3))
    return buf.getvalue()


# -------------------------------------------------------------------- Shakespeare, LEAF

def _leaf_text_doc() -> dict:
    line = "To be, or not to be, that is the question: Whether 'tis nobler in the mind to su"
    assert len(line) == 80
    users = ["u0", "u1"]
    return {"users": users, "num_samples": [3, 3], "user_data": {
        u: {"x": [line[i:] + line[:i] for i in range(3)], "y": ["f", "f", "e"]}
        for u in users}}


@pytest.fixture(scope="module")
def leaf_text_base(tmp_path_factory) -> tuple[Path, bytes, dict]:
    doc = _leaf_text_doc()
    base = tmp_path_factory.mktemp("leaf_text")
    raw = json.dumps(doc).encode()
    for split in ("train", "test"):
        (base / "shakespeare" / split).mkdir(parents=True)
        (base / "shakespeare" / split / "a.json").write_bytes(raw)
    return base, raw, doc


def _read_leaf_text(root: Path) -> object:
    return load_shakespeare(root, num_clients=2, source="leaf", download=False)


def test_leaf_shakespeare_reader_fuzz(leaf_text_base, tmp_path):
    base, raw, doc = leaf_text_base
    assert _read_leaf_text(base).num_clients == 2
    rng = np.random.default_rng(5)
    edits: list[tuple[str, Callable]] = [(f"document is {v!r}", lambda d, v=v: _Whole(v))
                                         for v in (["x"], "x", 1, None)]
    for key in ("users", "user_data"):
        edits.append((f"no {key}", _deleter((key,))))
        edits += [(f"{key} = {v!r}", _setter((key,), v)) for v in ("u0", 3, None)]
    edits += [("a user not in user_data", lambda d: d["users"].append("u9")),
              ("a user is a list", _setter(("users", 1), ["u1"])),
              ("users empty", _setter(("users",), []))]
    for u in ("u0", "u1"):
        edits += [(f"user_data[{u}] = {v!r}", _setter(("user_data", u), v))
                  for v in (["x"], "x", None)]
        for key in ("x", "y"):
            edits.append((f"{u}: no {key}", _deleter(("user_data", u, key))))
            edits += [(f"{u}: {key} = {v!r}", _setter(("user_data", u, key), v))
                      for v in ("text", None, {}, 7)]
    line = doc["user_data"]["u0"]["x"][0]
    for v in (line[:79], line + "x", "", 80, None, ["a"] * 80):
        edits.append((f"x[i] = {str(v)[:12]!r}...", _setter(
            ("user_data", str(rng.choice(["u0", "u1"])), "x", int(rng.integers(3))), v)))
    for v in ("ab", "", 7, None, ["a"]):
        edits.append((f"y[i] = {v!r}", _setter(
            ("user_data", str(rng.choice(["u0", "u1"])), "y", int(rng.integers(3))), v)))
    edits += [("a y dropped", lambda d: d["user_data"]["u1"]["y"].pop()),
              ("an x dropped", lambda d: d["user_data"]["u0"]["x"].pop()),
              ("no samples", lambda d: d["user_data"]["u1"].update(x=[], y=[]))]
    cases: list[tuple[str, Payload]] = _truncations(raw, rng, 20) + _json_cases(doc, edits)
    target = "shakespeare/train/a.json"
    cases.append(("train is a file", lambda root: (
        shutil.rmtree(root / "shakespeare/train"),
        (root / "shakespeare/train").write_text("x"))))
    _run(tmp_path, base, target, _read_leaf_text, _count(cases))
    _run(tmp_path, base, target, _read_leaf_text, _noise(raw, rng, 10), must_fail=False)


# ------------------------------------------------------------------ InCo partition files

VALID_PARTITION = {0: [0, 1, 2], 1: [3, 4, 5]}


def _npy(obj: object, **kw) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array(obj, dtype=object, **kw) if not isinstance(obj, np.ndarray) else obj,
            allow_pickle=True)
    return buf.getvalue()


def _read_partition(name: str) -> Callable[[Path], object]:
    def read(root: Path) -> object:
        path = root / name
        return check_partition(read_partition_file(path), 2, 6, path)
    return read


@pytest.fixture(scope="module")
def partition_base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("partition")
    (base / "p.npy").write_bytes(_npy(VALID_PARTITION))
    (base / "p.json").write_text(json.dumps(
        {"clients": {str(k): v for k, v in VALID_PARTITION.items()}}))
    return base


def _bad_partitions() -> list[tuple[str, object]]:
    """Partitions (client -> indices) that are wrong for 2 clients over 6 examples."""
    return [
        ("a client missing", {0: [0, 1, 2, 3, 4, 5]}),
        ("three clients", {0: [0, 1], 1: [2, 3], 2: [4, 5]}),
        ("clients 1 and 2", {1: [0, 1, 2], 2: [3, 4, 5]}),
        ("index 6", {0: [0, 1, 2], 1: [3, 4, 6]}),
        ("index -1", {0: [-1, 1, 2], 1: [3, 4, 5]}),
        ("index 2**70", {0: [2**70, 1, 2], 1: [3, 4, 5]}),
        ("index -2**70", {0: [0, 1, 2], 1: [3, 4, -2**70]}),
        ("a repeated index", {0: [0, 1, 2], 1: [2, 3, 4, 5]}),
        ("an index in no client", {0: [0, 1], 1: [3, 4, 5]}),
        ("an empty client", {0: [], 1: [0, 1, 2, 3, 4, 5]}),
        ("a float index", {0: [0, 1, 2.0], 1: [3, 4, 5]}),
        ("a bool index", {0: [0, 1, True], 1: [3, 4, 5]}),
        ("a text index", {0: [0, 1, "2"], 1: [3, 4, 5]}),
        ("a None index", {0: [0, 1, None], 1: [3, 4, 5]}),
        ("a nested index", {0: [0, 1, [2]], 1: [3, 4, 5]}),
        ("indices a tuple", {0: (0, 1, 2), 1: [3, 4, 5]}),
        ("indices text", {0: "012", 1: [3, 4, 5]}),
        ("indices None", {0: None, 1: [3, 4, 5]}),
        ("indices a number", {0: 3, 1: [3, 4, 5]}),
    ]


def test_partition_npy_reader_fuzz(partition_base, tmp_path):
    read = _read_partition("p.npy")
    assert [len(p) for p in read(partition_base)] == [3, 3]
    raw = (partition_base / "p.npy").read_bytes()
    rng = np.random.default_rng(6)
    cases = [(label, _npy(p)) for label, p in _bad_partitions()]
    cases += [
        ("a text key", _npy({"0": [0, 1, 2], 1: [3, 4, 5]})),
        ("a bool key", _npy({False: [0, 1, 2], 1: [3, 4, 5]})),
        ("a float key", _npy({0.0: [0, 1, 2], 1: [3, 4, 5]})),
        ("a list, not a dict", _npy([[0, 1, 2], [3, 4, 5]])),
        ("a None", _npy(None)),
        ("an int array", _npy(np.arange(6))),
        ("an object array of 2", _npy(np.array([VALID_PARTITION, VALID_PARTITION], object))),
        ("a pickle of os.system", b"".join([raw[:raw.index(b"\n") + 1],
                                            pickle.dumps(_Exec(), protocol=2)])),
        ("not an npy", b"PK\x03\x04" + b"\0" * 60),
        ("npy version 9", raw[:6] + b"\x09\x00" + raw[8:]),
        ("header not a dict", raw[:10] + b"[" + raw[11:]),
        ("header text garbled", raw[:12] + b"!!!!" + raw[16:]),
        ("npy of a dict of an array", _npy({0: np.arange(3), 1: [3, 4, 5]})),
    ]
    cases += _truncations(raw, rng, 25)
    _run(tmp_path, partition_base, "p.npy", read, _count(cases))
    _run(tmp_path, partition_base, "p.npy", read, _noise(raw, rng, 15), must_fail=False)


def test_partition_json_reader_fuzz(partition_base, tmp_path):
    read = _read_partition("p.json")
    assert [len(p) for p in read(partition_base)] == [3, 3]
    raw = (partition_base / "p.json").read_bytes()
    rng = np.random.default_rng(7)

    def as_json(p: object) -> bytes:
        clients = {str(k): v for k, v in p.items()} if isinstance(p, dict) else p
        return json.dumps({"clients": clients}, default=str).encode()

    cases = [(label, as_json(p)) for label, p in _bad_partitions()
             if label != "indices a tuple"]  # JSON has no tuples: that one is a valid list
    cases += [(f"clients = {v!r}", json.dumps({"clients": v}).encode())
              for v in ([[0, 1, 2], [3, 4, 5]], "x", None, 3)]
    cases += [(f"key {k!r}", json.dumps({"clients": {k: [0, 1, 2], "1": [3, 4, 5]}}).encode())
              for k in ("a", "-0", "0.0", " 0", "\u0660", "")]
    cases += [("keys 1 and 01", json.dumps({"clients": {"0": [0, 1, 2], "1": [3, 4],
                                                        "01": [5]}}).encode()),
              ("no clients field", b'{"partition": {}}'), ("a list", b"[1, 2]"),
              ("an inf index", b'{"clients": {"0": [0, 1, 2], "1": [3, 4, 1e999]}}'),
              ("a NaN index", b'{"clients": {"0": [0, 1, NaN], "1": [3, 4, 5]}}'),
              ("not UTF-8", b'{"clients": {"\xff": [0]}}')]
    cases += _truncations(raw, rng, 20)
    _run(tmp_path, partition_base, "p.json", read, _count(cases))
    _run(tmp_path, partition_base, "p.json", read, _noise(raw, rng, 15), must_fail=False)


# ------------------------------------------------------------------------------ FMNIST

def _idx(array: np.ndarray, type_code: int = 0x08, ndim: int | None = None) -> bytes:
    ndim = array.ndim if ndim is None else ndim
    return (bytes([0, 0, type_code, ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
            + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fmnist_base(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(8)
    images = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 4).astype(np.uint8)
    base = tmp_path_factory.mktemp("fmnist")
    for prefix in ("train", "t10k"):
        (base / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
        (base / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels)))
    return base, images, labels


def test_fmnist_reader_fuzz(fmnist_base, tmp_path):
    base, images, labels = fmnist_base
    assert read_fmnist(base)[0].shape == (4, 28, 28)
    rng = np.random.default_rng(9)
    target = "train-images-idx3-ubyte.gz"
    raw_idx = _idx(images)
    raw = (base / target).read_bytes()
    idx_cases = [
        ("magic byte 1", b"\x01" + raw_idx[1:]), ("type code 0x09", _idx(images, 0x09)),
        ("type code 0x0D", _idx(images, 0x0D)), ("0 dimensions", raw_idx[:3] + b"\0"),
        ("5 dimensions", raw_idx[:3] + b"\x05" + raw_idx[4:]),
        ("N x 784", _idx(images.reshape(4, 784))), ("N x 27 x 28", _idx(images[:, :27])),
        ("N x 28 x 28 x 1", _idx(images[..., None])), ("one extra byte", raw_idx + b"\0"),
        ("a header only", raw_idx[:16]), ("3 bytes", raw_idx[:3]),
        ("a huge dimension", raw_idx[:4] + struct.pack(">I", 2**32 - 1) + raw_idx[8:]),
        ("dimensions overflowing int64",
         bytes([0, 0, 8, 4]) + struct.pack(">4I", *[2**32 - 1] * 4)),
    ]
    idx_cases += [(f"idx {label}", data) for label, data in _truncations(raw_idx, rng, 15)]
    cases: list[tuple[str, Payload]] = [(label, gzip.compress(data)) for label, data in idx_cases]
    cases += _truncations(raw, rng, 15)
    cases += [("not gzip", raw_idx), ("text", b"hello\n" * 10),
              ("gzip of nothing", gzip.compress(b""))]
    labels_target = "train-labels-idx1-ubyte.gz"
    for label, data in [("label 10", np.r_[10, labels[1:]]), ("label 255", np.r_[labels[:-1], 255]),
                        ("3 labels", labels[:3]), ("5 labels", np.r_[labels, 1]),
                        ("2-d labels", labels.reshape(2, 2))]:
        cases.append((label, lambda root, d=data: (root / labels_target).write_bytes(
            gzip.compress(_idx(np.asarray(d, np.uint8))))))
    cases += [("unpacked copy truncated", lambda root: (
        (root / target).unlink(), (root / target.removesuffix(".gz")).write_bytes(raw_idx[:100]))),
        ("images file missing", lambda root: (root / target).unlink()),
        ("images file a folder", lambda root: ((root / target).unlink(), (root / target).mkdir()))]
    _run(tmp_path, base, target, read_fmnist, _count(cases))
    _run(tmp_path, base, target, read_fmnist, _noise(raw, rng, 10), must_fail=False)


# -------------------------------------------------------------------------------- SVHN

@pytest.fixture(scope="module")
def svhn_base(tmp_path_factory) -> tuple[Path, dict]:
    from scipy.io import savemat

    rng = np.random.default_rng(10)
    blob = {"X": rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8),
            "y": rng.integers(1, 11, (4, 1)).astype(np.uint8)}
    base = tmp_path_factory.mktemp("svhn")
    for split in ("train", "test"):
        savemat(base / f"{split}_32x32.mat", blob)
    return base, blob


def test_svhn_reader_fuzz(svhn_base, tmp_path):
    from scipy.io import savemat

    base, blob = svhn_base
    assert read_svhn(base)[0].shape == (4, 32, 32, 3)
    rng = np.random.default_rng(11)
    target = "train_32x32.mat"
    raw = (base / target).read_bytes()
    x, y = blob["X"], blob["y"]
    mats: list[tuple[str, dict]] = [
        ("no X", {"y": y}), ("no y", {"X": x}), ("neither", {"Z": x}),
        ("X float", {"X": x.astype(np.float64), "y": y}),
        ("X uint16", {"X": x.astype(np.uint16), "y": y}),
        ("X one channel", {"X": x[:, :, :1], "y": y}), ("X 31 rows", {"X": x[:31], "y": y}),
        ("X 3-d", {"X": x[..., 0], "y": y}), ("X 5-d", {"X": x[..., None], "y": y}),
        ("X text", {"X": "pixels", "y": y}),
        ("X a cell", {"X": np.array([x], dtype=object), "y": y}),
        ("X a struct", {"X": {"a": 1}, "y": y}),
        ("y N x 2", {"X": x, "y": np.hstack([y, y])}), ("3 labels", {"X": x, "y": y[:3]}),
        ("5 labels", {"X": x, "y": np.vstack([y, y[:1]])}),
        ("label 11", {"X": x, "y": np.vstack([[[11]], y[1:]]).astype(np.uint8)}),
        ("label -1", {"X": x, "y": np.vstack([[[-1]], y[1:]]).astype(np.int16)}),
        ("label 0.5", {"X": x, "y": np.vstack([[[0.5]], y[1:]])}),
        ("label NaN", {"X": x, "y": np.vstack([[[np.nan]], y[1:]])}),
        ("y text", {"X": x, "y": "abcd"}), ("y a struct", {"X": x, "y": {"a": 1}}),
        ("y a cell", {"X": x, "y": np.array([[1], [2], [3], [4]], dtype=object)}),
        ("y 3-d", {"X": x, "y": y.reshape(4, 1, 1)}), ("y bool", {"X": x, "y": y > 5}),
        ("y complex", {"X": x, "y": y + 1j}),
    ]
    cases: list[tuple[str, Payload]] = []
    for label, mat in mats:
        cases.append((label, lambda root, m=mat: savemat(root / target, m)))
    cases.append(("MATLAB v4", lambda root: savemat(root / target, {"X": x[..., 0].reshape(32, -1),
                                                                   "y": y}, format="4")))
    cases += _truncations(raw, rng, 20)
    cases += [("a text file", b"MATLAB 5.0 MAT-file" + b" " * 200),
              ("an HDF5 (v7.3-like) file", lambda root: _write_h5(root / target)),
              ("an npz", _npz_bytes())]
    _run(tmp_path, base, target, read_svhn, _count(cases))
    _run(tmp_path, base, target, read_svhn, _noise(raw, rng, 10), must_fail=False)


# ----------------------------------------------------------------------------- CINIC-10

def _png(shape: tuple[int, ...], mode: str = "RGB", seed: int = 0) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def cinic_base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("cinic")
    for split in ("train", "test"):
        for k, name in enumerate(CINIC_CLASSES):
            (base / split / name).mkdir(parents=True)
            (base / split / name / "a.png").write_bytes(_png((32, 32, 3), seed=k))
    return base


def test_cinic_reader_fuzz(cinic_base, tmp_path):
    assert read_cinic(cinic_base)[0].shape == (10, 32, 32, 3)
    rng = np.random.default_rng(12)
    target = "train/airplane/a.png"
    raw = (cinic_base / target).read_bytes()
    cases: list[tuple[str, Payload]] = _truncations(raw, rng, 25)
    cases += [("31 x 32", _png((31, 32, 3))), ("64 x 64", _png((64, 64, 3))),
              ("1 x 1", _png((1, 1, 3))), ("text", b"not a png\n" * 10),
              ("an npz", _npz_bytes()), ("PNG signature only", raw[:8]),
              ("IHDR chunk only", raw[:33]), ("a grey 32 x 31", _png((32, 31, 3), "L")),
              ("a palette image 33 x 32", _png((33, 32, 3), "P"))]
    edits: list[tuple[str, Callable[[Path], None]]] = [
        ("a class folder missing", lambda r: shutil.rmtree(r / "train/cat")),
        ("an extra class folder", lambda r: (r / "train/zebra").mkdir()),
        ("a class renamed", lambda r: (r / "train/cat").rename(r / "train/Cat")),
        ("an empty class folder", lambda r: (r / "train/dog/a.png").unlink()),
        ("only a non-png in a class", lambda r: (r / "train/dog/a.png").rename(
            r / "train/dog/a.txt")),
        ("a class folder is a file", lambda r: (shutil.rmtree(r / "train/frog"),
                                                (r / "train/frog").write_text("x"))),
        ("a folder named .png", lambda r: ((r / "train/ship/a.png").unlink(),
                                           (r / "train/ship/a.png").mkdir())),
        ("train/ missing", lambda r: shutil.rmtree(r / "train")),
        ("train/ a file", lambda r: (shutil.rmtree(r / "train"), (r / "train").write_text(""))),
        ("test/ missing", lambda r: shutil.rmtree(r / "test")),
        ("a second, truncated image", lambda r: (r / "test/bird/b.png").write_bytes(raw[:50])),
        ("a dangling symlink", lambda r: ((r / "train/deer/a.png").unlink(),
                                          (r / "train/deer/a.png").symlink_to(r / "nowhere"))),
    ]
    cases += edits
    _run(tmp_path, cinic_base, target, read_cinic, _count(cases))
    _run(tmp_path, cinic_base, target, read_cinic, _noise(raw, rng, 10), must_fail=False)


# ------------------------------------------------------------------ DAC snapshot files

def _snapshot_doc() -> dict:
    from models.mobilenet_v2 import FULL, MobileNetConfig, count_macs, count_params
    from trainers.dac.snapshots import Snapshot
    small = MobileNetConfig.from_expansions([8] * 17)
    snaps = [Snapshot("0", count_macs(FULL), count_params(FULL), FULL),
             Snapshot("1", count_macs(small), count_params(small), small,
                      tuple(tuple(range(8)) for _ in range(17)), 0.5)]
    return {s.epoch: s.to_json() for s in snaps}


def _read_snapshot_file(root: Path) -> object:
    from trainers.dac.snapshots import read_snapshots
    return read_snapshots(root / "snapshots.json")


def test_dac_snapshot_reader_fuzz(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    doc = _snapshot_doc()
    raw = json.dumps(doc).encode()
    (base / "snapshots.json").write_bytes(raw)
    assert [s.epoch for s in _read_snapshot_file(base)] == ["0", "1"]
    rng = np.random.default_rng(7)
    edits: list[tuple[str, Callable]] = [(f"document is {v!r}", lambda d, v=v: _Whole(v))
                                         for v in ([], "x", 1, None, {})]
    for epoch in ("0", "1"):
        edits += [(f"entry {epoch} = {v!r}", _setter((epoch,), v)) for v in WRONG]
        for key in ("macs", "params", "cfg"):
            edits.append((f"{epoch}: no {key}", _deleter((epoch, key))))
            edits += [(f"{epoch}: {key} = {v!r}", _setter((epoch, key), v))
                      for v in ("text", None, {}, [[1, 2], 3])]
        edits += [(f"{epoch}: cfg has 16 blocks", lambda d, e=epoch: d[e]["cfg"].pop()),
                  (f"{epoch}: a block of 2 numbers", _setter((epoch, "cfg", 3), [8, 24])),
                  (f"{epoch}: a stride changed", _setter((epoch, "cfg", 3, 2), 1)),
                  (f"{epoch}: expansion 0", _setter((epoch, "cfg", 5, 0), 0))]
    edits += [("channels not matching e", _setter(("1", "channels", 2), [0, 1])),
              ("channels repeated", _setter(("1", "channels", 2), [0] * 8)),
              ("16 channel lists", lambda d: d["1"]["channels"].pop()),
              ("channels negative", _setter(("1", "channels", 4, 0), -1)),
              ("a channel past the full width", _setter(("1", "channels", 0, 7), 32)),
              ("channels text", _setter(("1", "channels"), "x")),
              ("test_acc text", _setter(("1", "test_acc"), "x"))]
    cases: list[tuple[str, Payload]] = _truncations(raw, rng, 20) + _json_cases(doc, edits)
    cases.append(("a folder", lambda root: ((root / "snapshots.json").unlink(),
                                            (root / "snapshots.json").mkdir())))
    _run(tmp_path, base, "snapshots.json", _read_snapshot_file, _count(cases))
    _run(tmp_path, base, "snapshots.json", _read_snapshot_file, _noise(raw, rng, 10),
         must_fail=False)
