"""Shakespeare next-character prediction: TFF's HDF5 files or LEAF's json, as 80/80 windows.

The reference's Shakespeare pickles cannot be obtained (spec 6.1, 6.4); what it hard-codes
(90 ids, pad 0, targets shifted by one) is the TensorFlow Federated / FedJAX convention,
so that is what is rebuilt here:

* ids: 0 = pad, 1..86 = TFF's 86 characters in TFF's order, 87 = out of vocabulary,
  88 = BOS, 89 = EOS. Text is mapped character by character (TFF splits bytes; the corpus
  is pure ASCII, where the two agree).
* TFF layout (preferred): ``ROOT/shakespeare/shakespeare_{train,test}.h5`` with
  ``examples/<client>/snippets`` byte strings. Each snippet becomes BOS + text + EOS,
  zero-padded to a multiple of 81 ids and cut into 81-id windows; a window gives the input
  ids [0:80] and the next-character targets [1:81]. Clients are speaking roles.
* LEAF layout: ``ROOT/shakespeare/{train,test}/*.json``, whose samples are already
  80-character strings x with the next character y. A sample becomes the input ids of x
  and the targets x[1:] + y: the same 80/80 shape, no BOS/EOS (LEAF keeps no snippet
  boundaries). LEAF's windows slide by one character, so neighbouring samples overlap in
  79 of 80 positions and a client has ~80x more (redundant) windows than in TFF's layout.

Clients are taken in sorted-id order among those with data in both splits; the first
``num_clients`` are used and the last ``int(frac_unseen * num_clients)`` of them are held
out as unseen clients (spec 2.1). When neither layout is present, the official TFF
archive is downloaded (``download_shakespeare``).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data.errors import DataError
from data.federated import ClientSplit, FederatedData, check_frac_unseen, hold_out_unseen
from utils.input_error import InputError

CHARS = "dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159\r"
"""TFF's Shakespeare character vocabulary, in its order: character CHARS[i] has id i + 1."""
PAD_ID = 0
OOV_ID = len(CHARS) + 1  # 87
BOS_ID = len(CHARS) + 2  # 88
EOS_ID = len(CHARS) + 3  # 89
VOCAB_SIZE = len(CHARS) + 4  # 90
SEQ_LEN = 80

DEFAULT_BASE_URL = "https://storage.googleapis.com/tff-datasets-public"
URL_ENV = "FEDEQ_SHAKESPEARE_URL"
ARCHIVE = "shakespeare.tar.bz2"
TFF_FILES = {"train": "shakespeare_train.h5", "test": "shakespeare_test.h5"}

SHAKESPEARE_HOW_TO_GET = (
    f"run once with network access (the official TFF archive {DEFAULT_BASE_URL}/{ARCHIVE} "
    f"is then downloaded automatically; ${URL_ENV} overrides the base URL), or download "
    f"that archive yourself and extract its {TFF_FILES['train']} and {TFF_FILES['test']} "
    "into DATA_DIR/shakespeare/; alternatively put LEAF's Shakespeare json "
    "(github.com/TalwalkarLab/leaf, data/shakespeare/preprocess.sh, e.g. "
    "`-s niid --sf 1.0 -k 0 -t sample -tf 0.8`) into DATA_DIR/shakespeare/train/*.json "
    "and DATA_DIR/shakespeare/test/*.json"
)

_ASCII_TABLE = np.full(128, OOV_ID, np.int32)
for _i, _c in enumerate(CHARS):
    _ASCII_TABLE[ord(_c)] = _i + 1
_CHAR_TO_ID = {c: i + 1 for i, c in enumerate(CHARS)}


def _error(path: Path | str, expected: str, found: str | None = None) -> DataError:
    return DataError(str(path), expected, SHAKESPEARE_HOW_TO_GET, found)


# ----------------------------------------------------------------------------- tokens

def encode(text: str | bytes) -> np.ndarray:
    """Character ids of `text` (int32, one per character, no BOS/EOS)."""
    if isinstance(text, bytes | bytearray | np.bytes_):
        raw = np.frombuffer(bytes(text), np.uint8)
        if not np.any(raw >= 128):
            return _ASCII_TABLE[raw]
        text = bytes(text).decode("utf-8", errors="replace")
    try:
        return _ASCII_TABLE[np.frombuffer(text.encode("ascii"), np.uint8)]
    except UnicodeEncodeError:
        return np.fromiter((_CHAR_TO_ID.get(c, OOV_ID) for c in text), np.int32, len(text))


