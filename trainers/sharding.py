"""The `sharded` executor: a cohort's clients split over every device of every process.

JAX's multi-controller model: every process runs the same engine on the same (seeded,
deterministic) values, so each one knows the whole cohort. The padded cohort is cut into
one contiguous block of clients per device of a one-axis mesh (`clients`); each process
runs only the blocks of its own devices, each block with an ordinary per-device executor
(`loop`, `map` or `vmap`, the one measured fastest on the backend), the local devices
concurrently. The blocks are then joined into one array sharded over the mesh and
replicated by an XLA collective (an all-gather over devices and, with several processes,
over the distributed runtime's links), so every process ends the call holding the whole
cohort's results in cohort order, as the other executors return them. Results go from
device to device, never through the host.

Padding repeats the last client; the repeats' results are dropped, so they change nothing
and are never counted. A client's numbers do not depend on which device ran it (the same
program on the same backend), so the results equal the loop executor's.
"""

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from utils.pytree import index

CLIENTS_AXIS = "clients"
DEVICE_EXECUTORS = ("loop", "map", "vmap")


def default_device_executor() -> str:
    """Per device, as the one-device executors were measured (docs/PERFORMANCE.md): one
    client after another on CPU, all at once on an accelerator."""
    return "loop" if jax.default_backend() == "cpu" else "vmap"


def client_mesh() -> Mesh:
    """Every device of every process, in the runtime's global order, on one axis."""
    return Mesh(np.asarray(jax.devices()), (CLIENTS_AXIS,))


def blocks(n: int, num_devices: int) -> tuple[int, np.ndarray]:
    """Clients per device and, for each padded slot, the client it runs (the last client
    repeated to fill the last blocks)."""
    per = max(math.ceil(n / num_devices), 1)
    return per, np.minimum(np.arange(per * num_devices), n - 1)


class ShardedRunner:
    """Two ways to run the blocks, by the per-device executor:
    - `run(one_device, shared, per_client)` (loop): `one_device(shared, block)` is called
      eagerly with inputs placed on its device, so every jitted step runs there; local
      devices run concurrently, each compiling its own copy of the steps;
    - `run_spmd(body, shared, per_client)` (map, vmap): `body(shared, block)` is traced
      once into one program over the mesh (`shard_map`), compiled once for all devices.
    Both return the whole cohort's results on this process's first device."""

    def __init__(self) -> None:
        self.mesh = client_mesh()
        self.devices = list(self.mesh.devices.flat)
        self.local = [d for d in self.devices if d.process_index == jax.process_index()]
        self._replicate = jax.jit(lambda tree: tree,
                                  out_shardings=NamedSharding(self.mesh, P()))
        self._programs: dict[int, Callable] = {}

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def run(self, one_device: Callable[[Any, Any], Any], shared: Any, per_client: Any) -> Any:
        n = jax.tree.leaves(per_client)[0].shape[0]
        per, slots = blocks(n, self.num_devices)

        def on(device):
            j = self.devices.index(device)
            block = index(per_client, jnp.asarray(slots[j * per:(j + 1) * per]))
            # Leaves the client built from constants (uncommitted, on the default device)
            # are moved to the block's device too: the join wants one block per device.
            return jax.device_put(one_device(*jax.device_put((shared, block), device)), device)

        with ThreadPoolExecutor(len(self.local)) as pool:
            outs = list(pool.map(on, self.local))
        return self._gathered(self._join(outs, per), n)

    def _gathered(self, sharded: Any, n: int) -> Any:
        """The real clients' results, all-gathered, on this process's first device."""
        return jax.tree.map(lambda a: a.addressable_data(0)[:n], self._replicate(sharded))

    def _join(self, outs: list[Any], per: int) -> Any:
        """The local blocks as global arrays sharded over the mesh's clients axis."""
        sharding = NamedSharding(self.mesh, P(CLIENTS_AXIS))
        leaves = [jax.tree.leaves(o) for o in outs]
        joined = [jax.make_array_from_single_device_arrays(
            (per * self.num_devices, *parts[0].shape[1:]), sharding, list(parts))
            for parts in zip(*leaves, strict=True)]
        return jax.tree.unflatten(jax.tree.structure(outs[0]), joined)

    def run_spmd(self, body: Callable[[Any, Any], Any], shared: Any, per_client: Any) -> Any:
        n = jax.tree.leaves(per_client)[0].shape[0]
        padded = index(per_client, jnp.asarray(blocks(n, self.num_devices)[1]))
        program = self._programs.get(id(body))
        if program is None:
            program = self._programs[id(body)] = jax.jit(jax.shard_map(
                body, mesh=self.mesh, in_specs=(P(), P(CLIENTS_AXIS)),
                out_specs=P(CLIENTS_AXIS), check_vma=False))   # clients' loops mix
                # per-device and replicated carries; nothing crosses devices inside
        out = program(self._global(shared, P()), self._global(padded, P(CLIENTS_AXIS)))
        return self._gathered(out, n)

    def _global(self, tree: Any, spec: P) -> Any:
        """This process's (whole) values as global arrays: each device takes its slice.
        Every process holds the same values, so the slices agree across processes."""
        sharding = NamedSharding(self.mesh, spec)
        return jax.tree.map(lambda a: jax.make_array_from_callback(
            jnp.shape(a), sharding, lambda i, a=a: a[i]), tree)
