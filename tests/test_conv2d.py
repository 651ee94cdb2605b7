"""models.conv2d: the patch-product convolution is XLA's convolution, forward and backward,
and its module makes hk.Conv2D's parameter."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.conv2d import Conv2D, conv2d, explicit_padding, patch_conv, xla_conv
from models.stage_resnet import STAGE_SPLITS, stage_resnet

# (map size, channels in, channels out, kernel, stride, padding): each of conv2d's three
# forms (patch product both ways; XLA forward with the patch gradient) and dead taps.
CASES = [
    (1, 8, 6, 3, 1, ((1, 1), (1, 1))),   # 1x1 map: only the centre tap is live
    (2, 5, 7, 3, 1, ((1, 1), (1, 1))),   # 2x2: every tap live for some output
    (4, 4, 6, 3, 2, ((1, 1), (1, 1))),   # strided, 2x2 out
    (8, 3, 5, 3, 2, "SAME"),             # haiku's asymmetric SAME padding, 4x4 out
    (9, 3, 4, 7, 2, ((3, 3), (3, 3))),   # the ImageNet stem's 7x7, odd map, 5x5 out
    (8, 4, 4, 3, 1, ((1, 1), (1, 1))),   # large enough for XLA's forward
    (4, 6, 8, 1, 2, ((0, 0), (0, 0))),   # a 1x1 projection
]


@pytest.mark.parametrize("case", CASES, ids=[f"hw{c[0]}_k{c[3]}_s{c[4]}" for c in CASES])
def test_fast_conv_equals_xla_forward_and_gradients(case):
    hw, cin, cout, k, stride, padding = case
    kx, kw = jax.random.split(jax.random.PRNGKey(hw * 100 + k))
    x = jax.random.normal(kx, (3, hw, hw, cin))
    w = jax.random.normal(kw, (k, k, cin, cout)) / k
    pads = explicit_padding(x, w, stride, padding)
    reference = xla_conv(x, w, stride, pads)

    def loss(fast):
        return lambda a, b: jnp.sum(jnp.sin(conv2d(a, b, stride, padding, fast)))

    np.testing.assert_allclose(conv2d(x, w, stride, padding), reference, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(patch_conv(x, w, stride, pads),
                               reference, rtol=1e-5, atol=1e-5)
    fast_grads = jax.jit(jax.grad(loss(True), (0, 1)))(x, w)
    xla_grads = jax.jit(jax.grad(loss(False), (0, 1)))(x, w)
    for got, want in zip(fast_grads, xla_grads, strict=True):
        assert float(jnp.max(jnp.abs(want))) > 0
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # Reverse over reverse (a gradient of a gradient) goes through the custom rule too.
    second = [jax.jit(jax.grad(lambda b, f=f: jnp.sum(jax.grad(loss(f), 0)(x, b) ** 2)))(w)
              for f in (True, False)]
    np.testing.assert_allclose(second[0], second[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("w_init", [None, hk.initializers.VarianceScaling(2.0, "fan_out",
                                                                           "normal")])
def test_module_makes_haiku_conv2d_parameter(w_init):
    x = jnp.ones((2, 6, 6, 3))

    def ours(x):
        return Conv2D(5, 3, stride=2, padding="SAME", w_init=w_init, name="c")(x)

    def haikus(x):
        return hk.Conv2D(5, 3, stride=2, padding="SAME", with_bias=False, w_init=w_init,
                         name="c")(x)

    a, b = (hk.transform(f).init(jax.random.PRNGKey(3), x) for f in (ours, haikus))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    np.testing.assert_array_equal(a["c"]["w"], b["c"]["w"])
    np.testing.assert_allclose(hk.transform(ours).apply(a, None, x),
                               hk.transform(haikus).apply(b, None, x), rtol=1e-5, atol=1e-5)


def test_stage_resnet_fast_conv_same_logits_and_gradients():
    """ResNet10 on 32x32 reaches the 2x2 and 1x1 maps where the patch product is used.
    Compared by relative norm per leaf: BatchNorm over 4 examples of a 1x1 map amplifies
    rounding in single entries."""
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
    y = jnp.arange(4) % 10
    models = [hk.transform_with_state(stage_resnet(10, STAGE_SPLITS["resnet10"],
                                                   fast_conv=f)) for f in (True, False)]
    params, state = models[0].init(jax.random.PRNGKey(1), x, True)
    params_b, _ = models[1].init(jax.random.PRNGKey(1), x, True)
    same_init = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), params, params_b)
    assert all(jax.tree.leaves(same_init))

    def loss(model):
        def f(p):
            out, _ = model.apply(p, state, None, x, True)
            return -jnp.mean(jax.nn.log_softmax(out.logits)[jnp.arange(4), y])
        return f

    (fast_loss, fast_grads), (xla_loss, xla_grads) = (
        jax.jit(jax.value_and_grad(loss(m)))(params) for m in models)
    np.testing.assert_allclose(fast_loss, xla_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(fast_grads), jax.tree.leaves(xla_grads),
                         strict=True):
        assert float(jnp.linalg.norm(got - want)) <= 1e-4 * float(jnp.linalg.norm(want)) + 1e-7
