"""Transformer-8 and DEQ-Transformer (spec 5.4, 5.5) and the batched Broyden solver."""

import dataclasses

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deq.broyden import broyden
from deq.config import SolverConfig
from deq.fixed_point import PROBE_SIZE, fixed_point
from models.deq_transformer import DEQ_TRANSFORMER_SOLVER, deq_transformer
from models.registry import build_model
from models.transformer import transformer8
from utils.pytree import split_head, tree_size

# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("name,total,shared", [
    ("transformer8", 416_730, 360_768),
    ("deq_transformer", 266_906, 210_944),
])
def test_parameter_counts_for_80_tokens(name, total, shared):
    model = build_model(name, num_classes=90, input_shape=(80,))
    params, state = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                   jnp.zeros((1, 80), jnp.int32))
    s, h = split_head(params)
    assert (tree_size(params), tree_size(s), tree_size(h)) == (total, shared, 55_962)
    assert tree_size(state) == 0
    assert model.is_deq == (name == "deq_transformer")


def test_registry_rejects_images_for_text_models():
    with pytest.raises(ValueError, match="rank"):
        build_model("transformer8", num_classes=90, input_shape=(28, 28, 1))


def _tokens(t=8, b=2, seed=3):
    # Tokens > 0: a sequence never starts with padding in the data (see attention_mask).
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 1, 90)


def _later(x, pos=5):
    return x.at[:, pos].set(x[:, pos] % 89 + 1)


# Small variants (fewer layers, 8 tokens) keep the tests quick; the layer code is the same.
# Parameters are made once per module; variants that differ only in dropout or solver
# settings share them. Apply runs eagerly: for these sizes that beats compiling.
_FPI = dataclasses.replace(DEQ_TRANSFORMER_SOLVER, fwd_solver="fpi", fwd_maxiter=8,
                           fwd_tol=0.0, eval_resolve=False)
_SMALL = {
    "transformer8": lambda **kw: transformer8(num_layers=2, **kw),
    "deq_transformer": lambda **kw: deq_transformer(block_layers=1, **kw),
}


@pytest.fixture(scope="module")
def small_params():
    x = _tokens()
    # Parameters do not depend on the solver: the DEQ's is cut to one step for speed.
    cheap = {"deq_transformer": {"solver": dataclasses.replace(_FPI, fwd_maxiter=1)}}
    return {name: hk.transform_with_state(build(**cheap.get(name, {}))).init(
        jax.random.PRNGKey(0), x, True) for name, build in _SMALL.items()}


def _apply(small_params, name, **kw):
    model = hk.transform_with_state(_SMALL[name](**kw))
    params, state = small_params[name]
    return lambda x, rng=None, train=False: model.apply(params, state, rng, x, train)[0]


@pytest.mark.parametrize("name", sorted(_SMALL))
def test_causal_masking(small_params, name):
    # For the DEQ, a fixed number of plain iterations of f is exactly causal when f is.
    solver = {"solver": _FPI} if name == "deq_transformer" else {}
    apply = _apply(small_params, name, dropout_at_eval=False, **solver)
    x = _tokens()
    out, out_later = apply(x), apply(_later(x))
    assert out.logits.shape == (2, 8, 90) and out.embedding.shape == (2, 8, 64)
    np.testing.assert_array_equal(out.logits[:, :5], out_later.logits[:, :5])
    assert not np.allclose(out.logits[:, 5:], out_later.logits[:, 5:])


def test_deq_transformer_broyden_is_causal_up_to_solver_accuracy(small_params):
    """Broyden's rank-one updates mix all positions of a sequence, so with the reference's
    20 steps earlier logits move a little when a later token changes; with a converged
    solve they do not."""
    x = _tokens()
    tight = dataclasses.replace(DEQ_TRANSFORMER_SOLVER, fwd_maxiter=60, eval_resolve=False)
    apply = _apply(small_params, "deq_transformer", solver=tight, dropout_at_eval=False)
    out, out_later = apply(x), apply(_later(x))
    assert float(out.solver_stats.fwd_residual) < 1e-3
    np.testing.assert_allclose(out.logits[:, :5], out_later.logits[:, :5], atol=1e-3)


def test_dropout_is_on_at_evaluation_by_default(small_params):
    x = _tokens()
    key = jax.random.PRNGKey
    apply = _apply(small_params, "transformer8")  # the reference's behaviour
    a = apply(x, key(1))
    assert not np.allclose(a.logits, apply(x, key(2)).logits)
    np.testing.assert_array_equal(a.logits, apply(x, key(1)).logits)
    apply = _apply(small_params, "transformer8", dropout_at_eval=False)
    np.testing.assert_array_equal(apply(x, key(1)).logits, apply(x, key(2)).logits)
    assert not np.allclose(apply(x, key(1), True).logits, apply(x, key(2), True).logits)
    np.testing.assert_array_equal(apply(x, None, True).logits, apply(x).logits)


