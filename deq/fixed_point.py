"""The equilibrium layer: z* = f(z*, u), solved per example, differentiated implicitly.

Nothing of the forward iterations is kept for the backward pass: the gradient comes from
one linear solve at z* (see deq/linear.py), which is where the DEQ memory saving is.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from deq.anderson import batched_anderson
from deq.broyden import broyden
from deq.config import SolverConfig
from deq.linear import BACKWARD_SOLVERS
from deq.solvers import forward_solve
from deq.stats import SolverStats

BlockFn = Callable[[Any, jnp.ndarray, jnp.ndarray], jnp.ndarray]
PROBE_SIZE = 3  # backward statistics carried out through the probe's gradient


def _per_example(f: BlockFn) -> BlockFn:
    # u may be a pytree (the DEQ-Transformer injects (embeddings, padding mask)).
    add_axis = lambda t: jax.tree.map(lambda a: a[None], t)
    return lambda params, z, u: f(params, z[None], add_axis(u))[0]


def _forward(f: BlockFn, params, u, z0, cfg: SolverConfig):
    """(z*, iterations, residual) per example."""
    if cfg.fwd_solver == "anderson" and cfg.anderson_impl == "batched":
        return batched_anderson(lambda z: f(params, z, u), z0, cfg.anderson_history,
                                cfg.anderson_ridge, cfg.maxiter, cfg.tol)
    if cfg.fwd_solver == "broyden" and cfg.broyden_impl == "batched":
        return broyden(lambda z: f(params, z, u) - z, z0, cfg.maxiter, cfg.tol)
    f1 = _per_example(f)
    return jax.vmap(lambda uu, zz: forward_solve(lambda z: f1(params, z, uu), zz, cfg))(u, z0)


def _backward_one(f: BlockFn, params, cfg: SolverConfig):
    """Solves (I - J^T) w = g for one example; returns (w, iterations, relative residual,
    whether the solver's own stopping test was met)."""
    f1 = _per_example(f)

    def solve(z, u, g):
        _, vjp_z = jax.vjp(lambda zz: f1(params, zz, u), z)
        vjp = lambda v: vjp_z(v)[0]
        _, transpose_of_vjp = jax.vjp(vjp, jnp.zeros_like(z))
        jvp = lambda x: transpose_of_vjp(x)[0]
        w, iters, converged = BACKWARD_SOLVERS[cfg.bwd_solver](vjp, jvp, g, cfg.bwd_tol,
                                                               cfg.bwd_maxiter)
        gap = w - vjp(w) - g
        residual = jnp.linalg.norm(gap.ravel()) / jnp.maximum(jnp.linalg.norm(g.ravel()), 1e-30)
        return w, iters.astype(jnp.float32), residual, converged

    return solve


def _backward_batched_broyden(f: BlockFn, params, cfg: SolverConfig, z, u, g):
    """Solves w = J^T w + g for the whole batch by Broyden from w = 0, as the
    DEQ-Transformer's reference does (one stopping test for the batch)."""
    _, vjp_z = jax.vjp(lambda zz: f(params, zz, u), z)
    vjp = lambda v: vjp_z(v)[0]
    w, iters, norms = broyden(lambda w: vjp(w) + g - w, jnp.zeros_like(g), cfg.bwd_maxiter,
                              cfg.bwd_tol)
    b = g.shape[0]
    gap = (w - vjp(w) - g).reshape(b, -1)
    residual = (jnp.linalg.norm(gap, axis=1)
                / jnp.maximum(jnp.linalg.norm(g.reshape(b, -1), axis=1), 1e-30))
    return w, iters.astype(jnp.float32), residual, _batch_test_met(norms, g, cfg.bwd_tol)


def _batch_test_met(norms: jnp.ndarray, x: jnp.ndarray, tol: float) -> jnp.ndarray:
    """The batched Broyden's one stopping test (||g|| over the batch <= tol * sqrt(size)),
    repeated for every example: its examples converge or fail together."""
    met = jnp.linalg.norm(norms) <= tol * jnp.sqrt(jnp.asarray(x.size, jnp.float32))
    return jnp.broadcast_to(met, norms.shape)


def _forward_converged(cfg: SolverConfig, residual: jnp.ndarray, z: jnp.ndarray
                       ) -> jnp.ndarray:
    """Per example, whether the forward solve met its solver's own tolerance."""
    if cfg.fwd_solver == "broyden" and cfg.broyden_impl == "batched":
        return _batch_test_met(residual, z, cfg.tol)
    return residual <= cfg.tol


def _make_solver(f: BlockFn, cfg: SolverConfig):
    def primal(params, u, z0, resolve):
        z, iters, residual = _forward(f, params, u, z0, cfg)
        if cfg.final_step:
            z = f(params, z, u)
        if resolve:
            z, more, residual = _forward(f, params, u, z, cfg)
            iters = iters + more
        return z, iters, residual

    @jax.custom_vjp
    def solve(params, u, z0, probe):
        # Used only when nothing differentiates through the solve (evaluation).
        del probe
        return primal(params, u, z0, cfg.eval_resolve)

    def solve_fwd(params, u, z0, probe):
        del probe
        z, iters, residual = _forward(f, params, u, z0, cfg)
        out = f(params, z, u) if cfg.final_step else z
        return (out, iters, residual), (params, u, z, z0)

    def solve_bwd(saved, cotangents):
        params, u, z, z0 = saved
        # With final_step the output is f(z*), whose derivative at a fixed point is that of
        # z* itself, so the same linear solve serves both.
        if cfg.bwd_solver == "broyden":
            w, iters, residual, converged = _backward_batched_broyden(f, params, cfg, z, u,
                                                                      cotangents[0])
        else:
            # Every example has its own linear solve and stopping test, as in the reference.
            w, iters, residual, converged = jax.vmap(_backward_one(f, params, cfg))(
                z, u, cotangents[0])
        _, vjp_params_u = jax.vjp(lambda p, uu: f(p, z, uu), params, u)
        d_params, d_u = vjp_params_u(w)
        probe_ct = jnp.stack([jnp.sum(iters), jnp.sum(residual),
                              jnp.sum(~converged).astype(jnp.float32)])
        return d_params, d_u, jnp.zeros_like(z0), probe_ct

    solve.defvjp(solve_fwd, solve_bwd)
    return solve


def fixed_point(f: BlockFn, params: Any, u: jnp.ndarray, z0: jnp.ndarray,
                probe: jnp.ndarray | None, cfg: SolverConfig
                ) -> tuple[jnp.ndarray, SolverStats]:
    """Solves z = f(params, z, u) for every example of the batch (leading axis).

    Per example, as the reference does (it vmaps its solver): every example has its own
    Anderson mixing weights and its own stopping test, forward and backward. The batched
    Broyden (`broyden_impl="batched"`, `bwd_solver="broyden"`) is the exception: like the
    DEQ-Transformer's reference, it has one stopping test for the whole batch.

    `probe` (float32, shape (PROBE_SIZE,), zeros) exists only to carry the backward
    solve's statistics out: its gradient is [sum of backward iterations, sum of backward
    relative residuals, number of backward solves that missed their tolerance] over the
    batch. Pass None when no backward statistics are wanted.
    """
    if probe is None:
        probe = jnp.zeros((PROBE_SIZE,), jnp.float32)
    z, iters, residual = _make_solver(f, cfg)(params, u, z0, probe)
    # The forward output may be f(z*) (final_step); the residual is that of z* itself.
    unconverged = jnp.sum(~_forward_converged(cfg, residual, z)).astype(jnp.float32)
    return z, SolverStats(jnp.mean(iters.astype(jnp.float32)),
                          jnp.mean(residual.astype(jnp.float32)), unconverged)
