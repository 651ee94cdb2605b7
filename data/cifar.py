"""CIFAR-10 / CIFAR-100 as federated datasets: the official pickles (or tfds), sharded.

The reference trains on pre-partitioned files that cannot be obtained (spec 6.1, 6.3), so
the clients are rebuilt from the official data with the labels-per-client shard procedure
of spec 6.2 (``data.partition``). Choices of ours, which the spec leaves open:

* **Source.** By default the official python pickles under ``--data_dir``:
  ``ROOT/cifar10/cifar-10-batches-py/{data_batch_1..5,test_batch}`` and
  ``ROOT/cifar100/cifar-100-python/{train,test}`` (fine labels), fetched by
  ``data.download`` when missing. They are read with a restricted unpickler that only
  rebuilds numpy arrays (a mirror set via ``FEDEQ_CIFAR_URL`` cannot run code), and
  neither the ``filenames`` key nor per-file checksums are required (the offline copy this
  project is tested with has no ``filenames``). ``source="tfds"`` loads the same sets
  through tensorflow_datasets instead; its example order is tfds's, so the same seed gives
  a different partition there.
* **Normalisation.** Per channel, ``(pixel / 255 - mean) / std`` with FIXED constants, the
  per-channel mean and (population) standard deviation of each training set, over all
  pixels, to 4 decimals (spec 6.3: "normalised, probably per channel", because the original
  sampler works on torchvision datasets). Fixed constants make every client's inputs the
  same function of its pixels, whatever the partition.

  - CIFAR-10: mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616). Recomputed here
    from the official training batches (0.49140, 0.48216, 0.44653 / 0.24703, 0.24348,
    0.26159).
  - CIFAR-100: mean (0.5071, 0.4865, 0.4409), std (0.2673, 0.2564, 0.2762): the widely
    published statistics of its training set (CIFAR-100 was not available offline here to
    recompute them).

  No augmentation: the reference code does none (spec 6.1).
* **Clients.** ``num_clients`` clients are partitioned directly (the reference's CIFAR-10
  file always has 100 clients and ``-c`` takes the first ones; with the default 100 the two
  agree). The last ``int(frac_unseen * num_clients)`` of them are the unseen clients.
"""

from __future__ import annotations

import importlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.download import cifar_folder, download_cifar, how_to_get
from data.errors import DataError
from data.federated import ClientSplit, FederatedData, check_frac_unseen, hold_out_unseen
from data.partition import shard_partition
from utils.input_error import InputError, input_errors

CIFAR_INPUT_SHAPE = (32, 32, 3)
_PIXELS = 32 * 32 * 3

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

SOURCES = ("pickle", "tfds")


@dataclass(frozen=True)
class CifarSpec:
    """What differs between CIFAR-10 and CIFAR-100 in the official pickle layout."""

    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


SPECS: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                         b"labels", 10, CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": CifarSpec(("train",), ("test",), b"fine_labels", 100,
                          CIFAR100_MEAN, CIFAR100_STD),
}

