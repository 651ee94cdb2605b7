"""Anderson acceleration for a whole batch at once, example by example in its arithmetic.

It performs exactly the updates of jaxopt's `AndersonAcceleration` (history m, ridge,
beta = 1, no extrapolation while fewer than m iterates are stored, absolute L2 stopping
test) for every example independently, like the reference's `vmap` of jaxopt. What it
avoids is what `vmap` makes of jaxopt's loop on CPU: a per-example `cond` turned into
computing both branches, history writes turned into scatters, and the whole solver state
(the 2m stored iterates) copied through a select at every step. Here the step counter is
shared, only the returned iterate, its error and its count are frozen for examples that
have converged, and the history is written with a plain dynamic slice.
"""

from collections.abc import Callable

import jax.numpy as jnp
from jax import lax

BatchMap = Callable[[jnp.ndarray], jnp.ndarray]


def _alphas(gram: jnp.ndarray, ridge: float) -> jnp.ndarray:
    """Per example: min ||sum a_j r_j||^2 s.t. sum a_j = 1, as jaxopt's bordered system."""
    b, m, _ = gram.shape
    gram = gram + ridge * jnp.eye(m)
    top = jnp.concatenate([jnp.zeros((b, 1, 1)), jnp.ones((b, 1, m))], axis=2)
    bottom = jnp.concatenate([jnp.ones((b, m, 1)), gram], axis=2)
    h = jnp.concatenate([top, bottom], axis=1)
    c = jnp.zeros((b, m + 1)).at[:, 0].set(1.0)
    return jnp.linalg.solve(h, c[..., None])[..., 0][:, 1:]


def batched_anderson(fun: BatchMap, z0: jnp.ndarray, history: int, ridge: float,
                     maxiter: int, tol: float
                     ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Returns (z, iterations, error) per example for z = fun(z), batch on axis 0."""
    b = z0.shape[0]
    flat = lambda x: x.reshape(b, -1)
    z_hist = jnp.tile(flat(z0)[:, None], (1, history, 1))
    r_hist = jnp.zeros_like(z_hist)
    gram = jnp.zeros((b, history, history), z0.dtype)

    def update(k, params, z_hist, r_hist, gram):
        def extrapolate(_):
            a = _alphas(gram, ridge)
            return jnp.einsum("bm,bmd->bd", a, z_hist + r_hist).reshape(z0.shape)
        x = lax.cond(k >= history, extrapolate, lambda _: params, None)
        y = fun(x)
        residual = flat(y - x)
        pos = k % history
        z_hist = lax.dynamic_update_index_in_dim(z_hist, flat(x), pos, axis=1)
        r_hist = lax.dynamic_update_index_in_dim(r_hist, residual, pos, axis=1)
        row = jnp.einsum("bmd,bd->bm", r_hist, residual)
        gram = lax.dynamic_update_index_in_dim(gram, row, pos, axis=1)
        gram = lax.dynamic_update_index_in_dim(gram, row[:, :, None], pos, axis=2)
        error = jnp.sqrt(jnp.take(row, pos, axis=1))
        return y, error, z_hist, r_hist, gram

    # The first update always happens (jaxopt unrolls it), then up to maxiter - 1 more
    # while some example's error is above tol.
    y, error, z_hist, r_hist, gram = update(0, z0, z_hist, r_hist, gram)
    iters = jnp.ones((b,), jnp.int32)

    def cond(carry):
        k, _, _, error, *_ = carry
        return (k < maxiter) & jnp.any(error > tol)

    def body(carry):
        k, out, iters, error, params, z_hist, r_hist, gram = carry
        active = error > tol
        y, new_error, z_hist, r_hist, gram = update(k, params, z_hist, r_hist, gram)
        keep = active.reshape((b,) + (1,) * (z0.ndim - 1))
        out = jnp.where(keep, y, out)
        error = jnp.where(active, new_error, error)
        iters = iters + active.astype(jnp.int32)
        return k + 1, out, iters, error, y, z_hist, r_hist, gram

    carry = (jnp.asarray(1), y, iters, error, y, z_hist, r_hist, gram)
    _, out, iters, error, *_ = lax.while_loop(cond, body, carry)
    return out, iters, error
