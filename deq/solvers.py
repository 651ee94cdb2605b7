"""Forward solvers: find z with z = f(z) for one example, and say how it went.

All three are jaxopt solvers, as in the reference. Each returns the fixed point, the
iterations used and the final residual norm ||f(z) - z|| as jaxopt measures it.
"""

from collections.abc import Callable

import jax.numpy as jnp
import jaxopt

from deq.config import SolverConfig

Map = Callable[[jnp.ndarray], jnp.ndarray]


def _anderson(fun: Map, z0: jnp.ndarray, cfg: SolverConfig):
    solver = jaxopt.AndersonAcceleration(
        fixed_point_fun=fun, history_size=cfg.anderson_history, ridge=cfg.anderson_ridge,
        maxiter=cfg.maxiter, tol=cfg.tol, implicit_diff=False, jit=True)
    return solver.run(z0)


def _fpi(fun: Map, z0: jnp.ndarray, cfg: SolverConfig):
    solver = jaxopt.FixedPointIteration(
        fixed_point_fun=fun, maxiter=cfg.maxiter, tol=cfg.tol, implicit_diff=False, jit=True)
    return solver.run(z0)


def _broyden(fun: Map, z0: jnp.ndarray, cfg: SolverConfig):
    # Full Broyden steps without line search, on the root of g(z) = f(z) - z.
    solver = jaxopt.Broyden(
        fun=lambda z: fun(z) - z, maxiter=cfg.maxiter, tol=cfg.tol, stepsize=1.0,
        implicit_diff=False, jit=True)
    return solver.run(z0)


_SOLVERS = {"anderson": _anderson, "fpi": _fpi, "broyden": _broyden}


def forward_solve(fun: Map, z0: jnp.ndarray, cfg: SolverConfig
                  ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Returns (z*, iterations used, final residual) for the solver `cfg` names."""
    z, state = _SOLVERS[cfg.fwd_solver](fun, z0, cfg)
    return z, state.iter_num.astype(jnp.float32), jnp.asarray(state.error, jnp.float32)
