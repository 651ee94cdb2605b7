"""InCo's client models must match the reference's sizes and nesting (spec 1.1-1.3).

InCo aggregates per key across clients of five depths, so a sub-model whose key or shape
differs from the server's would silently drop out of the average, and a parameter count
off by one layer would change the communication ratios of the paper's tables. Full-size
models are only traced (`jax.eval_shape`); forward passes use tiny widths.
"""

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data.errors import DataError
from models.batch_norm import batch_statistics_over
from models.registry import build_model, submodel_family
from models.stage_resnet import (
    STAGE_SPLITS,
    _max_pool_3x3_s2,
    inco_pairs,
    resnet_features,
    stage_resnet,
)
from models.torch_batch_norm import TorchBatchNorm
from models.vit import VIT_SPLITS, load_vit_weights, save_vit_weights, vit, vit_inco_pairs

RESNETS = tuple(STAGE_SPLITS)
VITS = tuple(VIT_SPLITS)
TINY_WIDTHS = (4, 4, 8, 8)
TINY_VIT = dict(patch_size=4, image_size=32, embed_dim=16, num_heads=2, mlp_dim=32)


def _size(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def _shapes(forward, x_shape: tuple[int, ...]):
    """(params, state) as ShapeDtypeStructs: counts without allocating 17M floats."""
    transformed = hk.transform_with_state(forward)
    return jax.eval_shape(lambda rng, x: transformed.init(rng, x, True),
                          jax.random.PRNGKey(0), jnp.zeros(x_shape))


def _init(forward, x: jnp.ndarray):
    """Real init, jitted, with an RBG key: threefry's per-parameter graphs dominate CPU
    compile time of a transform's init, and this file must stay fast."""
    transformed = hk.transform_with_state(forward)
    init = jax.jit(transformed.init, static_argnums=2)
    params, state = init(jax.random.key(0, impl="rbg"), x, True)
    return jax.jit(transformed.apply, static_argnums=4), params, state


def _random_params(forward, x_shape: tuple[int, ...], seed: int) -> hk.Params:
    """Parameters of the right shapes without running init (no compile at all)."""
    shapes, _ = _shapes(forward, x_shape)
    rng = np.random.default_rng(seed)
    return {m: {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in leaves.items()}
            for m, leaves in shapes.items()}


# Spec 1.1, table "Sub-models": params (3-ch), params (1-ch), BN running floats,
# num_batches_tracked keys, state-dict keys.
RESNET_TABLE = {
    "resnet10": (4_910_922, 4_904_650, 5_760, 12, 74),
    "resnet14": (10_812_234, 10_805_962, 8_832, 16, 98),
    "resnet18": (11_181_642, 11_175_370, 9_600, 20, 122),
    "resnet22": (17_082_954, 17_076_682, 12_672, 24, 146),
    "resnet26": (17_452_362, 17_446_090, 13_440, 28, 170),
}
VIT_TABLE = {"vit_s8": 14_571_658, "vit_s9": 16_346_122, "vit_s10": 18_120_586,
             "vit_s11": 19_895_050, "vit_s12": 21_669_514}


@pytest.mark.parametrize("name", RESNETS)
def test_resnet_sizes_match_the_reference(name: str) -> None:
    rgb, grey, running, counters, state_dict_keys = RESNET_TABLE[name]
    params, state = _shapes(stage_resnet(10, STAGE_SPLITS[name]), (2, 32, 32, 3))
    assert _size(params) == rgb
    assert _size(_shapes(stage_resnet(10, STAGE_SPLITS[name]), (2, 32, 32, 1))[0]) == grey
    floats = [v for bn in state.values() for k, v in bn.items() if k != "count"]
    assert sum(int(np.prod(v.shape)) for v in floats) == running
    assert sum("count" in bn for bn in state.values()) == counters
    assert all(bn["count"].dtype == jnp.int32 and bn["count"].shape == () for bn in state.values())
    assert len(jax.tree_util.tree_leaves((params, state))) == state_dict_keys


def test_vit_sizes_match_the_reference() -> None:
    for name, expected in VIT_TABLE.items():
        params, state = _shapes(vit(10, VIT_SPLITS[name]), (1, 224, 224, 3))
        assert _size(params) == expected, name
        assert state == {}


def test_resnet_module_names() -> None:
    params, state = _shapes(stage_resnet(10, STAGE_SPLITS["resnet14"]), (1, 32, 32, 3))
    blocks = ["layer1_0", "layer2_0", "layer3_0", "layer3_1", "layer4_0", "layer4_1"]
    expected = {"conv1", "bn1", "fc"}
    for block in blocks:
        expected |= {f"{block}/~/{m}" for m in ("conv1", "bn1", "conv2", "bn2")}
        if block in ("layer2_0", "layer3_0", "layer4_0"):
            expected |= {f"{block}/~/downsample_conv", f"{block}/~/downsample_bn"}
    assert set(params) == expected
    assert set(state) == {m for m in expected if "bn" in m}
    assert set(params["fc"]) == {"w", "b"} and set(params["layer2_0/~/conv1"]) == {"w"}
    assert params["layer2_0/~/downsample_conv"]["w"].shape == (1, 1, 64, 128)  # HWIO
    assert set(state["bn1"]) == {"mean", "var", "count"}


def test_vit_module_names() -> None:
    params, _ = _shapes(vit(10, 2, **TINY_VIT), (1, 32, 32, 3))
    block = {f"blocks_{j}/~/{m}" for j in range(2)
             for m in ("norm1", "qkv", "proj", "norm2", "fc1", "fc2")}
    assert set(params) == {"patch_embed", "embed", "norm", "head"} | block
    assert set(params["embed"]) == {"cls_token", "pos_embed"}
    assert params["embed"]["pos_embed"].shape == (1, 1 + 8 * 8, 16)


@pytest.mark.parametrize("family", [RESNETS, VITS], ids=["resnet", "vit"])
def test_every_submodel_is_a_subset_of_the_server(family: tuple[str, ...]) -> None:
    def shapes(name):
        spec = build_model(name, num_classes=10, input_shape=(32, 32, 3))
        tree = jax.eval_shape(lambda r: spec.init(r, jnp.zeros((1, 32, 32, 3))),
                              jax.random.PRNGKey(0))
        return {(m, k): v.shape for part in tree for m, leaves in part.items()
                for k, v in leaves.items()}

    server = shapes(family[-1])
    for name in family:
        assert submodel_family(name) == family
        client = shapes(name)
        assert all(server.get(key) == shape for key, shape in client.items()), name
    assert submodel_family("resnet20") is None


def test_inco_pairs_name_existing_same_shaped_kernels() -> None:
    params, _ = _shapes(stage_resnet(10, STAGE_SPLITS["resnet26"]), (1, 32, 32, 3))
    pairs = inco_pairs(STAGE_SPLITS["resnet26"])
    assert len(pairs) == 16 and len({t for t, _ in pairs}) == 16
    for target, source in pairs:
        assert params[target]["w"].shape == params[source]["w"].shape
        assert source.endswith("_0/~/conv2") and "_0/" not in target
    assert inco_pairs(STAGE_SPLITS["resnet10"]) == []
    assert len(inco_pairs(STAGE_SPLITS["resnet14"])) == 4
    vit_params, _ = _shapes(vit(10, 3, **TINY_VIT), (1, 32, 32, 3))
    assert vit_inco_pairs(3) == [(f"blocks_{j}/~/norm2", f"blocks_{j}/~/norm1")
                                 for j in range(3)]
    for target, source in vit_inco_pairs(3):
        assert vit_params[target]["scale"].shape == vit_params[source]["scale"].shape


def _bn_apply(x: jnp.ndarray, is_training: bool, state=None):
    transformed = hk.transform_with_state(lambda x, t: TorchBatchNorm(name="bn")(x, t))
    init_state = {"bn": {"mean": jnp.zeros(3), "var": jnp.ones(3),
                         "count": jnp.zeros((), jnp.int32)}}
    params = {"bn": {"scale": jnp.full((3,), 2.0), "offset": jnp.full((3,), 0.5)}}
    return transformed.apply(params, init_state if state is None else state, None, x,
                             is_training)


def test_torch_batch_norm_matches_pytorch_semantics() -> None:
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 2, 3)) * 3.0 + 1.0
    xn = np.asarray(x, np.float64).reshape(-1, 3)
    n = xn.shape[0]
    mean, biased = xn.mean(0), xn.var(0)
    out, state = _bn_apply(x, True)
    expected = (xn - mean) / np.sqrt(biased + 1e-5) * 2.0 + 0.5
    np.testing.assert_allclose(np.asarray(out).reshape(-1, 3), expected, rtol=1e-5, atol=1e-5)
    # Running stats: momentum 0.1 from (0, 1), variance unbiased, no debiasing.
    np.testing.assert_allclose(state["bn"]["mean"], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(state["bn"]["var"], 0.9 + 0.1 * biased * n / (n - 1), rtol=1e-5)
    assert int(state["bn"]["count"]) == 1
    _, state2 = _bn_apply(x, True, state)
    np.testing.assert_allclose(state2["bn"]["mean"], 0.9 * 0.1 * mean + 0.1 * mean, rtol=1e-5)
    assert int(state2["bn"]["count"]) == 2
    # Evaluation normalises with the running statistics and leaves the state alone.
    out_eval, state3 = _bn_apply(x, False, state)
    rm, rv = np.asarray(state["bn"]["mean"]), np.asarray(state["bn"]["var"])
    expected = (xn - rm) / np.sqrt(rv + 1e-5) * 2.0 + 0.5
    np.testing.assert_allclose(np.asarray(out_eval).reshape(-1, 3), expected, rtol=1e-5,
                               atol=1e-5)
    assert int(state3["bn"]["count"]) == 1


def test_torch_batch_norm_honours_the_example_mask() -> None:
    x = jax.random.normal(jax.random.PRNGKey(2), (5, 2, 2, 3))
    with batch_statistics_over(jnp.array([1, 1, 0, 1, 0])):
        masked, masked_state = _bn_apply(x, True)
    subset, subset_state = _bn_apply(x[jnp.array([0, 1, 3])], True)
    np.testing.assert_allclose(masked[jnp.array([0, 1, 3])], subset, rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, rtol=1e-5),
                           masked_state, subset_state)


