"""Versioned, atomic checkpoints of a run's whole state, so a killed run can continue.

`checkpoint.npz` holds every array leaf of the server pytree (named by its tree path),
the numpy sampler state, the JAX key, and a json header with the format version, the
next round, the metrics so far, the settings that shaped the numbers and, per client,
the file under `checkpoint_clients/` that holds that client's rows of the client pytree.

Per-client files exist because a round changes only its cohort: a 100-client FeDEQ run
carries 100 x (theta_i, lambda_i, phi_i) = 800 MB of client state, of which a round
changes 10%. Only the clients that changed since the last checkpoint are written, each
to a new file named after the round (`c00017.r00042.npz`); then the header is replaced,
and only then are files it no longer names deleted. Every file is written to a
temporary, flushed and renamed, so a kill at any moment leaves either the previous
checkpoint or the new one, each with all its files, never a torn state. Loading checks
the version, the settings and every leaf's name, shape and dtype against the run being
resumed, and refuses with a message rather than restarting.
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
VERSION = 2
FILENAME = "checkpoint.npz"
CLIENT_DIR = "checkpoint_clients"


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


def _client_files(directory: Path) -> list[str] | None:
    """The per-client file names the current checkpoint's header lists (None: none)."""
    try:
        with np.load(directory / FILENAME, allow_pickle=False) as npz:
            header = json.loads(npz["header"].tobytes().decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return header.get("client_files") if header.get("version") == VERSION else None


def save(directory: Path, state: RunState, settings: dict[str, Any],
         changed: np.ndarray | None = None) -> Path:
    """Writes the checkpoint atomically and returns the header file's path.

    `changed`: the clients (row indices) whose state differs from the checkpoint on disk;
    None means every client. Clients not listed keep their current files."""
    name, keys, pos, has_gauss, cached = state.sampler
    num_clients = jax.tree.leaves(state.clients)[0].shape[0]
    files = _client_files(directory)
    if files is None or len(files) != num_clients:
        files, changed = [None] * num_clients, None
    rows = range(num_clients) if changed is None else sorted({int(c) for c in changed})
    client_dir = directory / CLIENT_DIR
    for i in rows:
        files[i] = f"c{i:05d}.r{state.next_round:05d}.npz"
        with atomic_file(client_dir / files[i], "wb") as f:
            np.savez(f, **_leaves("clients", jax.tree.map(lambda a, i=i: a[i], state.clients)))
    header = {"format": FORMAT, "version": VERSION, "next_round": state.next_round,
              "history": state.history, "settings": settings, "client_files": files,
              "sampler": [name, int(pos), int(has_gauss), float(cached)]}
    arrays = {**_leaves("server", state.server),
              "sampler_keys": np.asarray(keys), "jax_key": np.asarray(state.key),
              "header": np.frombuffer(json.dumps(header).encode(), np.uint8)}
    path = directory / FILENAME
    with atomic_file(path, "wb") as f:
        np.savez(f, **arrays)
    listed = set(files)
    client_dir.mkdir(exist_ok=True)
    for old in client_dir.iterdir():  # replaced files, and those of a killed save
        if old.name not in listed:
            old.unlink(missing_ok=True)
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
    clients = _load_clients(directory, header.get("client_files") or [], clients_like, fix)
    name, pos, has_gauss, cached = header["sampler"]
    sampler = (name, arrays["sampler_keys"], pos, has_gauss, cached)
    return RunState(header["next_round"], server, clients, sampler, arrays["jax_key"],
                    header["history"])


def _load_clients(directory: Path, files: list[str], like: Any, fix: str) -> Any:
    """Stacks the per-client files back into the client pytree (leading clients axis)."""
    expected = jax.tree.leaves(like)[0].shape[0]
    if len(files) != expected:
        raise CheckpointError(f"{directory / FILENAME} holds {len(files)} clients, the run "
                              f"has {expected}; {fix}")
    one_like = jax.tree.map(lambda a: a[0], like)
    rows = []
    for name in files:
        path = directory / CLIENT_DIR / name
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise CheckpointError(f"{path} is missing, unreadable or corrupt ({err}); "
                                  f"{fix}") from err
        rows.append(_restore("clients", one_like, arrays, path, fix, as_numpy=True))
    return jax.tree.map(lambda *r: jax.numpy.asarray(np.stack(r)), *rows)


def _restore(prefix: str, like: Any, arrays: dict[str, np.ndarray], path: Path,
             fix: str, as_numpy: bool = False) -> Any:
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
        leaves.append(value if as_numpy else jax.numpy.asarray(value))
    return jax.tree_util.tree_unflatten(treedef, leaves)
