"""InCo's server rule (spec 5.2-5.6) against an independent numpy hand computation."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainers.server_transforms import InCoConfig, inco_mix

EPS = 1e-7
CONV = (0, 1)  # HWIO: one 3x3 slice per (in, out) pair


def _hand_slice(gk, g0, mode, clamp_max=5.0, clip=0.1):
    """One slice, written straight from the spec's formulas in float64."""
    gk, g0 = np.asarray(gk, np.float64), np.asarray(g0, np.float64)
    nk, n0 = np.sqrt((gk ** 2).sum()), np.sqrt((g0 ** 2).sum())
    a, b = (g0 * g0).sum(), (g0 * gk).sum()
    if mode == "code":
        lam = min(abs(b) / (a + EPS), clamp_max)
        out = (gk / (nk + EPS) + lam * g0 / (n0 + EPS)) * (nk + n0) / 2
        return np.clip(out, -clip, clip) if clip else out
    theta = b / (a + EPS)
    return (gk / (nk + EPS) - theta * g0 / (n0 + EPS)) * (nk + n0) / 2


def _hand_kernel(gk, g0, mode, **kw):
    out = np.zeros(gk.shape)
    for i, o in itertools.product(range(gk.shape[2]), range(gk.shape[3])):
        out[:, :, i, o] = _hand_slice(gk[:, :, i, o], g0[:, :, i, o], mode, **kw)
    return out


def _kernels():
    """g_0 and g_k (3, 3, in=2, out=2) with one slice of each kind the rule separates."""
    rng = np.random.default_rng(0)
    g0 = 0.02 * rng.standard_normal((3, 3, 2, 2))
    gk = 0.02 * rng.standard_normal((3, 3, 2, 2))
    gk[:, :, 0, 0] = -0.5 * g0[:, :, 0, 0] + 0.002 * rng.standard_normal((3, 3))  # b < 0
    gk[:, :, 0, 1] = 0.7 * g0[:, :, 0, 1] + 0.002 * rng.standard_normal((3, 3))   # b > 0
    g0[:, :, 1, 0] = 0.01 * gk[:, :, 1, 0]                    # |b|/a = 100: lam clamped
    return g0.astype(np.float32), gk.astype(np.float32)


def _slice_stats(g0, gk, i, o):
    s0, sk = g0[:, :, i, o].astype(np.float64), gk[:, :, i, o].astype(np.float64)
    return (s0 * s0).sum(), (s0 * sk).sum()


def _tree(g0, gk):
    return {"s0_b0_conv2": {"w": jnp.asarray(g0), "b": jnp.ones(2)},
            "s0_b1_conv1": {"w": jnp.asarray(gk), "b": jnp.full(2, 3.0)},
            "stem": {"w": jnp.arange(4.0)}}


PAIRS = (("s0_b1_conv1", "s0_b0_conv2"),)


def test_example_covers_each_case():
    g0, gk = _kernels()
    a, b = _slice_stats(g0, gk, 0, 0)
    assert b < 0 and abs(b) / a < 5
    a, b = _slice_stats(g0, gk, 0, 1)
    assert b > 0 and b / a < 5
    a, b = _slice_stats(g0, gk, 1, 0)
    assert b / a > 5


def test_none_is_identity():
    g0, gk = _kernels()
    tree = _tree(g0, gk)
    out = inco_mix(tree, PAIRS, "w", CONV, InCoConfig(mode="none"))
    assert out is not tree
    assert all(out[m] is tree[m] for m in tree)


@pytest.mark.parametrize("clip", [0.1, None])
def test_code_rule_by_hand(clip):
    g0, gk = _kernels()
    out = inco_mix(_tree(g0, gk), PAIRS, "w", CONV, InCoConfig(clip=clip))
    want = _hand_kernel(gk, g0, "code", clip=clip)
    np.testing.assert_allclose(out["s0_b1_conv1"]["w"], want, rtol=1e-5, atol=1e-8)


