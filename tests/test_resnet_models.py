"""The explicit ResNet baselines must match the reference's sizes exactly (spec section 5).

Communication sizes (section 7.1) and the DEQ-vs-baseline size ratios are computed from
these parameter counts, so an off-by-one layer would silently change a headline result.
"""

from dataclasses import dataclass
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.base import HEAD_MARKER, ModelOutput
from models.resnet import resnet20_femnist, resnet34_blocks, resnet34_cifar

BATCH = 2


@dataclass(frozen=True)
class Case:
    name: str
    builder: Any
    num_classes: int
    input_shape: tuple[int, int, int]
    total: int
    shared: int
    head: int
    bn_state: int
    embedding_after_bn: bool


# Expected numbers: spec section 5, table "Parameter counts".
CASES = [
    Case("resnet20_femnist", resnet20_femnist, 62, (28, 28, 1),
         2_975_390, 2_967_392, 7_998, 10_670, True),
    Case("resnet34_cifar10", resnet34_cifar, 10, (32, 32, 3),
         7_779_274, 7_777_984, 1_290, 19_780, False),
    Case("resnet34_cifar100", resnet34_cifar, 100, (32, 32, 3),
         10_889_508, 10_876_608, 12_900, 23_876, False),
]


def _size(tree: Any) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def _inputs(case: Case, seed: int = 0) -> jnp.ndarray:
    return jax.random.normal(jax.random.PRNGKey(seed), (BATCH, *case.input_shape))


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name)
def model(request: pytest.FixtureRequest) -> tuple[Case, hk.TransformedWithState, Any, Any]:
    """Init once per model: initialising ResNet34 is the slowest step on CPU."""
    case: Case = request.param
    transformed = hk.transform_with_state(case.builder(case.num_classes))
    params, state = transformed.init(jax.random.PRNGKey(0), _inputs(case), is_training=True)
    return case, transformed, params, state


def test_parameter_counts_match_reference(model: tuple) -> None:
    case, _, params, state = model
    shared = {k: v for k, v in params.items() if HEAD_MARKER not in k}
    head = {k: v for k, v in params.items() if HEAD_MARKER in k}
    assert _size(params) == case.total
    assert _size(shared) == case.shared
    assert _size(head) == case.head
    # BN state: mean/var EMAs (hidden + average) plus their scalar counters.
    assert _size(state) == case.bn_state


def test_only_the_classifier_is_personal(model: tuple) -> None:
    _, _, params, _ = model
    assert [k for k in params if HEAD_MARKER in k] == ["player_logits"]


def test_output_shapes(model: tuple) -> None:
    case, transformed, params, state = model
    out, new_state = jax.eval_shape(
        lambda p, s, x: transformed.apply(p, s, None, x, False, None), params, state,
        _inputs(case),
    )
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (BATCH, case.num_classes)
    assert out.embedding.shape == (BATCH, 128)
    assert out.solver_stats.fwd_iters.shape == ()
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)


def test_train_mode_updates_bn_state_and_embedding_position(model: tuple) -> None:
    case, transformed, params, state = model
    out, new_state = transformed.apply(params, state, None, _inputs(case, 1), True, None)
    before = jax.tree_util.tree_leaves(state)
    after = jax.tree_util.tree_leaves(new_state)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    emb = np.asarray(out.embedding)
    if case.embedding_after_bn:
        # FEMNIST takes the embedding after the (unit-scale, zero-offset) train-mode BN.
        np.testing.assert_allclose(emb.mean(axis=0), 0.0, atol=1e-4)
    else:
        # CIFAR takes it before the BN, i.e. straight after a ReLU.
        assert (emb >= 0).all()
        # The zero-initialised head makes every initial logit exactly zero.
        np.testing.assert_array_equal(np.asarray(out.logits), 0.0)


def test_eval_mode_is_deterministic_and_keeps_state(model: tuple) -> None:
    case, transformed, params, state = model
    x = _inputs(case, 2)
    out1, state1 = transformed.apply(params, state, jax.random.PRNGKey(1), x, False, None)
    out2, _ = transformed.apply(params, state, jax.random.PRNGKey(2), x, False, None)
    np.testing.assert_array_equal(np.asarray(out1.logits), np.asarray(out2.logits))
    np.testing.assert_array_equal(np.asarray(out1.embedding), np.asarray(out2.embedding))
    assert np.isfinite(np.asarray(out1.logits)).all()
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(state1),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resnet34_block_layouts() -> None:
    assert resnet34_blocks(10) == (5, 6, 5)
    assert resnet34_blocks(100) == (3, 5, 8)
    with pytest.raises(ValueError, match="blocks"):
        resnet34_blocks(7)
