"""The equilibrium layer: solvers converge, implicit gradients are right, fast conv is exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deq.config import SolverConfig
from deq.conv import conv3x3, plain_conv3x3
from deq.fixed_point import PROBE_SIZE, fixed_point
from deq.solvers import forward_solve

TIGHT = SolverConfig(fwd_maxiter=200, fwd_tol=1e-7, bwd_maxiter=300, bwd_tol=1e-7)


def _block(p, z, u):
    """A small contraction: ||W|| < 1 and tanh is 1-Lipschitz."""
    return jnp.tanh(z @ p["w"] + u)


def _problem():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    w = 0.4 * jax.random.orthogonal(k1, 6)
    u = jax.random.normal(k2, (3, 6))
    c = jax.random.normal(k3, (3, 6))
    return {"w": w}, u, c


def _implicit_loss(cfg):
    def loss(p, u, c):
        z, _ = fixed_point(_block, p, u, jnp.zeros_like(u), None, cfg)
        return jnp.sum(c * z ** 2)
    return loss


def _unrolled_loss(p, u, c, steps=300):
    z = jax.lax.fori_loop(0, steps, lambda _, z: _block(p, z, u), jnp.zeros_like(u))
    return jnp.sum(c * z ** 2)


@pytest.mark.parametrize("fwd", ["anderson", "fpi", "broyden"])
@pytest.mark.parametrize("bwd", ["normal_cg", "gmres"])
def test_implicit_gradient_matches_unrolled(fwd, bwd):
    p, u, c = _problem()
    cfg = SolverConfig(fwd_solver=fwd, bwd_solver=bwd, fwd_maxiter=200, fwd_tol=1e-7,
                       bwd_maxiter=300, bwd_tol=1e-7)
    g_impl = jax.grad(_implicit_loss(cfg), argnums=(0, 1))(p, u, c)
    g_unroll = jax.grad(_unrolled_loss, argnums=(0, 1))(p, u, c)
    np.testing.assert_allclose(g_impl[0]["w"], g_unroll[0]["w"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g_impl[1], g_unroll[1], rtol=1e-4, atol=1e-5)


def test_implicit_gradient_matches_finite_differences():
    p, u, c = _problem()
    loss = _implicit_loss(TIGHT)
    g = jax.grad(loss)(p, u, c)["w"]
    direction = jax.random.normal(jax.random.PRNGKey(7), p["w"].shape)
    eps = 1e-3
    lp = loss({"w": p["w"] + eps * direction}, u, c)
    lm = loss({"w": p["w"] - eps * direction}, u, c)
    fd = (lp - lm) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(g, direction), fd, rtol=2e-3)


def test_reference_tolerances_give_close_gradient():
    """With the reference's loose tolerances the gradient is still within ~1% here."""
    p, u, c = _problem()
    g = jax.grad(_implicit_loss(SolverConfig()))(p, u, c)["w"]
    g_ref = jax.grad(_unrolled_loss)(p, u, c)["w"]
    assert jnp.linalg.norm(g - g_ref) / jnp.linalg.norm(g_ref) < 1e-2


def test_anderson_converges_on_linear_contraction():
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    q = jax.random.orthogonal(k1, 20)
    a = q @ jnp.diag(jnp.linspace(0.0, 0.95, 20)) @ q.T
    b = jax.random.normal(k2, (20,))
    # The reference's ridge (1e-4, absolute) dominates the Gram matrix once residuals are
    # ~1e-3 and stalls the extrapolation, so convergence to 1e-5 is tested with a small one.
    cfg = SolverConfig(fwd_maxiter=100, fwd_tol=1e-5, anderson_ridge=1e-10)
    z, iters, residual = forward_solve(lambda z: a @ z + b, jnp.zeros(20), cfg)
    exact = jnp.linalg.solve(jnp.eye(20) - a, b)
    assert residual <= 1e-5
    assert iters < 100
    np.testing.assert_allclose(z, exact, atol=1e-4)
    # Plain iteration with factor 0.95 needs far more steps for this tolerance.
    _, fpi_iters, _ = forward_solve(lambda z: a @ z + b, jnp.zeros(20),
                                    SolverConfig(fwd_solver="fpi", fwd_maxiter=100,
                                                 fwd_tol=1e-5))
    assert iters < fpi_iters


def test_solver_stats_come_out_of_forward_and_backward():
    p, u, c = _problem()
    cfg = SolverConfig(fwd_maxiter=50, fwd_tol=1e-6)

    def loss(p, probe):
        z, stats = fixed_point(_block, p, u, jnp.zeros_like(u), probe, cfg)
        return jnp.sum(c * z ** 2), stats

    (_, g_probe), stats = jax.grad(loss, argnums=(0, 1), has_aux=True)(
        p, jnp.zeros(PROBE_SIZE))
    assert 1 <= stats.fwd_iters < 50 and stats.fwd_residual <= 1e-6
    batch = u.shape[0]
    assert 1 <= g_probe[0] / batch <= cfg.bwd_maxiter      # mean backward iterations
    assert 0 <= g_probe[1] / batch <= cfg.bwd_tol * 10     # mean relative residual
    assert stats.fwd_unconverged == 0 and g_probe[2] == 0  # every solve met its tolerance


@pytest.mark.parametrize("cfg", [
    SolverConfig(fwd_maxiter=2, fwd_tol=1e-9, bwd_maxiter=1, bwd_tol=1e-9),
    SolverConfig(fwd_solver="broyden", broyden_impl="batched", bwd_solver="broyden",
                 fwd_maxiter=2, fwd_tol=1e-9, bwd_maxiter=1, bwd_tol=1e-9),
], ids=["anderson_cg", "batched_broyden"])
def test_solves_that_stop_at_their_cap_are_counted(cfg):
    p, u, c = _problem()

    def loss(p, probe):
        z, stats = fixed_point(_block, p, u, jnp.zeros_like(u), probe, cfg)
        return jnp.sum(c * z ** 2), stats

    (_, g_probe), stats = jax.grad(loss, argnums=(0, 1), has_aux=True)(
        p, jnp.zeros(PROBE_SIZE))
    batch = u.shape[0]
    assert stats.fwd_unconverged == batch and g_probe[2] == batch


def test_fast_conv_gradient_is_exact():
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(k1, (2, 7, 6, 4))
    w = jax.random.normal(k2, (3, 3, 4, 5))
    g = jax.random.normal(k3, (2, 7, 6, 5))
    fast = jax.vjp(conv3x3, x, w)[1](g)
    plain = jax.vjp(plain_conv3x3, x, w)[1](g)
    np.testing.assert_allclose(fast[0], plain[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fast[1], plain[1], rtol=1e-5, atol=1e-5)
    # Second order, as normal-CG uses it: the transpose of the vjp is the convolution.
    t = jax.random.normal(k4, x.shape)
    vjp_x = lambda ct: jax.vjp(lambda z: conv3x3(z, w), x)[1](ct)[0]
    jvp = jax.vjp(vjp_x, jnp.zeros_like(g))[1](t)[0]
    np.testing.assert_allclose(jvp, plain_conv3x3(t, w), rtol=1e-5, atol=1e-4)