def test_code_rule_clamps_lambda():
    """In the clamped slice the coefficient on ĝ_0 is clamp_max = 5, not |b|/a = 100."""
    g0, gk = _kernels()
    out = inco_mix(_tree(g0, gk), PAIRS, "w", CONV, InCoConfig(clip=None))
    sk, s0 = gk[:, :, 1, 0].astype(np.float64), g0[:, :, 1, 0].astype(np.float64)
    nk, n0 = np.linalg.norm(sk), np.linalg.norm(s0)
    want = (sk / (nk + EPS) + 5.0 * s0 / (n0 + EPS)) * (nk + n0) / 2
    np.testing.assert_allclose(out["s0_b1_conv1"]["w"][:, :, 1, 0], want, rtol=1e-5)
    unclamped = inco_mix(_tree(g0, gk), PAIRS, "w", CONV, InCoConfig(clip=None, clamp_max=1e3))
    assert not np.allclose(unclamped["s0_b1_conv1"]["w"][:, :, 1, 0], want, rtol=1e-2)


def test_paper_rule_by_hand():
    g0, gk = _kernels()
    out = inco_mix(_tree(g0, gk), PAIRS, "w", CONV, InCoConfig(mode="paper"))
    want = _hand_kernel(gk, g0, "paper")
    np.testing.assert_allclose(out["s0_b1_conv1"]["w"], want, rtol=1e-5, atol=1e-8)


def test_code_and_paper_agree_only_where_spec_says():
    """Spec 5.6: they agree when b < 0, |b|/a <= clamp_max and the clip is not hit."""
    g0, gk = _kernels()
    code = inco_mix(_tree(g0, gk), PAIRS, "w", CONV, InCoConfig(clip=None))["s0_b1_conv1"]["w"]
    paper = inco_mix(_tree(g0, gk), PAIRS, "w", CONV, InCoConfig(mode="paper"))["s0_b1_conv1"]
    np.testing.assert_allclose(code[:, :, 0, 0], paper["w"][:, :, 0, 0], rtol=1e-5)
    assert not np.allclose(code[:, :, 0, 1], paper["w"][:, :, 0, 1])


def test_code_rule_clips_every_entry():
    rng = np.random.default_rng(1)
    g0, gk = (rng.standard_normal((3, 3, 4, 5)).astype(np.float32) for _ in range(2))
    out = inco_mix(_tree(g0, gk), PAIRS, "w", CONV, InCoConfig())["s0_b1_conv1"]["w"]
    top = np.max(np.abs(np.asarray(out)))
    assert top <= np.float32(0.1)
    assert top == np.float32(0.1)  # the clip was active


def test_targets_read_the_pre_mix_update():
    """A module that is both a target and a source feeds its pre-mix value, so any order
    of the pairs gives the same tree."""
    rng = np.random.default_rng(2)
    tree = {m: {"w": jnp.asarray(0.03 * rng.standard_normal((3, 3, 2, 2)), jnp.float32)}
            for m in "abcd"}
    pairs = [("b", "a"), ("c", "b"), ("d", "a")]
    ref = inco_mix(tree, pairs, "w", CONV, InCoConfig())
    np.testing.assert_allclose(ref["c"]["w"], _hand_kernel(np.asarray(tree["c"]["w"]),
                                                           np.asarray(tree["b"]["w"]), "code"),
                               rtol=1e-5, atol=1e-8)
    for perm in itertools.permutations(pairs):
        out = inco_mix(tree, perm, "w", CONV, InCoConfig())
        for m in "abcd":
            np.testing.assert_array_equal(out[m]["w"], ref[m]["w"])


def test_non_targets_untouched_and_input_not_mutated():
    g0, gk = _kernels()
    tree = _tree(g0, gk)
    before = {m: dict(v) for m, v in tree.items()}
    out = inco_mix(tree, PAIRS, "w", CONV, InCoConfig())
    assert out["stem"] is tree["stem"] and out["s0_b0_conv2"] is tree["s0_b0_conv2"]
    assert out["s0_b1_conv1"]["b"] is tree["s0_b1_conv1"]["b"]
    assert all(tree[m][k] is before[m][k] for m in tree for k in tree[m])


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_zero_target_stays_zero(mode):
    g0, _ = _kernels()
    out = inco_mix(_tree(g0, np.zeros_like(g0)), PAIRS, "w", CONV, InCoConfig(mode=mode))
    assert not np.any(np.asarray(out["s0_b1_conv1"]["w"]))


