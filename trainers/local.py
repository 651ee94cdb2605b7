"""Local SGD over a client's padded schedule: the one training loop every algorithm uses.

A schedule is (epochs, steps, batch) example indices with a mask. Steps are padded to the
largest client so that every client compiles to the same program.

Two ways to run the same step function, chosen by whether the schedule is concrete:
- traced (the `map` and `vmap` executors jit a whole client): `lax.scan` over the padded
  steps, padded steps skipped with `lax.cond`;
- concrete (the `loop` executor calls the client update eagerly): a Python loop over the
  real steps, each one a jitted step. XLA:CPU runs a convolution's gradient 10-35x
  slower inside any control flow (a scan, a cond, a while loop; jax issue 12868), so on
  CPU this is much faster; the arithmetic is the same.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from deq.budget import current_budget
from deq.fixed_point import PROBE_SIZE
from models.base import HEAD_MARKER
from trainers.optimizers import OptimizerSpec, as_optimizer
from utils.pytree import merge

AUGMENT_STREAM = 0x0A06  # folded into a step's key for the augmentation's draws
EPOCHS_STREAM = 0x0E0C   # folded into a client's key to draw its number of local epochs

PHASE_STATS = ("steps", "loss", "fwd_iters", "fwd_residual", "bwd_steps", "bwd_iters",
               "bwd_residual", "fwd_solves", "fwd_unconverged", "bwd_solves",
               "bwd_unconverged", "fwd_rel_residual")

# penalty(trainable, penalty_args, x, mask, out): the batch is there for penalties that are
# scaled by it (text FeDEQ divides its ADMM terms by the batch's token count), the
# model's output for those that compare representations (MOON).
Penalty = Callable[[dict, Any, jnp.ndarray, jnp.ndarray, Any], jnp.ndarray]
# correction(trainable, correction_args) -> trainable, applied after every optimiser
# step (SCAFFOLD's control-variate step, which bypasses the optimiser).
Correction = Callable[[dict, Any], dict]


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

    def first_epochs(self, n: jnp.ndarray) -> "Schedule":
        """Only the first `n` epochs (a traced count is fine): later steps are masked,
        so the padded program is unchanged and the loop executor skips them."""
        keep = jnp.arange(self.mask.shape[0]) < n
        return Schedule(self.idx, self.mask & keep.reshape((-1,) + (1,) * (self.mask.ndim - 1)))


def random_epoch_count(rng: jax.Array, epochs: int) -> jnp.ndarray:
    """DAC's E_c (dac_spec 4.1): uniform on the integers floor(E / 3) .. E (at least 1)."""
    low = max(epochs // 3, 1)
    return jax.random.randint(jax.random.fold_in(rng, EPOCHS_STREAM), (), low, epochs + 1)


def reaches_solver(trainable: dict) -> bool:
    """Whether gradients for `trainable` pass through an equilibrium solve.

    In every model the head (`player` modules) lies after the solve, so a head-only
    phase needs no backward linear solve. Asking for the probe's gradient there would
    run one anyway (a custom VJP is differentiated as soon as any of its inputs is),
    at the cost of a full training step per head step; the head's gradient does not
    depend on it. Without the probe the solve is a plain forward pass, as in the
    reference, whose head steps differentiate the head alone (spec 3.5, 3.8 c).
    """
    return any(HEAD_MARKER not in name for name in trainable)


def _make_step(task: Any, optimizer: OptimizerSpec | float, penalty: Penalty | None,
               backward_stats: bool = True, correction: Correction | None = None
               ) -> Callable:
    """One optimiser step (a bare lr: the reference's optax.sgd(lr)) on `trainable`,
    `frozen` held fixed.

    `backward_stats`: differentiate the solver probe to report the backward solve's
    statistics; False for head-only phases, where no gradient reaches the solve.
    The task's augmentation (if any) draws from a key of its own, so the dropout key
    and hence every model without augmentation are unchanged."""
    optimizer = as_optimizer(optimizer).build()
    augment = getattr(task, "augment", None)

    def objective(tr, probe, st, frozen, penalty_args, x, y, m, key, budget):
        if augment is not None:
            x = augment(jax.random.fold_in(key, AUGMENT_STREAM), x)
        # Only a tier's budget is passed: tasks without tiers keep their own signature.
        budgeted = () if budget is None else (budget,)
        out, new_st = task.apply(merge(frozen, tr), st, key, x, True, probe, *budgeted)
        loss = task.loss(out.logits, y, m, x)
        total = loss + task.l2(tr)
        if penalty is not None:
            total = total + penalty(tr, penalty_args, x, m, out)
        return total, (new_st, loss, out.solver_stats)

    if backward_stats:
        grad_fn = jax.grad(objective, argnums=(0, 1), has_aux=True)
    else:
        def grad_fn(tr, probe, *rest):
            del probe
            g, aux = jax.grad(lambda t: objective(t, None, *rest), has_aux=True)(tr)
            return (g, jnp.zeros((PROBE_SIZE,), jnp.float32)), aux

    def step(tr, opt_state, st, frozen, penalty_args, x, y, m, key, budget=None):
        batch = m.shape[-1]
        (g, g_probe), (st, loss, stats) = grad_fn(
            tr, jnp.zeros((PROBE_SIZE,), jnp.float32), st, frozen, penalty_args, x, y, m, key,
            budget)
        updates, opt_state = optimizer.update(g, opt_state, tr)
        tr = optax.apply_updates(tr, updates)
        if correction is not None:
            tr = correction(tr, penalty_args)
        # Backward statistics exist only where gradients went through a solve.
        solved = (g_probe[0] != 0).astype(jnp.float32)
        row = jnp.stack([1.0, loss, stats.fwd_iters, stats.fwd_residual, solved,
                         g_probe[0] / batch, g_probe[1] / batch, float(batch),
                         stats.fwd_unconverged, solved * batch, g_probe[2],
                         stats.fwd_rel_residual])
        return tr, opt_state, st, row

    return step


@functools.lru_cache(maxsize=64)
def _jitted_step(task: Any, optimizer: OptimizerSpec, penalty: Penalty | None,
                 backward_stats: bool, correction: Correction | None) -> Callable:
    return jax.jit(_make_step(task, optimizer, penalty, backward_stats, correction))


def sgd_phase(task: Any, optimizer: OptimizerSpec | float, trainable: dict, frozen: dict,
              state: dict, data: ClientData, schedule: Schedule, rng: jax.Array,
              penalty: Penalty | None = None, penalty_args: Any = None,
              correction: Correction | None = None) -> tuple[dict, dict, jnp.ndarray]:
    """Optimiser steps over the schedule on the task loss (+ l2 + `penalty(trainable,
    penalty_args, x, mask, output)` on each batch), `correction(trainable,
    penalty_args)` after each step; a fresh optimiser state for the phase.

    `penalty` and `correction` must be stable functions (they key the compiled step);
    whatever they depend on travels in `penalty_args`. Returns the new trainable params,
    the new model state, and a vector of sums in `PHASE_STATS` order (real steps, loss,
    forward solver iterations and residual, steps with a backward solve, backward iterations and
    residual, example solves, forward and backward solves that missed their tolerance).
    """
    optimizer = as_optimizer(optimizer)
    opt_state = optimizer.build().init(trainable)
    batch = schedule.idx.shape[-1]
    sums = jnp.zeros((len(PHASE_STATS),), jnp.float32)
    backward_stats = reaches_solver(trainable)
    # A tier's solver budget (deq/budget.py) enters the step as an argument, so one
    # compiled step serves every tier.
    budget = current_budget()

    if not isinstance(schedule.mask, jax.core.Tracer):
        step = _jitted_step(task, optimizer, penalty, backward_stats, correction)
        idx = np.asarray(schedule.idx).reshape(-1, batch)
        mask = np.asarray(schedule.mask).reshape(-1, batch)
        rows = []
        for k in np.flatnonzero(mask.any(axis=1)):
            trainable, opt_state, state, row = step(
                trainable, opt_state, state, frozen, penalty_args, data.x[idx[k]],
                data.y[idx[k]], jnp.asarray(mask[k]), jax.random.fold_in(rng, int(k)), budget)
            rows.append(row)
        return trainable, state, (jnp.sum(jnp.stack(rows), 0) if rows else sums)

    step = _make_step(task, optimizer, penalty, backward_stats, correction)
    idx = schedule.idx.reshape(-1, batch)
    mask = schedule.mask.reshape(-1, batch)

    def scan_step(carry, inputs):
        i, m, k = inputs

        def real_step(carry):
            tr, opt_state, st, sums = carry
            tr, opt_state, st, row = step(tr, opt_state, st, frozen, penalty_args,
                                          data.x[i], data.y[i], m, jax.random.fold_in(rng, k),
                                          budget)
            return tr, opt_state, st, sums + row

        return lax.cond(jnp.any(m), real_step, lambda c: c, carry), None

    carry = (trainable, opt_state, state, sums)
    steps = jnp.arange(idx.shape[0])
    (trainable, _, state, sums), _ = lax.scan(scan_step, carry, (idx, mask, steps))
    return trainable, state, sums
