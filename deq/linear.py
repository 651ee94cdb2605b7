"""Backward solvers: the linear system of implicit differentiation.

At a fixed point z* = f(z*), the loss gradient needs w with (I - J^T) w = g, where J is
df/dz at z* and g the incoming cotangent. `vjp(v) = J^T v` is one reverse pass through f;
`jvp(x) = J x` is taken as the vjp of that (linear) vjp, so that only reverse-mode rules
are needed (custom-gradient convolutions have no forward-mode rule).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

Linear = Callable[[jnp.ndarray], jnp.ndarray]


def _dot(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    return jnp.vdot(a, b).real


def normal_cg(vjp: Linear, jvp: Linear, g: jnp.ndarray, tol: float, maxiter: int
              ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """CG on the normal equations M^T M w = M^T g, with M = I - J^T.

    This is what the reference's `solve_normal_cg` runs (jax's CG: x0 = 0, stop when
    ||r||^2 <= tol^2 ||b||^2 or after `maxiter` steps). Returns (w, iterations).
    """
    m = lambda v: v - vjp(v)
    mt = lambda v: v - jvp(v)
    normal = lambda v: mt(m(v))
    b = mt(g)
    stop = jnp.square(tol) * _dot(b, b)

    def cond(carry):
        _, _, gamma, _, k = carry
        return (gamma > stop) & (k < maxiter)

    def body(carry):
        x, r, gamma, p, k = carry
        ap = normal(p)
        alpha = gamma / _dot(p, ap)
        x = x + alpha * p
        r = r - alpha * ap
        gamma_new = _dot(r, r)
        p = r + (gamma_new / gamma) * p
        return x, r, gamma_new, p, k + 1

    init = (jnp.zeros_like(b), b, _dot(b, b), b, jnp.zeros((), jnp.int32))
    x, _, _, _, k = lax.while_loop(cond, body, init)
    return x, k


def gmres(vjp: Linear, jvp: Linear, g: jnp.ndarray, tol: float, maxiter: int
          ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """jax's restarted GMRES on M w = g, called as the reference calls it.

    jax does not report how many iterations GMRES used, so the count is -1; the
    residual that `fixed_point` reports is measured either way.
    """
    del jvp
    w, _ = jax.scipy.sparse.linalg.gmres(lambda v: v - vjp(v), g, tol=tol, maxiter=maxiter)
    return w, jnp.asarray(-1, jnp.int32)


BACKWARD_SOLVERS = {"normal_cg": normal_cg, "gmres": gmres}
