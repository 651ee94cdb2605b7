"""DEQ models: the reference's parameter counts, and the solver variants agree."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deq.anderson import batched_anderson
from deq.config import SolverConfig
from deq.solvers import forward_solve
from models.registry import build_model
from utils.pytree import split_head, tree_size


@pytest.mark.parametrize("name,classes,shape,total,shared,state", [
    ("deq_resnet_s", 62, (28, 28, 1), 992_894, 984_896, 772),
    ("deq_resnet_m", 10, (32, 32, 3), 2_726_410, 2_725_120, 1_028),
    ("deq_resnet_m", 100, (32, 32, 3), 2_738_020, 2_725_120, 1_028),
])
def test_deq_resnet_parameter_counts(name, classes, shape, total, shared, state):
    model = build_model(name, num_classes=classes, input_shape=shape)
    params, st = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1,) + shape))
    s, h = split_head(params)
    assert (tree_size(params), tree_size(s), tree_size(h)) == (total, shared, total - shared)
    assert tree_size(st) == state


def test_deq_block_init_does_not_depend_on_seed():
    model = build_model("deq_resnet_s", num_classes=62, input_shape=(28, 28, 1))
    x = jnp.zeros((1, 28, 28, 1))
    p1, _ = model.init(jax.random.PRNGKey(0), x)
    p2, _ = model.init(jax.random.PRNGKey(1), x)
    block = [k for k in p1 if "deq_block" in k]
    assert block
    for k in block:
        for leaf in p1[k]:
            np.testing.assert_array_equal(p1[k][leaf], p2[k][leaf])
    assert not np.array_equal(p1["stem_conv"]["w"], p2["stem_conv"]["w"])


def test_fast_conv_and_anderson_variants_give_the_same_gradients():
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 28, 28, 1))
    y = jnp.array([1, 5, 7])
    grads = {}
    for fast, impl in ((True, "batched"), (False, "jaxopt")):
        model = build_model("deq_resnet_s", num_classes=62, input_shape=(28, 28, 1),
                            solver=SolverConfig(fast_conv=fast, anderson_impl=impl))
        params, state = model.init(jax.random.PRNGKey(0), x)

        def loss(p, model=model, state=state):
            out, _ = model.transformed.apply(p, state, None, x, True, None)
            return -jnp.mean(jax.nn.log_softmax(out.logits)[jnp.arange(3), y])

        grads[fast] = jax.jit(jax.grad(loss))(params)
    # Normal-CG stops at a relative tolerance of 1e-3, so float-level differences in the
    # forward pass move the gradient by about that much: compare leaves by norm.
    for a, b in zip(jax.tree.leaves(grads[True]), jax.tree.leaves(grads[False]), strict=True):
        assert float(jnp.linalg.norm(a - b)) <= 5e-3 * float(jnp.linalg.norm(b)) + 1e-7


def test_batched_anderson_matches_jaxopt_per_example_including_early_stops():
    k1, k2 = jax.random.split(jax.random.PRNGKey(4))
    w = 0.5 * jax.random.orthogonal(k1, 16)
    # Scales spread the examples' convergence over different iteration counts.
    u = jax.random.normal(k2, (6, 16)) * jnp.array([0.01, 0.1, 1, 3, 10, 30])[:, None]
    fun = lambda z, uu: jnp.tanh(z @ w + uu)
    cfg = SolverConfig(fwd_tol=1e-3)
    ref = jax.vmap(lambda uu: forward_solve(lambda z: fun(z, uu), uu, cfg))(u)
    new = batched_anderson(lambda z: fun(z, u), u, cfg.anderson_history, cfg.anderson_ridge,
                           cfg.maxiter, cfg.tol)
    np.testing.assert_array_equal(np.asarray(ref[1]), np.asarray(new[1]).astype(np.float32))
    assert len(set(np.asarray(new[1]).tolist())) > 1  # the early stops are exercised
    np.testing.assert_allclose(new[0], ref[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new[2], ref[2], rtol=1e-4, atol=1e-7)


def test_head_is_player_logits_only():
    model = build_model("deq_resnet_s", num_classes=62, input_shape=(28, 28, 1))
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))[0]
    _, head = split_head(params)
    assert list(head) == ["player_logits"]
    assert isinstance(model.transformed, hk.TransformedWithState)