def decode(ids: Iterable[int]) -> str:
    """Text of `ids`: pad, BOS and EOS are dropped, out-of-vocabulary shows as U+FFFD."""
    out = []
    for i in np.asarray(ids).ravel().tolist():
        if 1 <= i <= len(CHARS):
            out.append(CHARS[i - 1])
        elif i == OOV_ID:
            out.append("\ufffd")
    return "".join(out)


def snippet_windows(snippets: Iterable[str | bytes], seq_len: int = SEQ_LEN
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each int32 (n, seq_len): every snippet wrapped in BOS/EOS,
    zero-padded to a multiple of seq_len + 1 ids and cut into windows of seq_len + 1."""
    width = seq_len + 1
    rows = []
    for s in snippets:
        ids = np.concatenate([[BOS_ID], encode(s), [EOS_ID]]).astype(np.int32)
        padded = -(-len(ids) // width) * width
        rows.append(np.pad(ids, (0, padded - len(ids))).reshape(-1, width))
    windows = np.concatenate(rows) if rows else np.zeros((0, width), np.int32)
    return windows[:, :-1].copy(), windows[:, 1:].copy()


def leaf_windows(xs: Sequence[str], ys: Sequence[str], seq_len: int = SEQ_LEN
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) from LEAF samples: ids of x, and ids of x[1:] + y."""
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} inputs but {len(ys)} targets")
    if not all(isinstance(s, str) and len(s) == seq_len for s in xs):
        raise ValueError(f"every x must be a string of {seq_len} characters")
    if not all(isinstance(c, str) and len(c) == 1 for c in ys):
        raise ValueError("every y must be a single character")
    x = encode("".join(xs)).reshape(len(xs), seq_len)
    nxt = encode("".join(ys)).reshape(len(ys), 1)
    return x, np.concatenate([x[:, 1:], nxt], axis=1)


# ----------------------------------------------------------------------------- TFF h5

def _tff_paths(base: Path) -> dict[str, Path]:
    return {split: base / name for split, name in TFF_FILES.items()}


# What h5py raises on a damaged file: a truncated or overwritten block (OSError), a
# dangling link (KeyError), a corrupt B-tree or heap (RuntimeError, ValueError, TypeError).
_H5_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError)


def _unreadable_h5(path: Path, e: Exception) -> DataError:
    return _error(path, "an HDF5 file h5py can read (TFF's Shakespeare layout)",
                  f"a file it cannot read ({type(e).__name__}: {e})")


