"""Fashion-MNIST from Zalando's official IDX files, shaped as InCo feeds it to its ResNets.

InCo (spec 3.2) turns each 28x28 grey image into [0, 1] floats and resizes it bilinearly to
32x32, one channel, with no normalisation and no augmentation. The resize here is the
half-pixel-centre bilinear interpolation of ``torch.nn.functional.interpolate(...,
mode="bilinear", align_corners=False)`` (what torchvision's Resize does on a tensor when
enlarging), written as two small interpolation matrices so that it is exact and needs no
image library.

Files live under ``ROOT/fmnist/`` as downloaded (``*.gz``); already unpacked copies without
``.gz`` are read too.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from data.errors import DataError

FMNIST_BASE_URL = "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
FMNIST_URL_ENV = "FEDEQ_FMNIST_URL"

# The official files and their md5 sums, as published with the dataset.
FMNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

FMNIST_INPUT_SHAPE = (32, 32, 1)
_IDX_UBYTE = 0x08


def fmnist_how_to_get(folder: str | os.PathLike) -> str:
    """Manual steps, for machines without internet."""
    names = ", ".join(f"{n} (md5 {m})" for n, m in FMNIST_FILES.items())
    return (f"download {names} from {FMNIST_BASE_URL} into {folder}/; or run with network "
            f"access and they are downloaded automatically")


def _open_idx(path: Path) -> bytes:
    """The IDX bytes of ``path``, or of its unpacked twin (same name without ``.gz``)."""
    how = fmnist_how_to_get(path.parent)
    candidates = [path, path.with_suffix("")] if path.suffix == ".gz" else [path]
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            raw = candidate.read_bytes()
            return gzip.decompress(raw) if candidate.suffix == ".gz" else raw
        except (OSError, EOFError, zlib.error) as e:
            kind = "gzip-compressed IDX" if candidate.suffix == ".gz" else "IDX"
            raise DataError(str(candidate), f"a readable {kind} file", how,
                            f"an unreadable file ({type(e).__name__}: {e})") from e
    raise DataError(str(path), "the official Fashion-MNIST file", how, "no such file")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """One unsigned-byte IDX file (LeCun's MNIST format) as a uint8 array of its shape.

    The header is two zero bytes, the type code 0x08, the number of dimensions, then one
    big-endian uint32 per dimension; the data follow in C order.
    """
    path = Path(path)
    data = _open_idx(path)
    how = fmnist_how_to_get(path.parent)

    def error(found: str) -> DataError:
        return DataError(str(path), "an unsigned-byte IDX file (magic 0x0000 08 nd)", how, found)

    if len(data) < 4:
        raise error(f"only {len(data)} bytes")
    if data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE or not 1 <= data[3] <= 4:
        raise error(f"the magic bytes {data[:4].hex()}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise error(f"a header cut short ({len(data)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(shape))
    if len(data) - header != size:
        raise error(f"{len(data) - header} data bytes for shape {shape} ({size} expected; "
                    f"a truncated or padded file)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def _read_split(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = folder / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = folder / f"{prefix}-labels-idx1-ubyte.gz"
    images, labels = read_idx(images_path), read_idx(labels_path)
    how = fmnist_how_to_get(folder)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(str(images_path), "N x 28 x 28 images", how, f"shape {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(str(labels_path), f"{len(images)} labels, one per image", how,
                        f"shape {labels.shape}")
    if labels.size and labels.max() >= 10:
        raise DataError(str(labels_path), "labels in [0, 10)", how, f"label {labels.max()}")
    return images, labels.astype(np.int64)


def read_fmnist(folder: str | os.PathLike
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels): uint8 N x 28 x 28, int64."""
    folder = Path(folder)
    return (*_read_split(folder, "train"), *_read_split(folder, "t10k"))


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of half-pixel-centre bilinear resampling, edges clamped."""
    weights = np.zeros((n_out, n_in), dtype=np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        lo = min(int(src), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        frac = src - lo
        weights[i, lo] += 1.0 - frac
        weights[i, hi] += frac
    return weights


def to_inco_fmnist(images: np.ndarray, size: int = 32) -> np.ndarray:
    """uint8 N x 28 x 28 -> float32 N x size x size x 1 in [0, 1] (bilinear, not normalised)."""
    images = np.asarray(images)
    rows = _bilinear_matrix(images.shape[1], size).astype(np.float32)
    cols = _bilinear_matrix(images.shape[2], size).astype(np.float32)
    unit = images.astype(np.float32) / np.float32(255.0)
    out = np.einsum("ij,njk,lk->nil", rows, unit, cols, optimize=True)
    return out[..., None].astype(np.float32)