@pytest.mark.parametrize("flag", [False, 0.0, {"w": False}])
def test_absent_target_is_left_exactly(flag):
    g0, gk = _kernels()
    tree = _tree(g0, gk)
    out = inco_mix(tree, PAIRS, "w", CONV, InCoConfig(), present={"s0_b1_conv1": flag})
    np.testing.assert_array_equal(out["s0_b1_conv1"]["w"], gk)
    mixed = inco_mix(tree, PAIRS, "w", CONV, InCoConfig(), present={"s0_b1_conv1": True})
    np.testing.assert_allclose(mixed["s0_b1_conv1"]["w"], _hand_kernel(gk, g0, "code"),
                               rtol=1e-5, atol=1e-8)


def test_absent_source_leaves_target_alone():
    """Without a fresh g_0 the rule is undefined (the reference would have no key), so the
    target keeps its plain average."""
    g0, gk = _kernels()
    out = inco_mix(_tree(g0, gk), PAIRS, "w", CONV, InCoConfig(),
                   present={"s0_b1_conv1": True, "s0_b0_conv2": False})
    np.testing.assert_array_equal(out["s0_b1_conv1"]["w"], gk)


def test_missing_modules_are_skipped():
    g0, gk = _kernels()
    tree = _tree(g0, gk)
    pairs = PAIRS + (("s1_b1_conv1", "s1_b0_conv2"), ("s0_b2_conv1", "s0_b0_conv2"))
    out = inco_mix(tree, pairs, "w", CONV, InCoConfig())
    assert set(out) == set(tree)
    np.testing.assert_allclose(out["s0_b1_conv1"]["w"], _hand_kernel(gk, g0, "code"),
                               rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_vit_layernorm_vector_by_hand(mode):
    """ViT: norm2.scale mixed with norm1.scale of the same block, statistics over the whole
    vector (one slice)."""
    norm1 = np.array([0.01, -0.02, 0.03, 0.005, -0.01, 0.02], np.float32)
    norm2 = np.array([-0.02, 0.01, -0.04, 0.0, 0.015, -0.01], np.float32)
    tree = {"block_0/norm1": {"scale": jnp.asarray(norm1), "offset": jnp.zeros(6)},
            "block_0/norm2": {"scale": jnp.asarray(norm2), "offset": jnp.zeros(6)}}
    out = inco_mix(tree, [("block_0/norm2", "block_0/norm1")], "scale", None,
                   InCoConfig(mode=mode))
    assert (norm1.astype(np.float64) @ norm2) < 0
    np.testing.assert_allclose(out["block_0/norm2"]["scale"], _hand_slice(norm2, norm1, mode),
                               rtol=1e-5, atol=1e-8)
    assert out["block_0/norm1"] is tree["block_0/norm1"]
    assert out["block_0/norm2"]["offset"] is tree["block_0/norm2"]["offset"]


@pytest.mark.parametrize("mode", ["code", "paper", "none"])
def test_jit_matches_eager(mode):
    g0, gk = _kernels()
    tree = _tree(g0, gk)
    cfg = InCoConfig(mode=mode)
    present = {"s0_b1_conv1": jnp.asarray(True), "s0_b0_conv2": jnp.asarray(1.0)}
    fn = lambda u, p: inco_mix(u, PAIRS, "w", CONV, cfg, p)
    eager, jitted = fn(tree, present), jax.jit(fn)(tree, present)
    for m in tree:
        for k in tree[m]:
            np.testing.assert_allclose(jitted[m][k], eager[m][k], rtol=1e-6, atol=1e-9)
    skipped = jax.jit(fn)(tree, {**present, "s0_b1_conv1": jnp.asarray(False)})
    np.testing.assert_array_equal(skipped["s0_b1_conv1"]["w"], gk)


def test_config_and_pairs_are_validated():
    with pytest.raises(ValueError):
        InCoConfig(mode="paper_theorem")
    g0, gk = _kernels()
    with pytest.raises(ValueError):
        inco_mix(_tree(g0, gk), PAIRS * 2, "w", CONV, InCoConfig())
    bad = {**_tree(g0, gk), "s0_b0_conv2": {"w": jnp.zeros((3, 3, 2, 3))}}
    with pytest.raises(ValueError):
        inco_mix(bad, PAIRS, "w", CONV, InCoConfig())
