"""Fetch the official CIFAR-10/100 python archives into ``--data_dir`` when they are missing.

A training run that starts on a fresh machine should not need a manual step, but a
download that dies half-way must never leave a folder the loader would then trust. So the
archive is streamed into a hidden temporary folder next to the destination, its md5 is
checked against the official sum, it is unpacked there, and only the finished folder is
renamed into place (a rename within one file system is atomic). A process killed at any
point leaves at most a hidden ``.<folder>.download-*`` folder, which can be deleted.

The base URL can be redirected with the ``base_url`` argument or the ``FEDEQ_CIFAR_URL``
environment variable (a mirror, or a local server in the tests); the md5 stays the
official one unless the caller passes another.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from data.errors import DataError

DEFAULT_BASE_URL = "https://www.cs.toronto.edu/~kriz/"
URL_ENV = "FEDEQ_CIFAR_URL"


@dataclass(frozen=True)
class CifarArchive:
    """The official archive of one CIFAR variant and the folder it unpacks to."""

    filename: str
    md5: str
    folder: str


ARCHIVES: dict[str, CifarArchive] = {
    "cifar10": CifarArchive("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                            "cifar-10-batches-py"),
    "cifar100": CifarArchive("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                             "cifar-100-python"),
}

_CHUNK = 1 << 20


def cifar_base_url(base_url: str | None = None) -> str:
    """The argument wins over ``FEDEQ_CIFAR_URL``, which wins over the official site."""
    url = base_url or os.environ.get(URL_ENV) or DEFAULT_BASE_URL
    return url if url.endswith("/") else url + "/"


def cifar_folder(root: str | os.PathLike, name: str) -> Path:
    """Where the unpacked pickles of ``name`` live under ``--data_dir``."""
    return Path(root) / name / _archive(name).folder


def how_to_get(root: str | os.PathLike, name: str, base_url: str | None = None) -> str:
    """Manual instructions, for machines without internet or behind a proxy."""
    arch = _archive(name)
    parent = Path(root) / name
    url = cifar_base_url(base_url) + arch.filename
    return (
        f"download {url} (md5 {arch.md5}) and unpack it with "
        f"`mkdir -p {parent} && tar -xzf {arch.filename} -C {parent}` so that "
        f"{parent / arch.folder} exists; or run with network access and the folder is "
        f"downloaded automatically; or use --data_source tfds"
    )


def _archive(name: str) -> CifarArchive:
    if name not in ARCHIVES:
        raise ValueError(f"unknown CIFAR variant {name!r}; choose one of {sorted(ARCHIVES)}")
    return ARCHIVES[name]


def _fetch(url: str, dest: Path, timeout: float, progress: bool) -> str:
    """Stream ``url`` into ``dest`` and return its md5 (computed while writing)."""
    digest = hashlib.md5(usedforsecurity=False)
    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as f:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        # disable=None hides the bar when stderr is not a terminal (batch logs).
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=dest.name, disable=None if progress else True) as bar:
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def _safe_extract(archive: Path, into: Path, folder: str) -> None:
    """Unpack only regular files and folders below ``folder/``: an archive from a mirror
    must not be able to write outside the temporary folder or plant links."""
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for m in members:
            parts = Path(m.name).parts
            if (m.name.startswith(("/", "\\")) or ".." in parts or not parts
                    or parts[0] != folder or not (m.isfile() or m.isdir())):
                raise tarfile.TarError(f"unexpected archive member {m.name!r}")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(into, members=members, filter="data")
        else:  # pragma: no cover - Python < 3.11.4; the checks above already apply
            tar.extractall(into, members=members)


def download_cifar(root: str | os.PathLike, name: str, base_url: str | None = None,
                   md5: str | None = None, timeout: float = 60.0,
                   progress: bool = True) -> Path:
    """Make sure ``ROOT/<name>/<official folder>`` exists, downloading it if needed.

    Returns the folder. Raises ``DataError`` (naming the folder and the manual steps) when
    the download fails, the checksum differs, or the archive is not the expected one; in
    every failure case nothing is left at the destination.
    """
    arch = _archive(name)
    target = cifar_folder(root, name)
    if target.is_dir():
        return target
    url = cifar_base_url(base_url) + arch.filename
    expected_md5 = (md5 or arch.md5).lower()
    manual = how_to_get(root, name, base_url)
    parent = target.parent
    created_parent = not parent.exists()
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{arch.folder}.download-", dir=parent))
    except OSError as e:
        raise DataError(str(parent), "a writable folder to download CIFAR into", manual,
                        f"it cannot be created or written ({e})") from e
    done = False
    try:
        archive = tmp / arch.filename
        try:
            got_md5 = _fetch(url, archive, timeout, progress)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            raise DataError(str(target), f"the unpacked CIFAR folder, or a download of {url}",
                            manual, f"no such folder, and the download failed ({e})") from e
        if got_md5 != expected_md5:
            raise DataError(str(target), f"{url} with md5 {expected_md5}", manual,
                            f"a download with md5 {got_md5} (corrupt or not the official "
                            f"archive); nothing was unpacked")
        unpacked = tmp / "unpacked"
        try:
            _safe_extract(archive, unpacked, arch.folder)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(str(target), f"{arch.filename} to be a tar.gz holding "
                            f"{arch.folder}/", manual, f"an unreadable archive ({e})") from e
        if not (unpacked / arch.folder).is_dir():
            raise DataError(str(target), f"{arch.filename} to hold the folder {arch.folder}/",
                            manual, "an archive without it")
        try:
            os.rename(unpacked / arch.folder, target)
        except OSError:
            if not target.is_dir():  # another process may have finished first
                raise
        done = True
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not done and created_parent:
            try:
                parent.rmdir()  # only if still empty
            except OSError:
                pass