def test_resnet_spatial_sizes_and_padding() -> None:
    trunk = hk.transform_with_state(
        lambda x: resnet_features(x, True, STAGE_SPLITS["resnet10"], TINY_WIDTHS))
    out = jax.eval_shape(lambda r, x: trunk.apply(*trunk.init(r, x), r, x)[0],
                         jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)))
    assert out.shape == (2, 1, 1, TINY_WIDTHS[-1])
    # The max-pool pads with -inf: on all-negative maps zero padding would show up as 0.
    pooled = _max_pool_3x3_s2(-jnp.ones((1, 16, 16, 1)))
    assert pooled.shape == (1, 8, 8, 1) and float(pooled.max()) == -1.0


def test_tiny_resnet_forward_and_init() -> None:
    widths = (16, 16, 32, 64)
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 32, 32, 3))
    apply, params, state = _init(stage_resnet(10, (2, 1, 1, 2), widths), x)
    out, new_state = apply(params, state, None, x, True)
    assert out.logits.shape == (4, 10) and out.embedding.shape == (4, 64)
    assert int(new_state["layer4_1/~/bn2"]["count"]) == 1
    eval_out, _ = apply(params, new_state, None, x, False)
    assert np.isfinite(np.asarray(eval_out.logits)).all()
    # Kaiming-normal, fan_out: std sqrt(2 / (3 * 3 * 64)); fc U(+-1/sqrt(64)).
    w = np.asarray(params["layer4_1/~/conv1"]["w"])
    assert abs(w.std() / np.sqrt(2 / (9 * 64)) - 1) < 0.05 and abs(w.mean()) < 0.01
    bound = 1 / np.sqrt(64)
    for leaf in ("w", "b"):
        fc = np.abs(np.asarray(params["fc"][leaf]))
        assert fc.max() <= bound and (leaf == "b" or fc.max() > 0.9 * bound)
    assert float(params["bn1"]["scale"].min()) == 1.0 and float(state["bn1"]["var"].min()) == 1.0