def _open_h5(path: Path):
    import h5py  # imported here so that the other datasets do not need it

    if not path.is_file():
        raise _error(path, f"TFF's Shakespeare HDF5 file {path.name}",
                     "no such file" if not path.exists() else "a folder, not a file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise _error(path, "an HDF5 file (TFF's Shakespeare layout)",
                     f"a file h5py cannot open ({e})") from e
    try:
        group = f.get("examples")
        if group is None or not hasattr(group, "keys"):
            raise _error(path, "a group 'examples' holding one group per client",
                         f"top-level entries {sorted(f.keys())}")
    except (DataError, *_H5_ERRORS) as e:
        f.close()
        if isinstance(e, DataError):
            raise
        raise _unreadable_h5(path, e) from e
    return f


def _client_names(path: Path, f: Any) -> set[str]:
    try:
        return set(f["examples"].keys())
    except _H5_ERRORS as e:
        raise _unreadable_h5(path, e) from e


def _read_snippets(path: Path, f: Any, client: str) -> list[bytes | str]:
    where = f"examples/{client}/snippets"
    try:
        entry = f["examples"][client]
        if not hasattr(entry, "keys") or "snippets" not in entry:
            raise _error(path, f"a dataset {where}", "it missing")
        data = entry["snippets"]
        if not hasattr(data, "dtype") or data.dtype.kind not in "SOU" or data.ndim != 1:
            raise _error(path, f"{where} to be a 1-d array of byte strings",
                         f"dtype {getattr(data, 'dtype', type(data).__name__)} and shape "
                         f"{getattr(data, 'shape', None)}")
        values = data[()].tolist()
    except _H5_ERRORS as e:
        raise _unreadable_h5(path, e) from e
    if not all(isinstance(v, bytes | str) for v in values):
        raise _error(path, f"{where} to hold strings", "other objects")
    return values


def _load_tff(base: Path, num_clients: int) -> tuple[list[str], list[ClientSplit],
                                                      list[ClientSplit]]:
    paths = _tff_paths(base)
    files = {split: _open_h5(p) for split, p in paths.items()}
    try:
        clients = {s: _client_names(paths[s], f) for s, f in files.items()}
        common = sorted(clients["train"] & clients["test"])
        if len(common) < num_clients:
            raise _error(base, f"at least {num_clients} clients present in both "
                         f"{TFF_FILES['train']} and {TFF_FILES['test']}",
                         f"only {len(common)} ({len(clients['train'])} in train, "
                         f"{len(clients['test'])} in test)")
        ids = common[:num_clients]
        splits = {}
        for split, f in files.items():
            splits[split] = [ClientSplit(*snippet_windows(_read_snippets(paths[split], f, c)))
                             for c in ids]
    finally:
        for f in files.values():
            f.close()
    return ids, splits["train"], splits["test"]


# ----------------------------------------------------------------------------- LEAF json

_LEAF_FORMAT = ('a LEAF json object {"users": [...], "num_samples": [...], "user_data": '
                '{user: {"x": [80-character strings], "y": [next characters]}}}')


def _read_leaf_file(path: Path) -> dict[str, tuple[list[str], list[str]]]:
    try:
        blob = json.loads(path.read_bytes())
    except OSError as e:
        raise _error(path, "a readable LEAF json file", f"an unreadable file ({e})") from e
    except ValueError as e:
        raise _error(path, f"valid JSON: {_LEAF_FORMAT}", f"invalid JSON ({e})") from e
    if not isinstance(blob, dict) or not isinstance(blob.get("user_data"), dict) \
            or not isinstance(blob.get("users"), list):
        found = (f"the keys {sorted(blob)}" if isinstance(blob, dict)
                 else f"a top-level {type(blob).__name__}")
        raise _error(path, _LEAF_FORMAT, found)
    out = {}
    for user in blob["users"]:
        entry = blob["user_data"].get(user) if isinstance(user, str) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("x"), list) \
                or not isinstance(entry.get("y"), list):
            raise _error(path, f"'user_data'[{user!r}] with lists 'x' and 'y'",
                         "it missing or malformed")
        out[user] = (entry["x"], entry["y"])
    return out


def _read_leaf_split(folder: Path) -> dict[str, tuple[Path, list[str], list[str]]]:
    if not folder.is_dir():
        raise _error(folder, "a folder of LEAF Shakespeare json files (*.json)",
                     "no such folder" if not folder.exists() else "a file, not a folder")
    files = sorted(p for p in folder.glob("*.json") if p.is_file())
    if not files:
        raise _error(folder, "at least one LEAF Shakespeare *.json file", "no .json files")
    users: dict[str, tuple[Path, list[str], list[str]]] = {}
    for path in files:
        for user, (xs, ys) in _read_leaf_file(path).items():
            if user in users:
                raise _error(path, "each user in only one file of a split",
                             f"user {user!r} also in {users[user][0].name}")
            users[user] = (path, xs, ys)
    return users


def _leaf_split(user: str, path: Path, xs: list[str], ys: list[str]) -> ClientSplit:
    try:
        return ClientSplit(*leaf_windows(xs, ys))
    except ValueError as e:
        raise _error(path, f"'user_data'[{user!r}]: 'x' of {SEQ_LEN}-character strings and "
                     "'y' of single characters, equally many", str(e)) from e


def _load_leaf(base: Path, num_clients: int) -> tuple[list[str], list[ClientSplit],
                                                       list[ClientSplit]]:
    train = _read_leaf_split(base / "train")
    test = _read_leaf_split(base / "test")
    common = sorted(u for u in set(train) & set(test) if train[u][1] and test[u][1])
    if len(common) < num_clients:
        raise _error(base, f"at least {num_clients} users with samples in both train/ and "
                     "test/", f"only {len(common)}")
    ids = common[:num_clients]
    return (ids, [_leaf_split(u, *train[u]) for u in ids],
            [_leaf_split(u, *test[u]) for u in ids])


# ----------------------------------------------------------------------------- loading

SOURCES = ("auto", "tff", "leaf")


