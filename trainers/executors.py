"""How a cohort's clients run: `vmap` (all at once), `map` (one after another inside one
compiled program), `loop` (a Python loop over one jitted client, like the reference),
`threads` (the loop's clients spread over one thread per core) or `sharded` (the cohort
split over every device of every process, each device running its block with one of the
first three; trainers/sharding.py).

All of them run the same per-client function and give the same numbers up to float
tolerance. On CPU, `vmap` over clients with their own weights turns convolutions into
grouped convolutions and was measured slower than a loop, so the default is chosen per
backend from the benchmark (docs/PERFORMANCE.md), not assumed.

`threads` exists because XLA:CPU keeps only about 1.2 of 2 cores busy on one client's
small convolutions: the cohort's clients are independent within a round (their keys and
schedules are drawn beforehand, in order), so running them concurrently changes nothing
but the wall time, and the results are put back in cohort order.
"""

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from trainers.sharding import DEVICE_EXECUTORS, ShardedRunner, default_device_executor
from utils.pytree import index, stack

EXECUTORS = ("loop", "threads", "map", "vmap", "sharded")
ClientFn = Callable[[Any, Any], Any]


def default_executor() -> str:
    """The fastest executor measured on this backend (see benchmarks/round_time.py)."""
    return "threads" if jax.default_backend() == "cpu" else "vmap"


def _num_clients(per_client: Any) -> int:
    return jax.tree.leaves(per_client)[0].shape[0]


def _over_clients(kind: str, fn: ClientFn) -> Callable:
    """`fn` over the clients' leading axis in one traced program: one after another
    (`map`) or all at once (`vmap`)."""
    if kind == "map":
        return lambda shared, pc: lax.map(lambda c: fn(shared, c), pc)
    return jax.vmap(fn, in_axes=(None, 0))


class Executor:
    """Runs `fn(shared, one_client)` for every client of `per_client` (leading axis)."""

    def __init__(self, kind: str, vmap_chunk: int = 10, workers: int | None = None,
                 device_executor: str = ""):
        """`device_executor`: what runs each device's block under `sharded` (default:
        the fastest measured on the backend)."""
        if kind not in EXECUTORS:
            raise ValueError(f"executor {kind!r} unknown; allowed: {', '.join(EXECUTORS)}")
        self.device_executor = device_executor or default_device_executor()
        if self.device_executor not in DEVICE_EXECUTORS:
            raise ValueError(f"device executor {self.device_executor!r} unknown; allowed: "
                             f"{', '.join(DEVICE_EXECUTORS)}")
        self.kind = kind
        self.vmap_chunk = vmap_chunk
        self.workers = workers or os.cpu_count() or 1
        self._compiled: dict[int, Callable] = {}
        self._runner: ShardedRunner | None = None

    def describe(self) -> str:
        if self.kind != "sharded":
            return self.kind
        processes = jax.process_count()
        n = len(jax.devices())
        return (f"sharded over {n} device{'s' if n != 1 else ''}"
                + (f" of {processes} processes" if processes > 1 else "")
                + f", {self.device_executor} per device")

    def __call__(self, fn: ClientFn, shared: Any, per_client: Any, trains: bool = False
                 ) -> Any:
        """`trains`: fn runs SGD steps. The loop executor then calls it eagerly, so that
        trainers/local.py runs each step as its own jitted call outside any XLA loop."""
        key = (id(fn), trains)
        if key not in self._compiled:
            self._compiled[key] = self._compile(fn, trains)
        return self._compiled[key](shared, per_client)

    def _compile(self, fn: ClientFn, trains: bool) -> Callable:
        if self.kind == "sharded":
            if self._runner is None:   # one mesh for every function this executor runs
                self._runner = ShardedRunner()
            runner = self._runner
            if self.device_executor == "loop":
                one_device = Executor("loop")._compile(fn, trains)
                return lambda shared, pc: runner.run(one_device, shared, pc)
            body = _over_clients(self.device_executor, fn)
            return lambda shared, pc: runner.run_spmd(body, shared, pc)
        if self.kind in ("loop", "threads"):
            one = fn if trains else jax.jit(fn)
            if self.kind == "loop":
                return lambda shared, pc: stack(
                    [one(shared, index(pc, i)) for i in range(_num_clients(pc))])

            def run_threads(shared, pc):
                n = _num_clients(pc)
                with ThreadPoolExecutor(min(self.workers, n)) as pool:
                    return stack(list(pool.map(lambda i: one(shared, index(pc, i)), range(n))))
            return run_threads
        if self.kind == "map":
            return jax.jit(_over_clients("map", fn))
        batched = jax.jit(_over_clients("vmap", fn))

        def run_chunks(shared, pc):
            n = _num_clients(pc)
            outs = []
            for start in range(0, n, self.vmap_chunk):
                rows = jnp.minimum(jnp.arange(start, start + self.vmap_chunk), n - 1)
                take = min(self.vmap_chunk, n - start)
                out = batched(shared, index(pc, rows))
                outs.append(jax.tree.map(lambda x, take=take: x[:take], out))
            return jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)

        return run_chunks
