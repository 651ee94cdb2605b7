"""InCo Aggregation's client partitions of a pooled training set (inco spec section 3.3).

Three methods, as ``--partition``:

* ``hetero-fixed``: the authors' fixed Dirichlet partitions, read from their ``.npy`` files
  (``fix_distribution/hetero-fix-100-{alpha}.npy`` in their repository) or from a JSON copy
  (``{"clients": {"0": [...], ...}}``). This is what the paper's numbers were trained on.
* ``hetero``: the NIID-Bench Dirichlet procedure the authors' code meant to run (it crashes
  as released, spec section 10.1), here with a seeded ``np.random.RandomState``.
* ``homo``: a seeded random permutation cut into near-equal contiguous chunks.

**Why a hand-made unpickler.** The authors' ``.npy`` holds a pickled Python dict, and
``np.load(allow_pickle=True)`` would run whatever a file's pickle asks for. Such a file is
a 0-d object array; the pickle names exactly three globals (numpy's ``_reconstruct``,
``ndarray`` and ``dtype``, checked on the real files). ``_PartitionUnpickler`` resolves
those three to inert stand-ins of ours that only accept the arguments an object array of
one element is rebuilt from, so no numpy (or any other) code runs on the file's say-so;
every other global is refused. The payload can then only be built from pickle's own
containers and literals, and it is accepted only if it is a dict of int -> list of int.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data.errors import DataError
from utils.input_error import InputError

INCO_PARTITIONS: tuple[str, ...] = ("hetero-fixed", "hetero", "homo")

# NIID-Bench keeps drawing until every client holds at least this many examples.
MIN_CLIENT_SIZE = 10

PARTITION_HOW_TO_GET = (
    "pass --partition_file with the authors' fixed partition: their repository "
    "ChanYunHin/InCo-Aggregation ships fed_experiments/InCo/fix_distribution/"
    "hetero-fix-100-{0.5,1.0}.npy (CIFAR-10, also used for FMNIST), "
    "SVHN_hetero-fix-100-{alpha}.npy and cinic10_hetero-fix-100-{alpha}.npy; this project's "
    "shared folder holds the CIFAR-10 ones (shared/data/inco/cifar10_hetero-fix-100-"
    "{0.5,1.0}.npy and the JSON copies cifar10_hetero_fixed_alpha{0.5,1.0}_100clients.json); "
    "they are not part of the repository. Or use --partition hetero / homo, drawn from --seed"
)


# --------------------------------------------------------------------- restricted unpickler


class _Refused(pickle.UnpicklingError):
    """Raised inside the unpickler; turned into a DataError by the reader."""


class _NdarrayType:
    """Stands in for ``numpy.ndarray``: only ever passed to ``_reconstruct``."""


_NDARRAY = _NdarrayType()


class _ObjectDtype:
    """Stands in for ``numpy.dtype('O')``; checks the state numpy pickles for it."""

    # (version, byte order, subarray, names, fields, elsize, alignment, flags) of dtype('O')
    # as every numpy since 1.x pickles it; the flags (63) mark an object dtype.
    _STATE = (3, "|", None, None, None, -1, -1, 63)

    def __setstate__(self, state: Any) -> None:
        if state != self._STATE:
            raise _Refused(f"object dtype state {state!r} is not numpy's dtype('O')")


class _ObjectArray:
    """Stands in for the 0-d object array; keeps its single element as ``item``."""

    item: Any = None

    def __setstate__(self, state: Any) -> None:
        # numpy pickles (version, shape, dtype, fortran, data); for an object array the
        # data is a list of the elements, here exactly one (a 0-d array).
        if (not isinstance(state, tuple) or len(state) != 5 or state[0] != 1
                or state[1] != () or not isinstance(state[2], _ObjectDtype)
                or state[3] is not False or not isinstance(state[4], list)
                or len(state[4]) != 1):
            raise _Refused("the array in the file is not a 0-d object array of one object")
        self.item = state[4][0]


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _ObjectArray:
    if cls is not _NDARRAY or shape != (0,) or typecode != b"b":
        raise _Refused(f"unexpected array reconstruction arguments {(shape, typecode)!r}")
    return _ObjectArray()


def _dtype(spec: Any, align: Any = False, copy: Any = True) -> _ObjectDtype:
    if spec != "O8" or align is not False or copy is not True:
        raise _Refused(f"dtype {spec!r} is not the object dtype of a pickled dict")
    return _ObjectDtype()


_STAND_INS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    # numpy < 2 pickles numpy.core, numpy >= 2 numpy._core: the same function.
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
}


class _PartitionUnpickler(pickle.Unpickler):
    """Resolves only the three numpy names of a pickled object array, to inert stand-ins."""

    def find_class(self, module: str, name: str) -> Any:
        stand_in = _STAND_INS.get((module, name))
        if stand_in is None:
            raise _Refused(f"refusing to load {module}.{name} from a partition file")
        return stand_in

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("refusing a persistent id in a partition file")


# ------------------------------------------------------------------------------ readers


def _error(path: str | os.PathLike, expected: str, found: str | None = None) -> DataError:
    return DataError(str(path), expected, PARTITION_HOW_TO_GET, found)


def _as_index_lists(blob: Any, path: str | os.PathLike, key_kind: type) -> dict[int, list[int]]:
    """Check a {client: [indices]} mapping (int keys for .npy, decimal str for JSON)."""
    expected = ("a dict client index -> list of int training-set indices"
                if key_kind is int else 'a "clients" object "0".."N-1" -> lists of int indices')
    if not isinstance(blob, dict):
        raise _error(path, expected, f"a {type(blob).__name__}")
    out: dict[int, list[int]] = {}
    for key, value in blob.items():
        if key_kind is int:
            ok = type(key) is int
            client = key if ok else -1
        else:
            ok = isinstance(key, str) and key.isascii() and key.isdigit()
            client = int(key) if ok else -1
        if not ok:
            raise _error(path, expected, f"the client key {key!r}")
        if client in out:
            raise _error(path, expected, f"client {client} listed twice")
        if not isinstance(value, list) or any(type(v) is not int for v in value):
            bad = (type(value).__name__ if not isinstance(value, list)
                   else next(type(v).__name__ for v in value if type(v) is not int))
            raise _error(path, expected, f"client {key!r} holding a {bad}, not only ints")
        out[client] = value
    return out


def read_partition_npy(path: str | os.PathLike) -> dict[int, list[int]]:
    """The authors' ``.npy`` partition as {client: [indices]}, without trusting its pickle."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"unsupported .npy format version {version}")
            except OSError:
                raise
            except Exception as e:  # numpy's header parser: ValueError, SyntaxError, TokenError
                raise _error(path, "a .npy file (format 1.0 or 2.0) holding a pickled dict",
                             f"an unreadable header ({type(e).__name__}: {e})") from e
            if shape != () or fortran or dtype != np.dtype(object):
                raise _error(path, "a .npy file of one pickled object (shape (), dtype object)",
                             f"an array of shape {shape} and dtype {dtype}")
            payload = f.read()
    except FileNotFoundError as e:
        raise _error(path, "the fixed partition file", "no such file") from e
    except IsADirectoryError as e:
        raise _error(path, "the fixed partition file", "a folder") from e
    except OSError as e:
        raise _error(path, "a readable partition file", f"an unreadable file ({e})") from e
    try:
        array = _PartitionUnpickler(io.BytesIO(payload)).load()
    except _Refused as e:
        raise _error(path, "a pickle of a numpy object array holding only dicts, lists and "
                     "ints", f"something else: {e}") from e
    except Exception as e:  # a malformed pickle can raise almost anything
        raise _error(path, "a pickle of a numpy object array holding a dict",
                     f"an unreadable pickle ({type(e).__name__}: {e})") from e
    if not isinstance(array, _ObjectArray):
        raise _error(path, "a pickled numpy object array", f"a pickled {type(array).__name__}")
    return _as_index_lists(array.item, path, int)


