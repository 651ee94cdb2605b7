"""Tests run on the CPU backend in float32, from the repository root."""

import functools
import http.server
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# One persistent XLA compilation cache for the whole session, this process and every
# subprocess it starts (pytest-xdist workers, which inherit the variable from the
# controller; main.py, runner scripts, sharded workers): many tests build the
# same small programs again (one engine per executor, per algorithm, per run of a
# command), and compiling dominates them. Set before JAX is imported; fresh per session
# (nothing carries over between sessions) unless JAX_COMPILATION_CACHE_DIR is given.
# A cache hit is the same executable, so no number changes.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="fedeq-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_unconfigure(config) -> None:
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_compile_env() -> dict[str, str]:
    """Environment for main.py subprocesses: CPU JAX and the session's compilation cache
    (above), so that runs of one model (each runner script, main.py with the same flags)
    compile each program once."""
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local http.server over a folder, for the downloaders' tests (no network);
    yields (base URL, folder)."""
    folder = tmp_path / "www"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", folder
    finally:
        server.shutdown()
        server.server_close()