def test_deq_transformer_trains_with_the_reference_solver(small_params):
    x = _tokens()
    model = hk.transform_with_state(_SMALL["deq_transformer"]())
    params, state = small_params["deq_transformer"]

    def loss(p, probe):
        out, _ = model.apply(p, state, jax.random.PRNGKey(2), x, True, probe)
        logp = jax.nn.log_softmax(out.logits)
        return -jnp.mean(jnp.take_along_axis(logp, x[..., None], -1)), out.solver_stats

    grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
    (g, g_probe), stats = grad(params, jnp.zeros(PROBE_SIZE))
    assert float(stats.fwd_iters) == 20  # the reference's tolerances are never met
    assert float(g_probe[0]) == 20 * x.shape[0]  # 20 backward steps per example
    block = {k: v for k, v in g.items() if k.startswith("DEQTransformer_Block")}
    assert block and all(np.all(np.isfinite(v)) for v in jax.tree.leaves(g))
    assert sum(float(jnp.sum(jnp.abs(v))) for v in jax.tree.leaves(block)) > 0


# ----------------------------------------------------------------------------- Broyden


def test_broyden_converges_on_a_linear_contraction():
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    q = jax.random.orthogonal(k1, 20)
    a = q @ jnp.diag(jnp.linspace(-0.9, 0.95, 20)) @ q.T
    b = jax.random.normal(k2, (3, 20)) * jnp.array([[0.1], [1.0], [10.0]])
    g = lambda z: z @ a.T + b - z
    z, iters, residual = broyden(g, jnp.zeros_like(b), maxiter=80, tol=1e-5)
    exact = jnp.linalg.solve(jnp.eye(20) - a, b.T).T
    np.testing.assert_allclose(z, exact, rtol=1e-4, atol=1e-4)
    assert np.all(residual <= 1e-5 * np.sqrt(b.size))
    # Good Broyden solves an n-dimensional linear system in at most 2n steps in exact
    # arithmetic; plain iteration with contraction factor 0.95 would need hundreds.
    assert int(iters[0]) <= 40


def test_broyden_returns_the_best_iterate_and_stops_on_divergence():
    # g(z) = 3z - b from z = 0: the first step (a fixed-point step, since the inverse
    # Jacobian starts at -I) overshoots to z = -b with |g| = 4|b|; the second (secant)
    # step solves this 1-d linear problem exactly.
    b = jnp.array([[1.0], [0.0]])
    g = lambda z: 3 * z - b
    z, iters, residual = broyden(g, jnp.zeros_like(b), maxiter=1, tol=0.0)
    np.testing.assert_array_equal(z, [[0.0], [0.0]])  # the start beats the overshoot
    np.testing.assert_allclose(residual, [1.0, 0.0])
    z, iters, residual = broyden(g, jnp.zeros_like(b), maxiter=10, tol=1e-6)
    np.testing.assert_allclose(z, [[1 / 3], [0.0]], atol=1e-6)
    assert int(iters[0]) == 2
    # The protective stop: the residual grew past 1.5x its start, so no second step.
    _, iters, residual = broyden(g, jnp.zeros_like(b), maxiter=10, tol=1e-6, protect=1.5)
    assert int(iters[0]) == 1 and float(residual[0]) == 1.0


def _block(p, z, u):
    return jnp.tanh(z @ p["w"] + u)


def _problem():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    return ({"w": 0.4 * jax.random.orthogonal(k1, 6)}, jax.random.normal(k2, (3, 6)),
            jax.random.normal(k3, (3, 6)))


@pytest.mark.parametrize("final_step", [False, True])
def test_broyden_implicit_gradient_matches_unrolled(final_step):
    p, u, c = _problem()
    cfg = SolverConfig(fwd_solver="broyden", broyden_impl="batched", bwd_solver="broyden",
                       fwd_maxiter=60, fwd_tol=1e-8, bwd_maxiter=60, bwd_tol=1e-9,
                       final_step=final_step)

    def implicit(p, u):
        z, _ = fixed_point(_block, p, u, jnp.zeros_like(u), None, cfg)
        return jnp.sum(c * z ** 2)

    def unrolled(p, u):
        z = jax.lax.fori_loop(0, 300, lambda _, z: _block(p, z, u), jnp.zeros_like(u))
        return jnp.sum(c * z ** 2)

    g_impl = jax.grad(implicit, argnums=(0, 1))(p, u)
    g_unroll = jax.grad(unrolled, argnums=(0, 1))(p, u)
    np.testing.assert_allclose(g_impl[0]["w"], g_unroll[0]["w"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g_impl[1], g_unroll[1], rtol=1e-4, atol=1e-5)


def test_eval_resolve_solves_again_only_when_not_differentiated():
    p, u, _ = _problem()
    cfg = SolverConfig(fwd_solver="broyden", broyden_impl="batched", bwd_solver="broyden",
                       fwd_maxiter=3, fwd_tol=0.0, final_step=True, eval_resolve=True)
    plain = fixed_point(_block, p, u, jnp.zeros_like(u), None, cfg)
    traced = jax.vjp(lambda uu: fixed_point(_block, p, uu, jnp.zeros_like(u), None, cfg),
                     u)[0]
    assert float(plain[1].fwd_iters) == 6 and float(traced[1].fwd_iters) == 3
    once = fixed_point(_block, p, u, jnp.zeros_like(u), None,
                       dataclasses.replace(cfg, eval_resolve=False))
    np.testing.assert_array_equal(once[0], traced[0])
    assert not np.array_equal(plain[0], traced[0])
