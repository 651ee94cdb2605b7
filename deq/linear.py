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
              ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """CG on the normal equations M^T M w = M^T g, with M = I - J^T.

    This is what the reference's `solve_normal_cg` runs (jax's CG: x0 = 0, stop when
    ||r||^2 <= tol^2 ||b||^2 or after `maxiter` steps). Returns (w, iterations, whether
    the stopping test was met).
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
    x, _, gamma, _, k = lax.while_loop(cond, body, init)
    return x, k, gamma <= stop


def gmres(vjp: Linear, jvp: Linear, g: jnp.ndarray, tol: float, maxiter: int,
          restart: int = 20) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Restarted GMRES on M w = g (M = I - J^T), counting its Arnoldi steps.

    Called as the reference calls jax's GMRES (x0 = 0, stop at ||r|| <= tol ||g||, at most
    `maxiter` restart cycles of `restart` steps), but written out because jax does not
    report how many steps it used. Like jax's "incremental" method it stops inside a cycle
    as soon as the Givens-rotated residual is small enough; the solution agrees with
    jax's to the tolerance. Needs only vjp (one reverse pass per step), not jvp.
    Returns (w, Arnoldi steps, whether the stopping test was met).
    """
    del jvp
    shape, dtype = g.shape, g.dtype
    b = g.reshape(-1)
    matvec = lambda v: (lambda u: u - vjp(u))(v.reshape(shape)).reshape(-1)
    atol = tol * jnp.linalg.norm(b)
    rows = jnp.arange(restart + 1)

    def arnoldi_step(carry):
        basis, hess, cs, sn, e, j = carry
        w = matvec(basis[j])
        keep = (rows <= j).astype(dtype)
        h = (basis @ w) * keep                       # classical Gram-Schmidt, twice
        w = w - basis.T @ h
        h2 = (basis @ w) * keep
        w = w - basis.T @ h2
        h = h + h2
        h_next = jnp.linalg.norm(w)
        basis = basis.at[j + 1].set(jnp.where(h_next > 0, w / jnp.where(h_next > 0, h_next, 1),
                                              0.0))
        h = h.at[j + 1].set(h_next)

        def rotate(i, col):                          # earlier rotations on the new column
            a, c = col[i], col[i + 1]
            return col.at[i].set(cs[i] * a + sn[i] * c).at[i + 1].set(-sn[i] * a + cs[i] * c)

        h = lax.fori_loop(0, j, rotate, h)
        denom = jnp.hypot(h[j], h[j + 1])
        safe = jnp.where(denom > 0, denom, 1.0)
        c, s = jnp.where(denom > 0, h[j] / safe, 1.0), jnp.where(denom > 0, h[j + 1] / safe, 0.0)
        h = h.at[j].set(denom).at[j + 1].set(0.0)
        cs, sn = cs.at[j].set(c), sn.at[j].set(s)
        e = e.at[j + 1].set(-s * e[j]).at[j].set(c * e[j])
        return basis, hess.at[:, j].set(h), cs, sn, e, j + 1

    def cycle(carry):
        x, _, total, cycles = carry
        r = b - matvec(x)
        beta = jnp.linalg.norm(r)
        basis = jnp.zeros((restart + 1, b.size), dtype).at[0].set(
            r / jnp.where(beta > 0, beta, 1.0))
        hess = jnp.zeros((restart + 1, restart), dtype)
        e = jnp.zeros((restart + 1,), dtype).at[0].set(beta)
        zeros = jnp.zeros((restart,), dtype)
        init = (basis, hess, zeros, zeros, e, jnp.zeros((), jnp.int32))
        go = lambda c: (c[5] < restart) & (jnp.abs(c[4][c[5]]) > atol)
        basis, hess, _, _, e, k = lax.while_loop(go, arnoldi_step, init)
        # Solve the k x k upper-triangular system; unused rows/columns become identity.
        used = jnp.arange(restart) < k
        tri = jnp.where(used[:, None] & used[None, :], hess[:restart], jnp.diag(~used * 1.0))
        y = jax.scipy.linalg.solve_triangular(tri, jnp.where(used, e[:restart], 0.0))
        x = x + basis[:restart].T @ y
        return x, jnp.abs(e[k]), total + k, cycles + 1

    def more(carry):
        _, res, _, cycles = carry
        return (res > atol) & (cycles < maxiter)

    init = (jnp.zeros_like(b), jnp.linalg.norm(b), jnp.zeros((), jnp.int32),
            jnp.zeros((), jnp.int32))
    x, res, total, _ = lax.while_loop(more, cycle, init)
    return x.reshape(shape), total, res <= atol


BACKWARD_SOLVERS = {"normal_cg": normal_cg, "gmres": gmres}
