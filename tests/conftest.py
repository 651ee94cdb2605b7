"""Tests run on the CPU backend in float32, from the repository root."""

import os
import sys

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def shared_compile_env(tmp_path_factory) -> dict[str, str]:
    """Environment for main.py subprocesses: CPU JAX with one persistent compilation cache
    for the whole session. Compiling the transformers dominates a tiny text run; with
    the cache, runs of one model (each runner script, main.py with the same flags)
    compile each program once."""
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