def load_shakespeare(root: str | os.PathLike, num_clients: int, frac_unseen: float = 0.0,
                     source: str = "auto", download: bool = True,
                     base_url: str | None = None) -> FederatedData:
    """The first `num_clients` Shakespeare clients as 80-id windows (task "text").

    `source` "auto" reads TFF's h5 files when both are there, else LEAF's json folders,
    else (with `download`) fetches TFF's archive into ROOT/shakespeare/.
    """
    if source not in SOURCES:
        raise InputError(f"source must be one of {SOURCES}; got {source!r}")
    if int(num_clients) != num_clients or num_clients < 1:
        raise InputError(f"num_clients must be a positive integer; got {num_clients!r}")
    num_clients = int(num_clients)
    check_frac_unseen(frac_unseen)
    base = Path(root) / "shakespeare"
    have_tff = all(p.is_file() for p in _tff_paths(base).values())
    if source == "auto":
        if have_tff:
            source = "tff"
        elif (base / "train").is_dir() or (base / "test").is_dir():
            source = "leaf"
        else:
            source = "tff"
    if source == "tff" and not have_tff and download:
        download_shakespeare(root, base_url=base_url)
    load = _load_tff if source == "tff" else _load_leaf
    ids, train, test = load(base, num_clients)
    return hold_out_unseen(ids, train, test, frac_unseen, name="shakespeare",
                           num_classes=VOCAB_SIZE, input_shape=(SEQ_LEN,), task="text")


# ----------------------------------------------------------------------------- download

def shakespeare_url(base_url: str | None = None) -> str:
    """The argument wins over $FEDEQ_SHAKESPEARE_URL, which wins over TFF's bucket."""
    base = base_url or os.environ.get(URL_ENV) or DEFAULT_BASE_URL
    return base.rstrip("/") + "/" + ARCHIVE


def _fetch(url: str, dest: Path, timeout: float, progress: bool) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as f:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=ARCHIVE, disable=None if progress else True) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))


def _extract_h5(archive: Path, into: Path) -> None:
    """Copies out only the two h5 files, wherever they sit in the archive, as plain files
    written by us: no member name is ever used as a path."""
    wanted = set(TFF_FILES.values())
    found = set()
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            name = Path(member.name).name
            if member.isfile() and name in wanted and name not in found:
                src = tar.extractfile(member)
                with src, open(into / name, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                found.add(name)
    if found != wanted:
        raise tarfile.TarError(f"the archive lacks {sorted(wanted - found)}")


def download_shakespeare(root: str | os.PathLike, base_url: str | None = None,
                         timeout: float = 60.0, progress: bool = True) -> Path:
    """Makes sure ROOT/shakespeare/ holds TFF's two h5 files, downloading them if needed.

    Everything is written in a hidden temporary folder beside ROOT/shakespeare and moved
    into place only when complete, so an interrupted download never leaves a file the
    loader would trust. Raises DataError (what, where, how to get it by hand) on failure.
    """
    base = Path(root) / "shakespeare"
    targets = _tff_paths(base)
    if all(p.is_file() for p in targets.values()):
        return base
    url = shakespeare_url(base_url)
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".shakespeare.download-", dir=root))
    except OSError as e:
        raise _error(root, "a writable folder to download Shakespeare into",
                     f"it cannot be created or written ({e})") from e
    try:
        archive = tmp / ARCHIVE
        try:
            _fetch(url, archive, timeout, progress)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            raise _error(base, f"{TFF_FILES['train']} and {TFF_FILES['test']}, or a "
                         f"download of {url}", f"neither, and the download failed ({e})"
                         ) from e
        unpacked = tmp / "shakespeare"
        unpacked.mkdir()
        try:
            _extract_h5(archive, unpacked)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise _error(url, f"a tar archive holding {TFF_FILES['train']} and "
                         f"{TFF_FILES['test']}", f"an unusable archive ({e})") from e
        if not base.exists():
            try:
                os.rename(unpacked, base)
            except OSError:
                if not base.is_dir():  # another process may have finished first
                    raise
        if not all(p.is_file() for p in targets.values()):
            # ROOT/shakespeare already held other things: move the files in one by one,
            # the training file last, because the loader looks for both.
            for split in ("test", "train"):
                os.replace(unpacked / TFF_FILES[split], targets[split])
        return base
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