# (module, name) pairs an official (or numpy-pickled) CIFAR batch needs; nothing else may
# be resolved, so unpickling a file cannot import or call arbitrary code.
_ALLOWED_GLOBALS = {
    (mod, name)
    for core in ("numpy.core", "numpy._core")
    for mod, name in ((f"{core}.multiarray", "_reconstruct"), (f"{core}.multiarray", "scalar"),
                      (f"{core}.numeric", "_frombuffer"))
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def _spec(name: str) -> CifarSpec:
    if name not in SPECS:
        raise ValueError(f"unknown CIFAR variant {name!r}; choose one of {sorted(SPECS)}")
    return SPECS[name]


def _get(blob: dict, key: bytes) -> Any:
    # Official files have bytes keys; a re-pickled copy from Python 3 may have str keys.
    return blob[key] if key in blob else blob.get(key.decode())


def _read_batch(path: Path, spec: CifarSpec, root: str | os.PathLike,
                name: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickle file -> (uint8 NHWC images, int64 labels), checked."""
    def error(expected: str, found: str | None = None) -> DataError:
        return DataError(str(path), expected, how_to_get(root, name), found)

    if not path.is_file():
        raise error(f"the CIFAR batch file {path.name}",
                    "no such file" if not path.exists() else "something that is not a file")
    try:
        with open(path, "rb") as f:
            blob = _ArrayUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise error("a readable CIFAR pickle", f"an unreadable file ({e})") from e
    except Exception as e:  # a malformed pickle can raise almost anything
        raise error("a python pickle of a dict (official CIFAR format)",
                    f"an unreadable pickle ({type(e).__name__}: {e})") from e
    label_key = spec.label_key.decode()
    if not isinstance(blob, dict):
        raise error(f"a pickled dict with keys b'data' and b'{label_key}'",
                    f"a pickled {type(blob).__name__}")
    data, labels = _get(blob, b"data"), _get(blob, spec.label_key)
    if data is None or labels is None:
        raise error(f"keys b'data' and b'{label_key}'",
                    f"only the keys {sorted(repr(k) for k in blob)}")
    x = np.asarray(data) if isinstance(data, np.ndarray) else None
    if x is None or x.ndim != 2 or x.shape[1] != _PIXELS or x.dtype != np.uint8:
        found = (f"a {type(data).__name__}" if x is None
                 else f"an array of shape {x.shape} and dtype {x.dtype}")
        raise error(f"b'data' to be an N x {_PIXELS} uint8 array (channel-major rows)", found)
    try:
        y = np.asarray(labels)
    except (TypeError, ValueError):
        y = np.zeros((0, 0))
    if y.ndim != 1 or (y.size and y.dtype.kind not in "iu") or len(y) != len(x):
        raise error(f"b'{label_key}' to be {len(x)} integer labels (one per row of b'data')",
                    f"{len(y) if y.ndim == 1 else 'a non-flat list of'} labels of dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= spec.num_classes):
        raise error(f"labels in [0, {spec.num_classes})", f"labels in [{y.min()}, {y.max()}]")
    # Rows are 1024 red, then 1024 green, then 1024 blue values of a 32x32 image.
    images = np.ascontiguousarray(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, y.astype(np.int64)


def _read_split(folder: Path, files: tuple[str, ...], spec: CifarSpec,
                root: str | os.PathLike, name: str) -> tuple[np.ndarray, np.ndarray]:
    parts = [_read_batch(folder / f, spec, root, name) for f in files]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def read_cifar_pickles(root: str | os.PathLike, name: str, download: bool = False,
                       base_url: str | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read the official pickles: (train images, train labels, test images, test labels).

    Images are uint8 NHWC in file order (CIFAR-10: data_batch_1..5 concatenated); labels
    are int64. With ``download`` a missing folder is fetched first (``data.download``).
    """
    spec = _spec(name)
    folder = cifar_folder(root, name)
    if not folder.is_dir():
        if download:
            download_cifar(root, name, base_url=base_url)
        else:
            raise DataError(
                str(folder),
                f"the official CIFAR python folder holding {', '.join(spec.train_files)} and "
                f"{', '.join(spec.test_files)}",
                how_to_get(root, name, base_url),
                "no such folder" if not folder.exists() else "a file, not a folder",
            )
    x_train, y_train = _read_split(folder, spec.train_files, spec, root, name)
    x_test, y_test = _read_split(folder, spec.test_files, spec, root, name)
    return x_train, y_train, x_test, y_test


def read_cifar_tfds(root: str | os.PathLike, name: str
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The same four arrays through tensorflow_datasets, cached under ``ROOT/tfds``.

    tfds is optional because it needs TensorFlow; the pickle path needs neither.
    """
    spec = _spec(name)
    data_dir = Path(root) / "tfds"
    try:
        tfds = importlib.import_module("tensorflow_datasets")
        importlib.import_module("tensorflow")
    except ImportError as e:
        raise DataError(
            str(data_dir),
            "tensorflow_datasets and tensorflow to be installed for --data_source tfds",
            "`pip install tensorflow tensorflow-datasets` (TensorFlow is a ~1.4 GB download); "
            "or use the default --data_source pickle, which reads the official CIFAR python "
            "pickles (downloaded automatically) and needs no TensorFlow",
            f"they cannot be imported ({e})",
        ) from e
    try:
        splits = tfds.load(name, split=["train", "test"], batch_size=-1, as_supervised=True,
                           data_dir=str(data_dir))
        (x_train, y_train), (x_test, y_test) = tfds.as_numpy(splits)
    except Exception as e:  # tfds raises many types (network, builder, checksum errors)
        raise DataError(str(data_dir), f"tfds to load {name}",
                        "run once with network access so that tfds can download it, or "
                        "use the default --data_source pickle",
                        f"tfds failed ({type(e).__name__}: {e})") from e
    out = []
    for x, y in ((x_train, y_train), (x_test, y_test)):
        x, y = np.asarray(x), np.asarray(y).reshape(-1)
        if x.shape[1:] != CIFAR_INPUT_SHAPE or len(x) != len(y):
            raise DataError(str(data_dir), f"{name} images of shape (N, 32, 32, 3) with one "
                            "label each", "use --data_source pickle",
                            f"images {x.shape} and {y.shape} labels")
        if y.size and (y.min() < 0 or y.max() >= spec.num_classes):
            raise DataError(str(data_dir), f"labels in [0, {spec.num_classes})",
                            "use --data_source pickle", f"labels in [{y.min()}, {y.max()}]")
        out += [x.astype(np.uint8), y.astype(np.int64)]
    return out[0], out[1], out[2], out[3]


def normalize(images: np.ndarray, name: str) -> np.ndarray:
    """uint8 NHWC -> float32 ``(pixel / 255 - mean) / std`` per channel (module docstring)."""
    spec = _spec(name)
    mean = np.asarray(spec.mean, np.float32)
    std = np.asarray(spec.std, np.float32)
    return ((images.astype(np.float32) / np.float32(255.0) - mean) / std).astype(np.float32)


def load_cifar(root: str | os.PathLike, name: str, num_clients: int = 100,
               frac_unseen: float = 0.0, seed: int = 0, labels_per_client: int = 5,
               source: str = "pickle", download: bool = True) -> FederatedData:
    """CIFAR-10/100 split into ``num_clients`` labels-per-client shard clients.

    The partition (label table and per-client indices into the train/test sets, for all
    clients, unseen ones included) is returned in ``FederatedData.partition`` so that a
    run can store it and be repeated exactly.
    """
    spec = _spec(name)
    if source not in SOURCES:
        raise InputError(f"unknown data source {source!r}; choose one of {', '.join(SOURCES)}")
    if int(num_clients) != num_clients or num_clients < 1:
        raise InputError(f"num_clients must be a positive integer; got {num_clients!r}")
    check_frac_unseen(frac_unseen)
    if source == "tfds":
        x_train, y_train, x_test, y_test = read_cifar_tfds(root, name)
    else:
        x_train, y_train, x_test, y_test = read_cifar_pickles(root, name, download=download)
    with input_errors("--num_clients and --labels_per_client: "):  # they do not fit the data
        part = shard_partition(y_train, y_test, num_clients=int(num_clients),
                               labels_per_client=labels_per_client, seed=seed,
                               num_classes=spec.num_classes)
    # Normalise per client, so that only the float32 copies the clients keep are made.
    train = [ClientSplit(normalize(x_train[i], name), y_train[i].astype(np.int32))
             for i in part.train]
    test = [ClientSplit(normalize(x_test[i], name), y_test[i].astype(np.int32))
            for i in part.test]
    width = max(3, len(str(num_clients - 1)))
    ids = [f"client_{k:0{width}d}" for k in range(int(num_clients))]
    data = hold_out_unseen(ids, train, test, frac_unseen, name=name,
                           num_classes=spec.num_classes, input_shape=CIFAR_INPUT_SHAPE)
    data.partition = part.to_arrays()
    return data