def read_partition_json(path: str | os.PathLike) -> dict[int, list[int]]:
    """The JSON copy ``{"clients": {"0": [...], ...}}`` as {client: [indices]}."""
    path = Path(path)
    try:
        blob = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise _error(path, "the fixed partition file", "no such file") from e
    except IsADirectoryError as e:
        raise _error(path, "the fixed partition file", "a folder") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _error(path, "a JSON file", f"an unreadable file ({e})") from e
    if not isinstance(blob, dict) or "clients" not in blob:
        raise _error(path, 'a JSON object with a "clients" field',
                     "no such field" if isinstance(blob, dict) else f"a {type(blob).__name__}")
    return _as_index_lists(blob["clients"], path, str)


def read_partition_file(path: str | os.PathLike) -> dict[int, list[int]]:
    """``.json`` files are read as the JSON copy, anything else as the authors' ``.npy``."""
    if Path(path).suffix.lower() == ".json":
        return read_partition_json(path)
    return read_partition_npy(path)


def check_partition(clients: Mapping[int, Sequence[int]], num_clients: int, n_train: int,
                    path: str | os.PathLike, exact: bool = True) -> list[np.ndarray]:
    """Client lists 0..N-1 in order, after checking they partition the training set.

    Each index must lie in ``[0, n_train)`` and belong to one client only, and no client may
    be empty. With ``exact`` every index must also be used (the authors' files are exact
    partitions); without it a subset is accepted (FMNIST runs on the CIFAR-10 file, whose
    indices stop at 50,000, spec section 10.2).
    """
    keys = sorted(clients)
    if len(keys) != num_clients:
        raise _error(path, f"a partition into {num_clients} clients (--num_clients)",
                     f"{len(keys)} clients")
    if keys != list(range(num_clients)):
        raise _error(path, f"clients numbered 0..{num_clients - 1}",
                     f"client numbers {keys[0]}..{keys[-1]} with gaps")
    parts = []
    for k in keys:
        try:
            parts.append(np.asarray(clients[k], dtype=np.int64).reshape(-1))
        except (OverflowError, TypeError, ValueError) as e:  # 2**70, or not integers at all
            raise _error(path, f"indices in [0, {n_train}) (the training set's size)",
                         f"client {k} holding {type(e).__name__}: {e}") from e
    for k, p in enumerate(parts):
        if p.size == 0:
            raise _error(path, "every client to hold at least one example", f"client {k} empty")
        if p.min() < 0 or p.max() >= n_train:
            raise _error(path, f"indices in [0, {n_train}) (the training set's size)",
                         f"client {k} holding indices in [{p.min()}, {p.max()}]")
    flat = np.concatenate(parts)
    counts = np.bincount(flat, minlength=n_train)
    if counts.max() > 1:
        dup = int(np.argmax(counts > 1))
        owners = [k for k, p in enumerate(parts) if dup in p]
        raise _error(path, "each training index in at most one client",
                     f"{int((counts > 1).sum())} repeated indices, e.g. {dup} in clients "
                     f"{owners}")
    if exact and len(flat) != n_train:
        missing = np.flatnonzero(counts == 0)
        raise _error(path, f"every one of the {n_train} training indices exactly once",
                     f"{len(missing)} indices in no client, e.g. {missing[:5].tolist()}")
    return parts


