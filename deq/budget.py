"""A per-client solver budget: iteration caps, tolerance and hidden width as *data*.

FeDEQ's tiers (trainers/algorithms/deq_tiers.py) give clients different solver
iteration caps and block widths. Passing them as traced arrays instead of static solver
settings keeps one compiled program for every tier: the caps only bound `while` loops
and the width is a channel mask, so nothing about the program's shapes changes.

The budget travels from the tier wrapper to the jitted training step through a context
variable that `trainers/local.py` reads and then passes *explicitly* as an argument of
the step (a value captured from a context inside a cached jitted function would be
baked in as a constant and silently reused for another tier). Context variables are per
thread, so the `threads` executor's clients each see their own.
"""

import contextlib
import contextvars
from collections.abc import Iterator
from typing import NamedTuple

import jax.numpy as jnp


class SolverBudget(NamedTuple):
    """`maxiter`/`tol`: the forward solver's cap and tolerance; `bwd_maxiter`: the
    backward solver's cap (for `unrolled`, its number of steps); `hidden`: 1.0 for the
    block's hidden channels the client owns, 0.0 for the others (shape: the hidden
    width), or None for all of them."""

    maxiter: jnp.ndarray
    tol: jnp.ndarray
    bwd_maxiter: jnp.ndarray
    hidden: jnp.ndarray | None = None

    @staticmethod
    def of(maxiter: int, tol: float, bwd_maxiter: int, hidden=None) -> "SolverBudget":
        return SolverBudget(jnp.asarray(maxiter, jnp.int32), jnp.asarray(tol, jnp.float32),
                            jnp.asarray(bwd_maxiter, jnp.int32),
                            None if hidden is None else jnp.asarray(hidden, jnp.float32))


_ACTIVE: contextvars.ContextVar[SolverBudget | None] = contextvars.ContextVar(
    "solver_budget", default=None)


@contextlib.contextmanager
def use_budget(budget: SolverBudget | None) -> Iterator[None]:
    """Within the block, training steps solve under `budget` (None: the model's own
    static solver settings)."""
    token = _ACTIVE.set(budget)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def current_budget() -> SolverBudget | None:
    return _ACTIVE.get()


def caps_only(budget: SolverBudget | None) -> SolverBudget | None:
    """For blocks without width tiers (the DEQ-Transformer, the toy MLP): a budget that
    narrows the hidden width is refused rather than ignored."""
    if budget is not None and budget.hidden is not None:
        raise ValueError("this model's equilibrium block has no width tiers; give every "
                         "tier width 1 (iteration caps and tolerances still apply)")
    return budget
