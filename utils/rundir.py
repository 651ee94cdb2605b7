"""A run directory: flags, one metrics line per evaluated round, and the reference's files.

Files are replaced atomically (write to a temporary file, then rename) so that a run
killed at any moment never leaves a half-written file behind; `metrics.jsonl` and the
per-round text files are appended one complete line at a time.
"""

import contextlib
import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """A file object whose contents replace `path` only once complete: written to a
    temporary sibling, flushed to disk, then renamed; removed if the write fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; keep the user's usual permissions
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def _fmt(values: list[float | None]) -> str:
    return "[" + ", ".join("nan" if v is None else f"{v:.5f}" for v in values) + "]"


def _metrics_line(record: dict[str, Any]) -> str:
    clean = {k: (None if isinstance(v, float) and v != v else v) for k, v in record.items()}
    return json.dumps(clean, sort_keys=True)


def _reference_losses(record: dict[str, Any]) -> str:
    """losses.txt's line: the reference's logged losses (training-mode BatchNorm over each
    client's whole set, spec 2.3); metrics.jsonl also has the evaluation-mode ones
    (`train_loss`, `test_loss`). NaN where a split was not scored."""
    return _fmt([record.get("train_loss_reference"), record.get("test_loss_reference")])


def _writes(method: Callable) -> Callable:
    """A method that writes: it does nothing in a directory opened with writer=False."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        if self.writer:
            method(self, *args, **kwargs)
    return guarded


class RunDir:
    """Writes one run's files. `metrics.jsonl` is the complete record; `output.txt`,
    `losses.txt`, `unseen.txt` and `final_result.txt` keep the reference's formats and
    quantities.

    ``hold=True`` is for a directory that holds a checkpoint to resume from: it is left
    exactly as it is (no file written, replaced or removed) until the engine accepts the
    checkpoint, which it shows by its first write (``rewrite_rounds``) or by ``release``;
    until then ``write_flags`` and ``write_partition`` are queued. A refused resume
    (``utils.checkpoint.CheckpointError``) therefore never touches the run it refused.

    ``writer=False`` (every process but the first of a multi-process run) reads the same
    directory (a checkpoint to resume from) and writes nothing."""

    def __init__(self, path: str | Path, *, hold: bool = False, writer: bool = True):
        self.path = Path(path)
        self.writer = writer
        if writer:
            self.path.mkdir(parents=True, exist_ok=True)
        self._queued: list[Callable[[], None]] | None = [] if hold else None
        self._later(self._remove_stale_temporaries)

    @property
    def held(self) -> bool:
        return self._queued is not None

    @_writes
    def _later(self, write: Callable[[], None]) -> None:
        if self._queued is None:
            write()
        else:
            self._queued.append(write)

    def on_release(self, write: Callable[[], None]) -> None:
        """Runs ``write`` when this directory is released (now, if it is not held)."""
        self._later(write)

    def release(self) -> None:
        """Writes what was queued while held; later writes go straight to disk."""
        queued, self._queued = self._queued, None
        for write in queued or ():
            write()

    def _remove_stale_temporaries(self) -> None:
        """A run SIGKILLed while `atomic_file` was writing leaves its temporary sibling
        behind (no cleanup code runs on SIGKILL). The completed files never depend on
        it, so the next run in this directory removes it rather than letting it pile up."""
        for stale in [*self.path.glob(".*.tmp"), *self.path.glob("*/.*.tmp")]:
            stale.unlink(missing_ok=True)

    def write_flags(self, flags: dict[str, Any]) -> None:
        command = " ".join(sys.argv) + "\n"

        def write() -> None:
            atomic_write(self.path / "flags.json", json.dumps(flags, indent=2, sort_keys=True))
            atomic_write(self.path / "args.txt",
                         "\n".join(f"{k}: {flags[k]!r}" for k in sorted(flags)) + "\n")
            atomic_write(self.path / "command.txt", command)

        self._later(write)

    @_writes
    def _append(self, name: str, line: str) -> None:
        self.release()
        with open(self.path / name, "a") as f:
            f.write(line + "\n")
            f.flush()

    def log_round(self, record: dict[str, Any]) -> None:
        """Every round goes to metrics.jsonl; the reference's accuracy and loss files get
        the evaluated rounds only, as in the reference."""
        self._append("metrics.jsonl", _metrics_line(record))
        if "test_acc" in record:
            self._append("output.txt", _fmt([record["train_acc"], record["test_acc"]]))
            self._append("losses.txt", _reference_losses(record))

    @_writes
    def rewrite_rounds(self, history: list[dict[str, Any]]) -> None:
        """On resume: the per-round files hold exactly the checkpoint's rounds (a killed
        run may have logged rounds after its last checkpoint)."""
        self.release()  # the engine has accepted the checkpoint

        def text(lines: list[str]) -> str:
            return "".join(line + "\n" for line in lines)

        atomic_write(self.path / "metrics.jsonl", text([_metrics_line(h) for h in history]))
        evaluated = [h for h in history if "test_acc" in h]
        atomic_write(self.path / "output.txt",
                     text([_fmt([h["train_acc"], h["test_acc"]]) for h in evaluated]))
        atomic_write(self.path / "losses.txt",
                     text([_reference_losses(h) for h in evaluated]))

    @_writes
    def write_unseen(self, train_acc: float, test_acc: float, record: dict[str, Any]) -> None:
        self.release()
        atomic_write(self.path / "unseen.txt", _fmt([train_acc, test_acc]) + "\n")
        self._append("metrics.jsonl", _metrics_line(record))

    def write_partition(self, partition: dict[str, Any]) -> None:
        """`partition.npz`: the arrays that say which examples each client holds (label
        table, per-client indices), so that a run's clients can be rebuilt exactly."""
        import numpy as np

        arrays = {k: np.asarray(v) for k, v in partition.items()}

        def write() -> None:
            with atomic_file(self.path / "partition.npz", "wb") as f:
                np.savez(f, **arrays)

        self._later(write)

    @_writes
    def write_summary(self, summary: dict[str, Any]) -> None:
        self.release()
        atomic_write(self.path / "summary.json", json.dumps(summary, indent=2, sort_keys=True))

    @_writes
    def write_final_result(self, results: list[tuple[float, float]]) -> None:
        """The reference's layout: the (repeats x 2) array, then [mean, std] of test acc."""
        import numpy as np

        self.release()
        arr = np.asarray(results, dtype=np.float64).reshape(-1, 2)
        test = arr[:, 1]
        text = (np.array2string(arr, precision=5, separator=", ") + "\n"
                + _fmt([float(test.mean()), float(test.std())]) + "\n")
        atomic_write(self.path / "final_result.txt", text)