# ---------------------------------------------------------------------- drawn partitions


def _check_seed(seed: int) -> int:
    if int(seed) != seed or not 0 <= seed < 2**32:
        raise InputError(f"seed must be an integer in [0, 2**32); got {seed!r}")
    return int(seed)


def _check_clients(num_clients: int) -> int:
    if int(num_clients) != num_clients or num_clients < 1:
        raise InputError(f"num_clients must be a positive integer; got {num_clients!r}")
    return int(num_clients)


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                        num_classes: int | None = None, min_size: int = MIN_CLIENT_SIZE,
                        max_tries: int = 10_000) -> list[np.ndarray]:
    """NIID-Bench's Dirichlet label skew (spec 3.3 ``hetero``), from ``RandomState(seed)``.

    Each try: for every class (0..C-1) shuffle its indices, draw client shares from
    Dir(alpha), zero the shares of clients already holding >= N/n examples (the balance
    cap), renormalise, and cut the class at ``floor(cumsum * size)``; retry until the
    smallest client has ``min_size`` examples; finally shuffle each client. The original
    loops forever when that cannot happen, so here ``max_tries`` bounds it.
    """
    labels = np.asarray(labels).reshape(-1)
    if labels.size and labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers; got dtype {labels.dtype}")
    n_clients = _check_clients(num_clients)
    rng = np.random.RandomState(_check_seed(seed))
    alpha = float(alpha)
    if not alpha > 0 or not np.isfinite(alpha):
        raise InputError(f"alpha must be a positive number; got {alpha!r}")
    n_train = len(labels)
    if n_train < min_size * n_clients:
        raise InputError(f"{n_train} examples cannot give each of {n_clients} clients at "
                         f"least {min_size}; use fewer clients (--num_clients)")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be >= 0; got {labels.min()}")
    n_classes = int(labels.max(initial=-1)) + 1 if num_classes is None else int(num_classes)
    by_class = [np.flatnonzero(labels == k) for k in range(n_classes)]
    cap = n_train / n_clients
    for _ in range(max_tries):
        pieces: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        sizes = np.zeros(n_clients, dtype=np.int64)
        for idx in by_class:
            idx = idx.copy()
            rng.shuffle(idx)
            share = rng.dirichlet(np.full(n_clients, alpha))
            share = share * (sizes < cap)
            share = share / share.sum()
            cuts = (np.cumsum(share) * len(idx)).astype(np.int64)[:-1]
            for j, piece in enumerate(np.split(idx, cuts)):
                pieces[j].append(piece)
                sizes[j] += len(piece)
        if sizes.min() >= min_size:
            break
    else:
        raise InputError(f"no Dirichlet(alpha={alpha}) partition into {n_clients} clients "
                         f"with at least {min_size} examples each after {max_tries} tries; "
                         f"use a larger alpha or fewer clients")
    parts = []
    for client in pieces:
        joined = np.concatenate(client).astype(np.int64)
        rng.shuffle(joined)
        parts.append(joined)
    return parts


def homo_partition(n_train: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """A ``RandomState(seed)`` permutation of all indices cut by ``np.array_split``."""
    n_clients = _check_clients(num_clients)
    if n_train < n_clients:
        raise InputError(f"{n_train} examples cannot give each of {n_clients} clients one; "
                         f"use fewer clients (--num_clients)")
    perm = np.random.RandomState(_check_seed(seed)).permutation(int(n_train))
    return [p.astype(np.int64) for p in np.array_split(perm, n_clients)]


def partition_arrays(parts: Sequence[np.ndarray], method: str, alpha: float,
                     seed: int) -> dict[str, np.ndarray]:
    """Flat arrays for the run directory's ``partition.npz`` (concatenated + offsets, like
    ``data.partition.ShardPartition.to_arrays``): clients hold different counts."""
    sizes = np.asarray([len(p) for p in parts], dtype=np.int64)
    return {
        "train_indices": (np.concatenate(parts).astype(np.int64) if len(parts)
                          else np.zeros(0, np.int64)),
        "train_offsets": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        "method": np.asarray(method),
        "alpha": np.asarray(alpha, dtype=np.float64),
        "seed": np.asarray(seed, dtype=np.int64),
    }
