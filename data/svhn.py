"""SVHN (cropped digits) from the official MATLAB files ``train_32x32.mat``/``test_32x32.mat``.

The files are MATLAB v5 MAT-files holding ``X`` (32 x 32 x 3 x N uint8, column-major) and
``y`` (N x 1, digits 1..10 where 10 stands for 0). They are read with ``scipy.io.loadmat``:
SciPy is always installed because JAX depends on it, so no MAT reader of our own is
needed. Label 10 becomes 0, as torchvision's SVHN (and so InCo, spec 3.1) does, and the
image order is the file's, which the authors' fixed partitions index.

Normalisation (spec 3.2) is ``(pixel / 255 - 0.5) / 0.5`` on every channel.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from data.errors import DataError

SVHN_BASE_URL = "http://ufldl.stanford.edu/housenumbers/"
SVHN_URL_ENV = "FEDEQ_SVHN_URL"

# The official files and their md5 sums, as published with the dataset.
SVHN_FILES: dict[str, str] = {
    "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
    "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
}

SVHN_MEAN = (0.5, 0.5, 0.5)
SVHN_STD = (0.5, 0.5, 0.5)


def svhn_how_to_get(folder: str | os.PathLike) -> str:
    """Manual steps, for machines without internet."""
    names = ", ".join(f"{n} (md5 {m})" for n, m in SVHN_FILES.items())
    return (f"download {names} from {SVHN_BASE_URL} into {folder}/; or run with network "
            f"access and they are downloaded automatically")


def read_svhn_mat(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One official file -> (uint8 N x 32 x 32 x 3 images, int64 labels in [0, 10))."""
    path = Path(path)
    how = svhn_how_to_get(path.parent)

    def error(expected: str, found: str) -> DataError:
        return DataError(str(path), expected, how, found)

    if not path.is_file():
        raise error("the official SVHN file", "no such file" if not path.exists()
                    else "something that is not a file")
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise DataError(str(path), "scipy to be installed to read MATLAB files",
                        "`pip install scipy` (JAX depends on it, so it is normally present)",
                        f"it cannot be imported ({e})") from e
    try:
        blob = loadmat(path, variable_names=["X", "y"])
    except Exception as e:  # scipy raises many types on malformed or truncated files
        raise error("a MATLAB v5 MAT-file holding X and y",
                    f"an unreadable file ({type(e).__name__}: {e})") from e
    x, y = blob.get("X"), blob.get("y")
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        missing = [k for k, v in (("X", x), ("y", y)) if not isinstance(v, np.ndarray)]
        raise error("the variables X and y", f"no {' or '.join(missing)}")
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        raise error("X to be a 32 x 32 x 3 x N uint8 array",
                    f"shape {x.shape} and dtype {x.dtype}")
    n = x.shape[3]
    labels = y.reshape(-1) if y.ndim == 2 and 1 in y.shape else None
    if labels is None or len(labels) != n or (labels.size and labels.dtype.kind not in "iuf"):
        raise error(f"y to be {n} labels (an N x 1 array)", f"shape {y.shape}, dtype {y.dtype}")
    if labels.size and (not np.all(labels == np.round(labels)) or labels.min() < 1
                        or labels.max() > 10):
        raise error("integer labels in 1..10 (10 meaning the digit 0)",
                    f"labels in [{labels.min()}, {labels.max()}]")
    labels = labels.astype(np.int64)
    labels[labels == 10] = 0
    # X[row, col, channel, n] -> images[n, row, col, channel]
    images = np.ascontiguousarray(np.transpose(x, (3, 0, 1, 2)))
    return images, labels


def read_svhn(folder: str | os.PathLike
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels) from ``folder``."""
    folder = Path(folder)
    return (*read_svhn_mat(folder / "train_32x32.mat"), *read_svhn_mat(folder / "test_32x32.mat"))
