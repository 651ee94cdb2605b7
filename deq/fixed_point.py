"""The equilibrium layer: z* = f(z*, u), solved per example, differentiated implicitly.

Nothing of the forward iterations is kept for the backward pass: the gradient comes from
one linear solve at z* (see deq/linear.py), which is where the DEQ memory saving is.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from deq.anderson import batched_anderson
from deq.broyden import broyden
from deq.budget import SolverBudget
from deq.config import APPROXIMATE_BWD, SolverConfig
from deq.linear import BACKWARD_SOLVERS
from deq.solvers import forward_solve
from deq.stats import SolverStats

BlockFn = Callable[[Any, jnp.ndarray, jnp.ndarray], jnp.ndarray]
PROBE_SIZE = 3  # backward statistics carried out through the probe's gradient


def _per_example(f: BlockFn) -> BlockFn:
    # u may be a pytree (the DEQ-Transformer injects (embeddings, padding mask)).
    add_axis = lambda t: jax.tree.map(lambda a: a[None], t)
    return lambda params, z, u: f(params, z[None], add_axis(u))[0]


def _limits(cfg: SolverConfig, budget: SolverBudget | None):
    """(forward cap, forward tolerance, backward cap): the budget's traced values, or the
    static settings."""
    if budget is None:
        return cfg.maxiter, cfg.tol, cfg.bwd_maxiter
    return budget.maxiter, budget.tol, budget.bwd_maxiter


def _forward(f: BlockFn, params, u, z0, cfg: SolverConfig, budget: SolverBudget | None = None):
    """(z*, iterations, residual) per example."""
    maxiter, tol, _ = _limits(cfg, budget)
    if cfg.fwd_solver == "anderson" and cfg.anderson_impl == "batched":
        return batched_anderson(lambda z: f(params, z, u), z0, cfg.anderson_history,
                                cfg.anderson_ridge, maxiter, tol)
    if cfg.fwd_solver == "broyden" and cfg.broyden_impl == "batched":
        # The rank-one memory is sized by the static cap, which a budget may not exceed.
        return broyden(lambda z: f(params, z, u) - z, z0, maxiter, tol, memory=cfg.maxiter)
    if budget is not None:
        raise ValueError("a solver budget (--tiers) needs a batched forward solver: "
                         "--fwd_solver anderson with the batched implementation, or the "
                         "batched Broyden")
    f1 = _per_example(f)
    return jax.vmap(lambda uu, zz: forward_solve(lambda z: f1(params, z, uu), zz, cfg))(u, z0)


def _backward_one(f: BlockFn, params, cfg: SolverConfig, bwd_maxiter):
    """Solves (I - J^T) w = g for one example; returns (w, iterations, relative residual,
    whether the solver's own stopping test was met)."""
    f1 = _per_example(f)

    def solve(z, u, g):
        _, vjp_z = jax.vjp(lambda zz: f1(params, zz, u), z)
        vjp = lambda v: vjp_z(v)[0]
        _, transpose_of_vjp = jax.vjp(vjp, jnp.zeros_like(z))
        jvp = lambda x: transpose_of_vjp(x)[0]
        w, iters, converged = BACKWARD_SOLVERS[cfg.bwd_solver](vjp, jvp, g, cfg.bwd_tol,
                                                               bwd_maxiter)
        gap = w - vjp(w) - g
        residual = jnp.linalg.norm(gap.ravel()) / jnp.maximum(jnp.linalg.norm(g.ravel()), 1e-30)
        return w, iters.astype(jnp.float32), residual, converged

    return solve


def _linear_residual(vjp, w, g):
    """Per example ||w - J^T w - g|| / ||g||: how far w is from the implicit gradient's."""
    b = g.shape[0]
    gap = (w - vjp(w) - g).reshape(b, -1)
    return (jnp.linalg.norm(gap, axis=1)
            / jnp.maximum(jnp.linalg.norm(g.reshape(b, -1), axis=1), 1e-30))


def _backward_approximate(f: BlockFn, params, cfg: SolverConfig, bwd_maxiter, z, u, g):
    """The gradients that do not assume a fixed point: w = sum_{j<k} (J^T)^j g, with J
    taken at the returned iterate. k = 1 is the Jacobian-free (one-step) gradient; k
    steps equal back-propagating through k applications of f started from the
    (detached) equilibrium, which is what a k-step unrolled gradient is at a fixed point.
    With k = `bwd_maxiter` steps for "unrolled"."""
    _, vjp_z = jax.vjp(lambda zz: f(params, zz, u), z)
    vjp = lambda v: vjp_z(v)[0]
    steps = 1 if cfg.bwd_solver == "jacobian_free" else bwd_maxiter

    def term(_, carry):
        w, power = carry
        power = vjp(power)
        return w + power, power

    w, _ = lax.fori_loop(1, steps, term, (g, g)) if cfg.bwd_solver == "unrolled" else (g, g)
    residual = _linear_residual(vjp, w, g)
    iters = jnp.full(residual.shape, steps, jnp.float32)
    return w, iters, residual, residual <= cfg.bwd_tol


def _backward_batched_broyden(f: BlockFn, params, cfg: SolverConfig, bwd_maxiter, z, u, g):
    """Solves w = J^T w + g for the whole batch by Broyden from w = 0, as the
    DEQ-Transformer's reference does (one stopping test for the batch)."""
    _, vjp_z = jax.vjp(lambda zz: f(params, zz, u), z)
    vjp = lambda v: vjp_z(v)[0]
    w, iters, norms = broyden(lambda w: vjp(w) + g - w, jnp.zeros_like(g), bwd_maxiter,
                              cfg.bwd_tol, memory=cfg.bwd_maxiter)
    residual = _linear_residual(vjp, w, g)
    return w, iters.astype(jnp.float32), residual, _batch_test_met(norms, g, cfg.bwd_tol)


def _batch_test_met(norms: jnp.ndarray, x: jnp.ndarray, tol: float) -> jnp.ndarray:
    """The batched Broyden's one stopping test (||g|| over the batch <= tol * sqrt(size)),
    repeated for every example: its examples converge or fail together."""
    met = jnp.linalg.norm(norms) <= tol * jnp.sqrt(jnp.asarray(x.size, jnp.float32))
    return jnp.broadcast_to(met, norms.shape)


def _forward_converged(cfg: SolverConfig, residual: jnp.ndarray, z: jnp.ndarray, tol
                       ) -> jnp.ndarray:
    """Per example, whether the forward solve met its solver's own tolerance."""
    if cfg.fwd_solver == "broyden" and cfg.broyden_impl == "batched":
        return _batch_test_met(residual, z, tol)
    return residual <= tol


def _make_solver(f: BlockFn, cfg: SolverConfig):
    def primal(params, u, z0, resolve, budget):
        z, iters, residual = _forward(f, params, u, z0, cfg, budget)
        if cfg.final_step:
            z = f(params, z, u)
        if resolve:
            z, more, residual = _forward(f, params, u, z, cfg, budget)
            iters = iters + more
        return z, iters, residual

    @jax.custom_vjp
    def solve(params, u, z0, probe, budget):
        # Used only when nothing differentiates through the solve (evaluation).
        del probe
        return primal(params, u, z0, cfg.eval_resolve, budget)

    def solve_fwd(params, u, z0, probe, budget):
        del probe
        z, iters, residual = _forward(f, params, u, z0, cfg, budget)
        out = f(params, z, u) if cfg.final_step else z
        return (out, iters, residual), (params, u, z, z0, budget)

    def solve_bwd(saved, cotangents):
        params, u, z, z0, budget = saved
        bwd_maxiter = _limits(cfg, budget)[2]
        g = cotangents[0]
        # With final_step the output is f(z*), whose derivative at a fixed point is that of
        # z* itself, so the same linear solve serves both.
        if cfg.bwd_solver in APPROXIMATE_BWD:
            w, iters, residual, converged = _backward_approximate(f, params, cfg, bwd_maxiter,
                                                                  z, u, g)
        elif cfg.bwd_solver == "broyden":
            w, iters, residual, converged = _backward_batched_broyden(f, params, cfg,
                                                                      bwd_maxiter, z, u, g)
        else:
            # Every example has its own linear solve and stopping test, as in the reference.
            w, iters, residual, converged = jax.vmap(_backward_one(f, params, cfg,
                                                                   bwd_maxiter))(z, u, g)
        _, vjp_params_u = jax.vjp(lambda p, uu: f(p, z, uu), params, u)
        d_params, d_u = vjp_params_u(w)
        probe_ct = jnp.stack([jnp.sum(iters), jnp.sum(residual),
                              jnp.sum(~converged).astype(jnp.float32)])
        return d_params, d_u, jnp.zeros_like(z0), probe_ct, _zero_cotangent(budget)

    solve.defvjp(solve_fwd, solve_bwd)
    return solve


def _zero_cotangent(tree):
    """Zero cotangents for the budget (integer leaves take float0, as JAX requires)."""
    def zero(x):
        if jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.zeros_like(x)
        return np.zeros(x.shape, jax.dtypes.float0)
    return jax.tree.map(zero, tree)


def fixed_point(f: BlockFn, params: Any, u: jnp.ndarray, z0: jnp.ndarray,
                probe: jnp.ndarray | None, cfg: SolverConfig,
                budget: SolverBudget | None = None) -> tuple[jnp.ndarray, SolverStats]:
    """Solves z = f(params, z, u) for every example of the batch (leading axis).

    Per example, as the reference does (it vmaps its solver): every example has its own
    Anderson mixing weights and its own stopping test, forward and backward. The batched
    Broyden (`broyden_impl="batched"`, `bwd_solver="broyden"`) is the exception: like the
    DEQ-Transformer's reference, it has one stopping test for the whole batch.

    `probe` (float32, shape (PROBE_SIZE,), zeros) exists only to carry the backward
    solve's statistics out: its gradient is [sum of backward iterations, sum of backward
    relative residuals, number of backward solves that missed their tolerance] over the
    batch. Pass None when no backward statistics are wanted.

    `budget` (deq/budget.py): traced caps and tolerance that replace the static ones, so
    that clients of different tiers share one compiled program.
    """
    if probe is None:
        probe = jnp.zeros((PROBE_SIZE,), jnp.float32)
    z, iters, residual = _make_solver(f, cfg)(params, u, z0, probe, budget)
    # The forward output may be f(z*) (final_step); the residual is that of z* itself.
    tol = _limits(cfg, budget)[1]
    unconverged = jnp.sum(~_forward_converged(cfg, residual, z, tol)).astype(jnp.float32)
    # Relative to the iterate's norm (z is f(z_k) or z_k, equal up to the residual): what
    # lets tiers with different caps be compared whatever the scale of z.
    b = z.shape[0]
    scale = jnp.maximum(jnp.linalg.norm(jax.lax.stop_gradient(z).reshape(b, -1), axis=1),
                        1e-30)
    relative = jnp.mean(residual.astype(jnp.float32) / scale)
    return z, SolverStats(jnp.mean(iters.astype(jnp.float32)),
                          jnp.mean(residual.astype(jnp.float32)), unconverged, relative)
