"""Solver statistics that travel out of a fixed-point solve."""

from typing import NamedTuple

import jax.numpy as jnp


class SolverStats(NamedTuple):
    """Forward-solve statistics, averaged over the examples of a batch.

    They are returned next to the equilibrium so that a run can log whether the fixed
    point was actually reached (the reference never reports it).
    """

    fwd_iters: jnp.ndarray
    fwd_residual: jnp.ndarray

    @staticmethod
    def zeros() -> "SolverStats":
        return SolverStats(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