def test_tiny_vit_forward_resizes_small_images() -> None:
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 16, 16, 3))
    forward = vit(10, 2, **TINY_VIT)
    params = _random_params(forward, x.shape, 0)
    apply = jax.jit(hk.transform_with_state(forward).apply, static_argnums=4)
    state = {}
    out, _ = apply(params, state, None, x, False)
    assert out.logits.shape == (2, 10) and out.embedding.shape == (2, 16)
    assert np.isfinite(np.asarray(out.logits)).all()
    with pytest.raises(ValueError, match="64x64"):
        apply(params, state, None, jnp.zeros((1, 64, 64, 3)), False)
    with pytest.raises(ValueError, match="32x32"):
        build_model("vit_s8", num_classes=10, input_shape=(64, 64, 3))


def _to_timm(params) -> dict[str, np.ndarray]:
    """Our Haiku params written out as a timm state dict (torch layouts)."""
    names = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2",
             "norm1": "norm1", "norm2": "norm2"}
    out = {"cls_token": params["embed"]["cls_token"], "pos_embed": params["embed"]["pos_embed"],
           "patch_embed.proj.weight": np.transpose(params["patch_embed"]["w"], (3, 2, 0, 1)),
           "patch_embed.proj.bias": params["patch_embed"]["b"],
           "norm.weight": params["norm"]["scale"], "norm.bias": params["norm"]["offset"],
           "head.weight": np.zeros((1000, 16)), "head.bias": np.zeros((1000,))}
    for module, leaves in params.items():
        if module.startswith("blocks_"):
            j, sub = module[len("blocks_"):].split("/~/")
            prefix = f"blocks.{j}.{names[sub]}"
            if "w" in leaves:
                out[f"{prefix}.weight"], out[f"{prefix}.bias"] = leaves["w"].T, leaves["b"]
            else:
                out[f"{prefix}.weight"], out[f"{prefix}.bias"] = leaves["scale"], leaves["offset"]
    return {k: np.asarray(v) for k, v in out.items()}


