"""Limited-memory "good" Broyden root finding for a whole batch at once.

This is the solver the DEQ-Transformer of the reference uses, forward (the root of
g(z) = f(z) - z) and backward (the root of h(w) = J^T w + grad - w). Its traits, which
the reference's numbers depend on and which are therefore kept:

* the inverse Jacobian starts at -I (so the first step is one fixed-point iteration of f)
  and receives one Sherman-Morrison rank-one update per step, kept as low-rank factors
  per example: B = -I + sum_i u_i v_i^T, with the oldest pair overwritten once `memory`
  pairs are stored;
* full steps, no line search;
* one stopping test for the whole batch, ||g||_2 over every number of the batch
  <= tol * sqrt(number of elements), and a protective stop when that norm grows past
  `protect` times its starting value;
* the answer is the best iterate seen, not the last one.

One choice differs from the reference: the best iterate is tracked per example (the
reference keeps the batch-wide best). Examples never interact in the update, so this
gives every example its own lowest residual instead of the one of a compromise step.

Memory: 2 * memory * (numbers per example) floats per example, nothing per step beyond
that, and nothing is kept for reverse-mode differentiation: callers use implicit
differentiation (deq/fixed_point.py).
"""

from collections.abc import Callable

import jax.numpy as jnp
from jax import lax

BatchMap = Callable[[jnp.ndarray], jnp.ndarray]

PROTECT = 1e5
"""Stop when the batch residual exceeds this multiple of its initial value (the reference's
protective break): past that, Broyden has diverged and further steps only waste time."""


def _apply(us: jnp.ndarray, vs: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """B y with B = -I + sum_i u_i v_i^T, per example."""
    return -y + jnp.einsum("bmn,bm->bn", us, jnp.einsum("bmn,bn->bm", vs, y))


def _apply_t(us: jnp.ndarray, vs: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """B^T y, per example."""
    return -y + jnp.einsum("bmn,bm->bn", vs, jnp.einsum("bmn,bn->bm", us, y))


def broyden(fun: BatchMap, x0: jnp.ndarray, maxiter: int, tol: float,
            memory: int | None = None, protect: float = PROTECT
            ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Finds x with fun(x) = 0 for every example (batch on axis 0).

    Returns (best x, steps taken, ||fun(best x)||_2 per example). `memory` defaults to
    `maxiter`, i.e. no rank-one update is ever forgotten.
    """
    b = x0.shape[0]
    shape = x0.shape
    flat = lambda a: a.reshape(b, -1)
    x = flat(x0)
    n = x.shape[1]
    m = int(memory or maxiter)
    threshold = tol * float(b * n) ** 0.5
    gx = flat(fun(x0))
    norms = jnp.linalg.norm(gx, axis=1)
    objective = jnp.linalg.norm(norms)
    initial = objective
    us = jnp.zeros((b, m, n), x.dtype)
    vs = jnp.zeros((b, m, n), x.dtype)

    def cond(carry):
        k, _, _, _, _, _, _, objective, diverged = carry
        return (k < maxiter) & (objective > threshold) & ~diverged

    def body(carry):
        k, x, gx, us, vs, best_x, best_norm, _, _ = carry
        dx = -_apply(us, vs, gx)
        x = x + dx
        g_new = flat(fun(x.reshape(shape)))
        dg = g_new - gx
        # Sherman-Morrison: B <- B + (dx - B dg) (dx^T B) / (dx^T B dg).
        vt = _apply_t(us, vs, dx)
        denom = jnp.sum(vt * dg, axis=1, keepdims=True)
        ok = jnp.abs(denom) > 1e-30
        u = jnp.where(ok, (dx - _apply(us, vs, dg)) / jnp.where(ok, denom, 1.0), 0.0)
        vt = jnp.where(ok, vt, 0.0)
        slot = k % m
        us = lax.dynamic_update_index_in_dim(us, u, slot, axis=1)
        vs = lax.dynamic_update_index_in_dim(vs, vt, slot, axis=1)
        norms = jnp.linalg.norm(g_new, axis=1)
        better = norms < best_norm  # False for NaN: a blown-up step is never the answer
        best_x = jnp.where(better[:, None], x, best_x)
        best_norm = jnp.where(better, norms, best_norm)
        objective = jnp.linalg.norm(norms)
        return (k + 1, x, g_new, us, vs, best_x, best_norm, objective,
                ~(objective <= protect * initial))

    carry = (jnp.zeros((), jnp.int32), x, gx, us, vs, x, norms, objective,
             jnp.zeros((), bool))
    k, _, _, _, _, best_x, best_norm, _, _ = lax.while_loop(cond, body, carry)
    return best_x.reshape(shape), jnp.full((b,), k, jnp.int32), best_norm
