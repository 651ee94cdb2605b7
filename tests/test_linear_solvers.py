"""The backward solvers on an explicit linear system: right answer, honest step counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deq.linear import gmres, normal_cg


def _system(n=40, seed=0, spread=0.9):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.orthogonal(k1, n)
    j = q @ jnp.diag(jnp.linspace(-spread, spread, n)) @ jax.random.orthogonal(k2, n)
    g = jax.random.normal(k3, (4, n // 4))   # solvers see the cotangent's own shape
    vjp = lambda v: (j.T @ v.reshape(-1)).reshape(v.shape)
    jvp = lambda v: (j @ v.reshape(-1)).reshape(v.shape)
    exact = np.linalg.solve(np.eye(n) - np.asarray(j).T, np.asarray(g).reshape(-1))
    return vjp, jvp, g, exact


@pytest.mark.parametrize("solver", [gmres, normal_cg])
def test_solver_reaches_the_exact_solution(solver):
    vjp, jvp, g, exact = _system()
    w, steps, converged = jax.jit(lambda g: solver(vjp, jvp, g, 1e-6, 200))(g)
    assert w.shape == g.shape
    np.testing.assert_allclose(np.asarray(w).reshape(-1), exact, rtol=1e-4, atol=1e-5)
    assert 0 < int(steps) <= 200 * (20 if solver is gmres else 1)
    assert bool(converged)


def test_gmres_counts_steps_across_restarts_and_agrees_with_jax():
    vjp, jvp, g, exact = _system(n=80, spread=0.97)
    w, steps, converged = gmres(vjp, jvp, g, 1e-6, 50, restart=5)
    assert int(steps) > 5, "a hard system should need more than one restart cycle"
    ref, _ = jax.scipy.sparse.linalg.gmres(lambda v: v - vjp(v), g, tol=1e-6, maxiter=50,
                                           restart=5)
    np.testing.assert_allclose(w, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(w).reshape(-1), exact, rtol=1e-4, atol=1e-5)


def test_loose_tolerance_stops_early():
    vjp, jvp, g, _ = _system()
    _, loose, _ = gmres(vjp, jvp, g, 1e-1, 50)
    _, tight, _ = gmres(vjp, jvp, g, 1e-6, 50)
    assert 0 < int(loose) < int(tight)


def test_zero_cotangent_takes_no_steps():
    vjp, jvp, g, _ = _system()
    w, steps, converged = gmres(vjp, jvp, jnp.zeros_like(g), 1e-3, 50)
    assert int(steps) == 0 and not np.any(np.asarray(w)) and bool(converged)


def test_gmres_works_under_vmap():
    vjp, jvp, g, exact = _system()
    ws, steps, _ = jax.vmap(lambda x: gmres(vjp, jvp, x, 1e-6, 50))(jnp.stack([g, 2 * g]))
    np.testing.assert_allclose(np.asarray(ws[1]).reshape(-1), 2 * exact, rtol=1e-4, atol=1e-5)
    assert steps.shape == (2,)


@pytest.mark.parametrize("solver", [normal_cg, gmres])
def test_solver_says_when_it_stopped_at_its_cap(solver):
    vjp, jvp, g, _ = _system(n=80, spread=0.97)
    _, steps, converged = solver(vjp, jvp, g, 1e-8, 1)
    assert not bool(converged)
    assert int(steps) == (20 if solver is gmres else 1)
