"""CINIC-10 from its class folders, in the order torchvision's ImageFolder lists them.

The authors' fixed CINIC-10 partitions index ImageFolder's order (spec 3.1): class folders
sorted by name, then the files of each class sorted by name. ``ROOT/cinic10/{train,test}/
<class>/*.png`` is read in exactly that order, label = position of the class folder.
Only the files directly in a class folder are read (CINIC-10 has no deeper folders), and
images are converted to RGB as ImageFolder's loader does (a few CINIC images are grey).

PNG decoding uses Pillow, which is always installed because matplotlib (a requirement)
depends on it. The dataset is ~750 MB and is not downloaded automatically: it has no
published checksum to verify a download against.

Normalisation (spec 3.2): mean (0.47889522, 0.47227842, 0.43047404), std (0.24205776,
0.23828046, 0.25874835) per channel.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from data.errors import DataError

CINIC_CLASSES: tuple[str, ...] = ("airplane", "automobile", "bird", "cat", "deer", "dog",
                                  "frog", "horse", "ship", "truck")
CINIC_MEAN = (0.47889522, 0.47227842, 0.43047404)
CINIC_STD = (0.24205776, 0.23828046, 0.25874835)
CINIC_URL = "https://datashare.ed.ac.uk/handle/10283/3192"


def cinic_how_to_get(folder: str | os.PathLike) -> str:
    """Manual steps: CINIC-10 must be fetched and unpacked by hand."""
    return (f"download CINIC-10.tar.gz from {CINIC_URL} and unpack it with "
            f"`mkdir -p {folder} && tar -xzf CINIC-10.tar.gz -C {folder}` so that "
            f"{folder}/train/<class>/*.png and {folder}/test/<class>/*.png exist")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every PNG ends with


def _decode(path: Path, how: str) -> np.ndarray:
    from PIL import Image

    try:
        raw = path.read_bytes()
        # Pillow decodes a PNG cut after its pixel data without complaint; a cut file is
        # still a broken download or copy, so it is refused here.
        if raw.startswith(_PNG_SIGNATURE) and not raw.endswith(_PNG_END):
            raise OSError("the file is cut short (it does not end with the IEND chunk)")
        with Image.open(io.BytesIO(raw)) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise DataError(str(path), "a readable PNG image", how,
                        f"an undecodable file ({type(e).__name__}: {e})") from e
    if rgb.shape != (32, 32, 3):
        raise DataError(str(path), "a 32 x 32 image", how, f"an image of shape {rgb.shape}")
    return rgb


def list_cinic_split(split_dir: str | os.PathLike) -> tuple[list[Path], np.ndarray]:
    """The PNG files of one split in ImageFolder order, and their labels (int64)."""
    split_dir = Path(split_dir)
    how = cinic_how_to_get(split_dir.parent)
    if not split_dir.is_dir():
        raise DataError(str(split_dir), "a CINIC-10 split folder with one folder per class",
                        how, "no such folder" if not split_dir.exists() else "a file")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if tuple(classes) != CINIC_CLASSES:
        raise DataError(str(split_dir), f"the class folders {', '.join(CINIC_CLASSES)}", how,
                        f"the folders {classes}")
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        names = sorted(p.name for p in (split_dir / name).iterdir()
                       if p.is_file() and p.name.lower().endswith(".png"))
        if not names:
            raise DataError(str(split_dir / name), "at least one .png image", how,
                            "an empty class folder")
        files += [split_dir / name / n for n in names]
        labels += [label] * len(names)
    return files, np.asarray(labels, dtype=np.int64)


def read_cinic_split(split_dir: str | os.PathLike,
                     workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One split as (uint8 N x 32 x 32 x 3 images, int64 labels), in ImageFolder order.

    Decoding 90,000 small PNGs is the slow part, so it runs on a few threads; ``map`` keeps
    the order, so the result does not depend on ``workers``.
    """
    files, labels = list_cinic_split(split_dir)
    how = cinic_how_to_get(Path(split_dir).parent)
    try:
        import PIL  # noqa: F401
    except ImportError as e:
        raise DataError(str(split_dir), "Pillow to be installed to decode CINIC-10's PNGs",
                        "`pip install pillow` (matplotlib depends on it, so it is normally "
                        "present)", f"it cannot be imported ({e})") from e
    workers = workers or min(8, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        images = list(pool.map(lambda p: _decode(p, how), files))
    finally:
        # On a bad file, do not decode the rest of the split before reporting it.
        pool.shutdown(wait=True, cancel_futures=True)
    return np.stack(images), labels


def read_cinic(folder: str | os.PathLike
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels) from ``folder``."""
    folder = Path(folder)
    return (*read_cinic_split(folder / "train"), *read_cinic_split(folder / "test"))
