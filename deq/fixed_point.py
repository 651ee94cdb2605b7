"""The equilibrium layer: z* = f(z*, u), solved per example, differentiated implicitly.

Nothing of the forward iterations is kept for the backward pass: the gradient comes from
one linear solve at z* (see deq/linear.py), which is where the DEQ memory saving is.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from deq.config import SolverConfig
from deq.linear import BACKWARD_SOLVERS
from deq.solvers import forward_solve
from deq.stats import SolverStats

BlockFn = Callable[[Any, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def _relative_residual(m, w: jnp.ndarray, g: jnp.ndarray) -> jnp.ndarray:
    return jnp.linalg.norm((m(w) - g).ravel()) / jnp.maximum(jnp.linalg.norm(g.ravel()), 1e-30)


def _single_example_solver(f: BlockFn, cfg: SolverConfig):
    """A custom-vjp solve of one example; `f` works on batches, so add a unit batch axis."""

    def f1(params, z, u):
        return f(params, z[None], u[None])[0]

    def forward(params, u, z0):
        return forward_solve(lambda z: f1(params, z, u), z0, cfg)

    @jax.custom_vjp
    def solve(params, u, z0, probe):
        del probe
        return forward(params, u, z0)

    def solve_fwd(params, u, z0, probe):
        del probe
        z, iters, residual = forward(params, u, z0)
        return (z, iters, residual), (params, u, z, z0)

    def solve_bwd(saved, cotangents):
        params, u, z, z0 = saved
        g = cotangents[0]
        _, vjp_z = jax.vjp(lambda zz: f1(params, zz, u), z)
        vjp = lambda v: vjp_z(v)[0]
        _, transpose_of_vjp = jax.vjp(vjp, jnp.zeros_like(z))
        jvp = lambda x: transpose_of_vjp(x)[0]
        w, iters = BACKWARD_SOLVERS[cfg.bwd_solver](vjp, jvp, g, cfg.bwd_tol, cfg.bwd_maxiter)
        residual = _relative_residual(lambda v: v - vjp(v), w, g)
        _, vjp_params_u = jax.vjp(lambda p, uu: f1(p, z, uu), params, u)
        d_params, d_u = vjp_params_u(w)
        probe_ct = jnp.stack([iters.astype(jnp.float32), residual.astype(jnp.float32)])
        return d_params, d_u, jnp.zeros_like(z0), probe_ct

    solve.defvjp(solve_fwd, solve_bwd)
    return solve


def fixed_point(f: BlockFn, params: Any, u: jnp.ndarray, z0: jnp.ndarray,
                probe: jnp.ndarray | None, cfg: SolverConfig
                ) -> tuple[jnp.ndarray, SolverStats]:
    """Solves z = f(params, z, u) for every example of the batch (leading axis).

    Per example, as the reference does (it vmaps its solver): every example has its own
    Anderson mixing weights and its own stopping test, forward and backward.

    `probe` (float32, shape (2,), zeros) exists only to carry the backward solve's
    statistics out: its gradient is [sum of backward iterations, sum of backward relative
    residuals] over the batch. Pass None when no backward statistics are wanted.
    """
    if probe is None:
        probe = jnp.zeros((2,), jnp.float32)
    solve = _single_example_solver(f, cfg)
    z, iters, residual = jax.vmap(solve, in_axes=(None, 0, 0, None))(params, u, z0, probe)
    return z, SolverStats(jnp.mean(iters), jnp.mean(residual))