def _to_augreg(params, heads: int) -> dict[str, np.ndarray]:
    """Our Haiku params written out with big_vision names and per-head attention kernels."""
    out = {"embedding/kernel": params["patch_embed"]["w"], "embedding/bias":
           params["patch_embed"]["b"], "cls": params["embed"]["cls_token"],
           "Transformer/posembed_input/pos_embedding": params["embed"]["pos_embed"],
           "Transformer/encoder_norm/scale": params["norm"]["scale"],
           "Transformer/encoder_norm/bias": params["norm"]["offset"]}
    j = 0
    while f"blocks_{j}/~/qkv" in params:
        p = {sub: params[f"blocks_{j}/~/{sub}"] for sub in
             ("norm1", "qkv", "proj", "norm2", "fc1", "fc2")}
        dim = p["proj"]["w"].shape[0]
        pre = f"Transformer/encoderblock_{j}/"
        mha = pre + "MultiHeadDotProductAttention_1/"
        for n, name in enumerate(("query", "key", "value")):
            part = slice(n * dim, (n + 1) * dim)
            out[f"{mha}{name}/kernel"] = p["qkv"]["w"][:, part].reshape(dim, heads, -1)
            out[f"{mha}{name}/bias"] = p["qkv"]["b"][part].reshape(heads, -1)
        out[f"{mha}out/kernel"] = p["proj"]["w"].reshape(heads, -1, dim)
        out[f"{mha}out/bias"] = p["proj"]["b"]
        for ln, sub in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            out[f"{pre}{ln}/scale"], out[f"{pre}{ln}/bias"] = (p[sub]["scale"],
                                                               p[sub]["offset"])
        for dense, sub in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            out[f"{pre}MlpBlock_3/{dense}/kernel"] = p[sub]["w"]
            out[f"{pre}MlpBlock_3/{dense}/bias"] = p[sub]["b"]
        j += 1
    return {k: np.asarray(v) for k, v in out.items()}


def _assert_loaded(loaded, source, fresh) -> None:
    for module in fresh:
        expected = fresh[module] if module == "head" else source[module]
        for leaf in fresh[module]:
            np.testing.assert_allclose(loaded[module][leaf], expected[leaf], rtol=1e-6,
                                       err_msg=f"{module}/{leaf}")


@pytest.fixture(scope="module")
def tiny_vit_params() -> dict[str, hk.Params]:
    """Tiny ViT parameter sets for the weight-file tests: a deep source, a shallower
    client and one of another width."""
    shape = (1, 32, 32, 3)
    return {"deep": _random_params(vit(10, 3, **TINY_VIT), shape, 1),
            "shallow": _random_params(vit(10, 2, **TINY_VIT), shape, 2),
            "wide": _random_params(vit(10, 2, **{**TINY_VIT, "embed_dim": 32}), shape, 3)}


def test_vit_weights_round_trip_in_every_naming(tmp_path, tiny_vit_params) -> None:
    source, fresh = tiny_vit_params["deep"], tiny_vit_params["shallow"]
    save_vit_weights(tmp_path / "ours.npz", source)
    np.savez(tmp_path / "timm.npz", **_to_timm(source))
    np.savez(tmp_path / "augreg.npz", **_to_augreg(source, TINY_VIT["num_heads"]))
    for name in ("ours", "timm", "augreg"):
        _assert_loaded(load_vit_weights(tmp_path / f"{name}.npz", fresh), source, fresh)


def test_vit_weights_that_do_not_fit_raise_data_error(tmp_path, tiny_vit_params) -> None:
    deep = tiny_vit_params["deep"]
    save_vit_weights(tmp_path / "shallow.npz", tiny_vit_params["shallow"])
    with pytest.raises(DataError, match="blocks_2"):
        load_vit_weights(tmp_path / "shallow.npz", deep)
    with pytest.raises(DataError, match="shape"):
        load_vit_weights(tmp_path / "shallow.npz", tiny_vit_params["wide"])
    np.savez(tmp_path / "other.npz", something=np.zeros(3))
    with pytest.raises(DataError, match="something"):
        load_vit_weights(tmp_path / "other.npz", deep)
    with pytest.raises(DataError):
        load_vit_weights(tmp_path / "missing.npz", deep)
