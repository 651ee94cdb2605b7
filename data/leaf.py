"""FEMNIST from LEAF's json output, with LEAF's own per-writer train/test split.

The reference's FEMNIST pickles cannot be obtained (spec section 6.3), so we regenerate
the data the way its README describes: LEAF's FEMNIST, 28x28x1 in [0, 1], the natural
writers as clients, and the first ``num_clients`` of them. "First" is defined here as
sorted writer-id order, so the selection does not depend on how LEAF happened to split its
output across files.

Parsing the json dominates the load time (the 396-writer sample is ~285 MB of text); the
fast ``orjson`` parser is used when it is installed, the standard library otherwise.
Each file is turned into float32 arrays as soon as it is parsed so that peak memory stays
near one file's worth of Python objects, even for LEAF outputs split over many files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from data.errors import DataError
from data.federated import ClientSplit, FederatedData, check_frac_unseen, hold_out_unseen
from utils.input_error import InputError

try:  # orjson is ~2x faster than json on LEAF's huge float arrays.
    import orjson

    _json_loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - depends on the environment
    _json_loads = json.loads

FEMNIST_NUM_CLASSES = 62
FEMNIST_INPUT_SHAPE = (28, 28, 1)
_PIXELS = 28 * 28

FEMNIST_HOW_TO_GET = (
    "in a checkout of LEAF (github.com/TalwalkarLab/leaf), run "
    "`./preprocess.sh -s niid --sf 0.05 -k 0 -t sample` inside data/femnist, then copy "
    "its data/train/*.json and data/test/*.json to DATA_DIR/femnist/train/ and "
    "DATA_DIR/femnist/test/; or point --data_dir at a folder that already has "
    "femnist/train/*.json and femnist/test/*.json"
)

_LEAF_FORMAT = (
    'a LEAF json object {"users": [...], "num_samples": [...], '
    '"user_data": {user: {"x": [[784 floats], ...], "y": [int, ...]}}}'
)


def _error(path: Path | str, expected: str, found: str | None = None) -> DataError:
    return DataError(str(path), expected, FEMNIST_HOW_TO_GET, found)


def _writer_split(path: Path, user: str, x_raw: Any, y_raw: Any) -> ClientSplit:
    """Convert one writer's json lists to arrays, checking what training relies on."""
    where = f"user_data[{user!r}]"
    try:
        x = np.asarray(x_raw, dtype=np.float32)
    except (TypeError, ValueError):
        x = None
    if x is not None and x.size == 0:
        x = x.reshape(0, _PIXELS)
    if x is None or x.ndim != 2 or x.shape[1] != _PIXELS:
        bad = _describe_bad_rows(x_raw)
        raise _error(path, f"{where}['x'] to be a list of rows of {_PIXELS} numbers", bad)
    if x.size and not (np.all(np.isfinite(x)) and x.min() >= 0.0 and x.max() <= 1.0):
        raise _error(
            path,
            f"{where}['x'] pixel values in [0, 1] (LEAF's FEMNIST)",
            f"values in [{np.nanmin(x)}, {np.nanmax(x)}] or non-finite values",
        )
    try:
        y = np.asarray(y_raw)
    except (TypeError, ValueError, OverflowError):  # ragged or nested lists
        y = np.asarray([], dtype=object)
    if y.size == 0 and y.dtype != object:
        y = y.astype(np.int32).reshape(0)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise _error(path, f"{where}['y'] to be a flat list of integer labels",
                     f"an array of dtype {y.dtype} and shape {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= FEMNIST_NUM_CLASSES):
        raise _error(path, f"{where}['y'] labels in [0, {FEMNIST_NUM_CLASSES})",
                     f"labels in [{y.min()}, {y.max()}]")
    if len(y) != len(x):
        raise _error(path, f"{where}['x'] and ['y'] of equal length",
                     f"{len(x)} rows and {len(y)} labels")
    return ClientSplit(x=x.reshape((-1, *FEMNIST_INPUT_SHAPE)), y=y.astype(np.int32))


def _describe_bad_rows(x_raw: Any) -> str:
    """Say which row is wrong; only runs on the error path, so a Python loop is fine."""
    if not isinstance(x_raw, list):
        return f"a {type(x_raw).__name__}"
    for i, row in enumerate(x_raw):
        if not isinstance(row, list):
            return f"row {i} is a {type(row).__name__}, not a list"
        if len(row) != _PIXELS:
            return f"row {i} of length {len(row)}"
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in row):
            return f"a non-numeric value in row {i}"
    return "rows that are not numeric"


