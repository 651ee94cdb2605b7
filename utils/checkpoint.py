"""Versioned, atomic checkpoints of a run's whole state, so a killed run can continue.

One `.npz` file holds every array leaf of the server and client pytrees (named by their
tree paths), the numpy sampler state, the JAX key, and a json header with the format
version, the next round, the metrics so far and the settings that shaped the numbers.
It is written to a temporary file, flushed to disk and renamed over the old one, so a
kill at any moment leaves either the previous checkpoint or the new one, never a torn
file. Loading checks the version, the settings and every leaf's name, shape and dtype
against the run being resumed, and refuses with a message rather than restarting.
"""

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from utils.rundir import atomic_file

FORMAT = "fedeq-checkpoint"
VERSION = 1
FILENAME = "checkpoint.npz"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says why and what to do."""


@dataclass
class RunState:
    """Everything the round loop needs to carry on after round `next_round - 1`."""

    next_round: int
    server: Any
    clients: Any
    sampler: tuple            # numpy RandomState.get_state()
    key: np.ndarray           # the JAX key chain after the last finished round
    history: list[dict]


def _leaves(prefix: str, tree: Any) -> dict[str, np.ndarray]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {prefix + jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def save(directory: Path, state: RunState, settings: dict[str, Any]) -> Path:
    """Writes `directory/checkpoint.npz` atomically and returns its path."""
    name, keys, pos, has_gauss, cached = state.sampler
    header = {"format": FORMAT, "version": VERSION, "next_round": state.next_round,
              "history": state.history, "settings": settings,
              "sampler": [name, int(pos), int(has_gauss), float(cached)]}
    arrays = {**_leaves("server", state.server), **_leaves("clients", state.clients),
              "sampler_keys": np.asarray(keys), "jax_key": np.asarray(state.key),
              "header": np.frombuffer(json.dumps(header).encode(), np.uint8)}
    path = directory / FILENAME
    with atomic_file(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def exists(directory: Path) -> bool:
    return (directory / FILENAME).exists()


def load(directory: Path, server_like: Any, clients_like: Any,
         settings: dict[str, Any]) -> RunState:
    """Reads `directory/checkpoint.npz` into trees shaped like the templates given."""
    path = directory / FILENAME
    fix = (f"delete {path} to start the run over, or pass a new --outdir")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        header = json.loads(arrays.pop("header").tobytes().decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path} is unreadable or corrupt ({err}); {fix}") from err
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has format {header.get('format')!r} version {header.get('version')!r}; "
            f"this code reads {FORMAT!r} version {VERSION}; {fix}")
    changed = {k: (header["settings"].get(k), v) for k, v in settings.items()
               if header["settings"].get(k) != v}
    if changed:
        listed = ", ".join(f"{k}: checkpoint {old!r}, now {new!r}"
                           for k, (old, new) in sorted(changed.items()))
        raise CheckpointError(f"{path} was written with other settings ({listed}); "
                              f"run with the original flags, or {fix}")
    server = _restore("server", server_like, arrays, path, fix)
    clients = _restore("clients", clients_like, arrays, path, fix)
    name, pos, has_gauss, cached = header["sampler"]
    sampler = (name, arrays["sampler_keys"], pos, has_gauss, cached)
    return RunState(header["next_round"], server, clients, sampler, arrays["jax_key"],
                    header["history"])


def _restore(prefix: str, like: Any, arrays: dict[str, np.ndarray], path: Path,
             fix: str) -> Any:
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for tree_path, leaf in flat:
        name = prefix + jax.tree_util.keystr(tree_path)
        if name not in arrays:
            raise CheckpointError(f"{path} lacks {name} (another model or algorithm?); {fix}")
        value = arrays[name]
        if value.shape != tuple(leaf.shape) or value.dtype != leaf.dtype:
            raise CheckpointError(
                f"{path}: {name} is {value.dtype}{list(value.shape)}, the run expects "
                f"{leaf.dtype}{list(leaf.shape)}; {fix}")
        leaves.append(jax.numpy.asarray(value))
    return jax.tree_util.tree_unflatten(treedef, leaves)
