"""Local SGD over a client's padded schedule: the one training loop every algorithm uses.

A schedule is (epochs, steps, batch) example indices with a mask. Steps are padded to the
largest client so that every client compiles to the same program; padded steps are
skipped with `lax.cond` (a real branch under `jit`; under `vmap` both sides run and the
padded step's result is discarded, so the numbers are the same).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from utils.pytree import merge

PHASE_STATS = ("steps", "loss", "fwd_iters", "fwd_residual", "bwd_steps", "bwd_iters",
               "bwd_residual")


class ClientData(NamedTuple):
    """One client's training examples, padded to the largest client: x (n_pad, ...), y."""

    x: jnp.ndarray
    y: jnp.ndarray


class Schedule(NamedTuple):
    """Batch indices (streams, epochs, steps, batch) and which entries are real examples."""

    idx: jnp.ndarray
    mask: jnp.ndarray

    def stream(self, s: int, epochs: int) -> "Schedule":
        return Schedule(self.idx[s, :epochs], self.mask[s, :epochs])


def sgd_phase(task: Any, lr: float, trainable: dict, frozen: dict, state: dict,
              data: ClientData, schedule: Schedule, rng: jax.Array,
              penalty: Callable[[dict], jnp.ndarray] | None = None
              ) -> tuple[dict, dict, jnp.ndarray]:
    """Plain SGD (the reference's optax.sgd(lr)) on `trainable`, `frozen` held fixed.

    The objective is the task loss on the batch (+ l2 + `penalty(trainable)`). Returns the
    new trainable params, the new model state, and a vector of sums in `PHASE_STATS`
    order (real steps, loss, forward solver iterations and residual, steps with a
    backward solve, backward iterations and residual).
    """
    optimizer = optax.sgd(lr)
    batch = schedule.idx.shape[-1]
    idx = schedule.idx.reshape(-1, batch)
    mask = schedule.mask.reshape(-1, batch)

    def objective(tr, probe, st, x, y, m, key):
        out, new_st = task.apply(merge(frozen, tr), st, key, x, True, probe)
        loss = task.loss(out.logits, y, m)
        total = loss + task.l2(tr)
        if penalty is not None:
            total = total + penalty(tr)
        return total, (new_st, loss, out.solver_stats)

    grad_fn = jax.grad(objective, argnums=(0, 1), has_aux=True)

    def step(carry, inputs):
        i, m, k = inputs

        def real_step(carry):
            tr, opt_state, st, sums = carry
            (g, g_probe), (st, loss, stats) = grad_fn(
                tr, jnp.zeros((2,), jnp.float32), st, data.x[i], data.y[i], m,
                jax.random.fold_in(rng, k))
            updates, opt_state = optimizer.update(g, opt_state, tr)
            tr = optax.apply_updates(tr, updates)
            # Backward statistics exist only where gradients went through a solve.
            solved = (g_probe[0] != 0).astype(jnp.float32)
            row = jnp.stack([1.0, loss, stats.fwd_iters, stats.fwd_residual, solved,
                             g_probe[0] / batch, g_probe[1] / batch])
            return tr, opt_state, st, sums + row

        return lax.cond(jnp.any(m), real_step, lambda c: c, carry), None

    sums = jnp.zeros((len(PHASE_STATS),), jnp.float32)
    carry = (trainable, optimizer.init(trainable), state, sums)
    steps = jnp.arange(idx.shape[0])
    (trainable, _, state, sums), _ = lax.scan(step, carry, (idx, mask, steps))
    return trainable, state, sums