def _read_file(path: Path) -> dict[str, ClientSplit]:
    """Parse one LEAF json file into per-writer arrays."""
    try:
        blob = _json_loads(path.read_bytes())
    except OSError as e:
        raise _error(path, "a readable LEAF json file", f"an unreadable file ({e})") from e
    except ValueError as e:  # json.JSONDecodeError and orjson.JSONDecodeError
        raise _error(path, f"valid JSON: {_LEAF_FORMAT}", f"invalid JSON ({e})") from e
    if not isinstance(blob, dict):
        raise _error(path, _LEAF_FORMAT, f"a top-level {type(blob).__name__}")
    for key in ("users", "num_samples", "user_data"):
        if key not in blob:
            raise _error(path, f"top-level key {key!r} in {_LEAF_FORMAT}",
                         f"only the keys {sorted(blob)}")
    users, num_samples, user_data = blob["users"], blob["num_samples"], blob["user_data"]
    if not isinstance(users, list) or not isinstance(num_samples, list):
        raise _error(path, "'users' and 'num_samples' to be lists",
                     f"{type(users).__name__} and {type(num_samples).__name__}")
    if len(users) != len(num_samples):
        raise _error(path, "one 'num_samples' entry per entry of 'users'",
                     f"{len(users)} users and {len(num_samples)} counts")
    if not isinstance(user_data, dict):
        raise _error(path, "'user_data' to be an object keyed by user",
                     f"a {type(user_data).__name__}")

    out: dict[str, ClientSplit] = {}
    for user, n in zip(users, num_samples, strict=True):
        entry = user_data.get(user) if isinstance(user, str) else None
        if not isinstance(entry, dict):
            raise _error(path, f"key 'user_data'[{user!r}] (listed in 'users') holding 'x' "
                         "and 'y'", "it missing or not an object")
        for key in ("x", "y"):
            if key not in entry:
                raise _error(path, f"key 'user_data'[{user!r}][{key!r}]",
                             f"only the keys {sorted(entry)}")
        if user in out:
            raise _error(path, "each user listed once in 'users'", f"{user!r} twice")
        split = _writer_split(path, user, entry["x"], entry["y"])
        if split.n != n:
            raise _error(path, f"'num_samples' for {user!r} to equal its number of labels",
                         f"num_samples={n} but {split.n} labels")
        out[user] = split
    return out


def _read_split(folder: Path) -> dict[str, tuple[Path, ClientSplit]]:
    """Merge every json file of one split (train or test) into one writer -> data map."""
    if not folder.is_dir():
        raise _error(folder, "a folder of LEAF FEMNIST json files (*.json)",
                     "no such folder" if not folder.exists() else "a file, not a folder")
    files = sorted(p for p in folder.glob("*.json") if p.is_file())
    if not files:
        raise _error(folder, "at least one LEAF FEMNIST *.json file", "no .json files")
    writers: dict[str, tuple[Path, ClientSplit]] = {}
    for path in files:
        for user, split in _read_file(path).items():
            if user in writers:
                # Two copies of a writer (e.g. a stray backup file) would double-count it.
                raise _error(path, "each writer in only one file of a split",
                             f"writer {user!r} also in {writers[user][0].name}")
            writers[user] = (path, split)
    return writers


def load_femnist(root: str, num_clients: int, frac_unseen: float = 0.0) -> FederatedData:
    """Load the first ``num_clients`` FEMNIST writers (sorted id order) from LEAF json.

    Only writers present in both ``root/femnist/train`` and ``root/femnist/test`` are
    eligible, because every client needs a personal test split for the per-client
    accuracy the paper reports. The last ``int(frac_unseen * num_clients)`` of the chosen
    writers become unseen clients (reference section 2.1).
    """
    if int(num_clients) != num_clients or num_clients < 1:
        raise InputError(f"num_clients must be a positive integer; got {num_clients!r}")
    num_clients = int(num_clients)
    check_frac_unseen(frac_unseen)
    base = Path(root) / "femnist"
    train = _read_split(base / "train")
    test = _read_split(base / "test")
    common = sorted(set(train) & set(test))
    if len(common) < num_clients:
        raise _error(
            base,
            f"at least {num_clients} writers present in both train/ and test/",
            f"only {len(common)} such writers ({len(train)} in train, {len(test)} in test)",
        )
    ids = common[:num_clients]
    return hold_out_unseen(
        ids,
        [train[u][1] for u in ids],
        [test[u][1] for u in ids],
        frac_unseen,
        name="femnist",
        num_classes=FEMNIST_NUM_CLASSES,
        input_shape=FEMNIST_INPUT_SHAPE,
    )
