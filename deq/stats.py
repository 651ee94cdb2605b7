"""Solver statistics that travel out of a fixed-point solve."""

from typing import NamedTuple

import jax.numpy as jnp


class SolverStats(NamedTuple):
    """Forward-solve statistics of a batch: iterations and residual averaged over its
    examples, and how many examples' solves stopped without meeting the solver's own
    tolerance.

    They are returned next to the equilibrium so that a run can log whether the fixed
    point was actually reached (the reference never reports it).
    """

    fwd_iters: jnp.ndarray
    fwd_residual: jnp.ndarray
    fwd_unconverged: jnp.ndarray
    fwd_rel_residual: jnp.ndarray  # residual / ||z||, averaged over the examples

    @staticmethod
    def zeros() -> "SolverStats":
        zero = jnp.zeros((), jnp.float32)
        return SolverStats(zero, zero, zero, zero)
