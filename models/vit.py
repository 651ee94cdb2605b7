"""InCo's layer-split ViT-S (spec 1.2): timm's `vit_small_patch16_224` at depths 8-12.

Client group g keeps the first 7 + g transformer blocks of the server's ViT-S/12, so
every client tensor has the key and shape of a server tensor. Module names mirror timm's
state-dict keys (`blocks.3.attn.qkv.weight` -> module `blocks_3/~/qkv`, leaf `w`), which
keeps InCo's ownership and pairing rules readable against the reference.

The paper fine-tunes ImageNet weights at 224x224 with 16x16 patches. Those weights
cannot be downloaded here, so training starts from timm's random init by default;
`load_vit_weights` fills a model from a user-supplied `.npz`. Patches of 4 at 32x32 give
a model of the same depth and width that trains on a CPU.
"""

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from data.errors import DataError
from deq.stats import SolverStats
from models.base import ModelOutput

ForwardFn = Callable[..., ModelOutput]

VIT_SPLITS: dict[str, int] = {f"vit_s{d}": d for d in range(8, 13)}
"""Depth of each sub-model; every model keeps a prefix of ViT-S/12's blocks."""

EMBED_DIM, NUM_HEADS, MLP_DIM = 384, 6, 1536
_LN_EPS = 1e-6

# timm's init: Linear weights trunc_normal(std=.02) cut at +-2 absolute (so, for std .02,
# a plain normal), zero biases; the class token normal(1e-6). The patch conv and the
# fresh head keep PyTorch's defaults, which `_torch_default` reproduces.
_LINEAR_INIT = hk.initializers.RandomNormal(0.02)


def _torch_default(fan_in: int) -> hk.initializers.Initializer:
    """nn.Linear / nn.Conv2d default init: weight and bias ~ U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return hk.initializers.RandomUniform(-bound, bound)


def _layer_norm(name: str) -> hk.LayerNorm:
    return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, eps=_LN_EPS, name=name)


def _linear(size: int, name: str) -> hk.Linear:
    return hk.Linear(size, w_init=_LINEAR_INIT, b_init=jnp.zeros, name=name)


class _TokenEmbed(hk.Module):
    """Prepends the class token and adds the learned positional embedding (after)."""

    def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
        batch, length, dim = tokens.shape
        cls = hk.get_parameter("cls_token", (1, 1, dim), tokens.dtype,
                               init=hk.initializers.RandomNormal(1e-6))
        pos = hk.get_parameter("pos_embed", (1, length + 1, dim), tokens.dtype,
                               init=hk.initializers.RandomNormal(0.02))
        cls = jnp.broadcast_to(cls, (batch, 1, dim))
        return jnp.concatenate([cls, tokens], axis=1) + pos


class Block(hk.Module):
    """Pre-norm transformer block: x += Attn(LN1 x); x += MLP(LN2 x). No dropout.

    Submodules are made in `__init__`, which gives them haiku's `blocks_{j}/~/norm1`
    names, the form the InCo rules use.
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, name: str):
        super().__init__(name=name)
        self.num_heads = num_heads
        self.norm1 = _layer_norm("norm1")
        self.qkv = _linear(3 * dim, "qkv")
        self.proj = _linear(dim, "proj")
        self.norm2 = _layer_norm("norm2")
        self.fc1 = _linear(mlp_dim, "fc1")
        self.fc2 = _linear(dim, "fc2")

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        batch, length, dim = x.shape
        head_dim = dim // self.num_heads
        # timm's layout: the 3*dim outputs are (q|k|v) x heads x head_dim, in that order.
        qkv = self.qkv(self.norm1(x)).reshape(batch, length, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim ** -0.5
        attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        x = x + self.proj(attn.reshape(batch, length, dim))
        h = jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False)
        return x + self.fc2(h)


def _fit_image(x: jnp.ndarray, image_size: int) -> jnp.ndarray:
    """Bilinear upsampling to image_size, as the reference's Resize(224) (spec 3.2)."""
    height, width = x.shape[1:3]
    if (height, width) == (image_size, image_size):
        return x
    if height > image_size or width > image_size:
        raise ValueError(f"ViT built for {image_size}x{image_size} inputs got {height}x{width}"
                         "; larger images are not cropped or shrunk, pass a larger image_size")
    return jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[3]), "bilinear")


def vit(num_classes: int, depth: int, *, patch_size: int = 16, image_size: int = 224,
        embed_dim: int = EMBED_DIM, num_heads: int = NUM_HEADS, mlp_dim: int = MLP_DIM
        ) -> ForwardFn:
    """Builds the forward function of a ViT-S of `depth` blocks (`hk.transform_with_state`).

    Inputs are (B, H, W, C) images; smaller ones are resized to `image_size` inside the
    model. The embedding (MOON) is the class-token feature after the final norm.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")

    def forward(x: jnp.ndarray, is_training: bool, probe: jnp.ndarray | None = None
                ) -> ModelOutput:
        del is_training, probe  # no dropout or BN; accepted so every model shares one call
        x = _fit_image(x, image_size)
        patch_init = _torch_default(patch_size * patch_size * x.shape[-1])
        h = hk.Conv2D(embed_dim, kernel_shape=patch_size, stride=patch_size, padding="VALID",
                      w_init=patch_init, b_init=patch_init, name="patch_embed")(x)
        h = _TokenEmbed(name="embed")(h.reshape(h.shape[0], -1, embed_dim))
        for j in range(depth):
            h = Block(embed_dim, num_heads, mlp_dim, name=f"blocks_{j}")(h)
        embedding = _layer_norm("norm")(h)[:, 0]
        head_init = _torch_default(embed_dim)
        logits = hk.Linear(num_classes, w_init=head_init, b_init=head_init,
                           name="head")(embedding)
        return ModelOutput(logits, embedding, SolverStats.zeros())

    return forward


def vit_inco_pairs(depth: int) -> list[tuple[str, str]]:
    """(target module, source module) of InCo's ViT rule (spec 5.3), leaf `scale`:
    in every block, norm2's scale is steered by norm1's."""
    return [(f"blocks_{j}/~/norm2", f"blocks_{j}/~/norm1") for j in range(depth)]


# --- Weight files ------------------------------------------------------------------------

_HOW_TO_GET = ("ImageNet weights cannot be downloaded by this project; export them yourself: "
               "numpy.savez of timm's vit_small_patch16_224 state_dict (tensors as numpy), "
               "the AugReg .npz named in spec 1.2, or a file written by save_vit_weights")

# A recipe reads some file keys and turns them into one Haiku tensor.
_Recipe = tuple[tuple[str, ...], Callable[..., np.ndarray]]
_SAME: Callable[[np.ndarray], np.ndarray] = lambda a: a
_BLOCK = re.compile(r"blocks_(\d+)/~/(\w+)")

_TIMM_BLOCK = {"norm1": "norm1", "qkv": "attn.qkv", "proj": "attn.proj", "norm2": "norm2",
               "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
_AUGREG_BLOCK = {"norm1": "LayerNorm_0", "norm2": "LayerNorm_2", "proj":
                 "MultiHeadDotProductAttention_1/out", "fc1": "MlpBlock_3/Dense_0",
                 "fc2": "MlpBlock_3/Dense_1"}


def _timm_recipe(module: str, leaf: str) -> _Recipe | None:
    """timm state-dict names; torch Linear/Conv weights are (out, in[, kh, kw])."""
    if module == "embed":
        return (leaf,), _SAME
    match = _BLOCK.fullmatch(module)
    if module in ("patch_embed", "norm"):
        prefix = "patch_embed.proj" if module == "patch_embed" else "norm"
    elif match and match[2] in _TIMM_BLOCK:
        prefix = f"blocks.{match[1]}.{_TIMM_BLOCK[match[2]]}"
    else:
        return None
    torch_leaf = {"w": "weight", "b": "bias", "scale": "weight", "offset": "bias"}.get(leaf)
    if torch_leaf is None:
        return None
    if leaf != "w":
        return (f"{prefix}.{torch_leaf}",), _SAME
    if module == "patch_embed":  # OIHW -> HWIO
        return (f"{prefix}.weight",), lambda a: a.transpose(2, 3, 1, 0)
    return (f"{prefix}.weight",), lambda a: a.T  # (out, in) -> (in, out)


def _augreg_recipe(module: str, leaf: str, prefix: str) -> _Recipe | None:
    """big_vision / AugReg names; kernels are (in, ...) already, attention split by head."""
    flax_leaf = {"w": "kernel", "b": "bias", "scale": "scale", "offset": "bias"}.get(leaf)
    if module == "patch_embed" and flax_leaf:
        return (f"{prefix}embedding/{flax_leaf}",), _SAME
    if module == "embed":
        key = {"cls_token": "cls", "pos_embed": "Transformer/posembed_input/pos_embedding"}
        return ((prefix + key[leaf],), _SAME) if leaf in key else None
    if module == "norm" and flax_leaf:
        return (f"{prefix}Transformer/encoder_norm/{flax_leaf}",), _SAME
    match = _BLOCK.fullmatch(module)
    if match is None or flax_leaf is None:
        return None
    block = f"{prefix}Transformer/encoderblock_{match[1]}/"
    if match[2] == "qkv":
        # query/key/value kernels (dim, heads, head_dim) -> one (dim, 3 * dim) kernel.
        keys = tuple(f"{block}MultiHeadDotProductAttention_1/{n}/{flax_leaf}"
                     for n in ("query", "key", "value"))
        if leaf == "w":
            return keys, lambda *a: np.concatenate([t.reshape(t.shape[0], -1) for t in a], 1)
        return keys, lambda *a: np.concatenate([t.reshape(-1) for t in a])
    if match[2] not in _AUGREG_BLOCK:
        return None
    # The output projection's kernel is (heads, head_dim, dim).
    reshape = _SAME
    if match[2] == "proj" and leaf == "w":
        reshape = lambda a: a.reshape(-1, a.shape[-1])
    return (f"{block}{_AUGREG_BLOCK[match[2]]}/{flax_leaf}",), reshape


def _naming(keys: set[str]) -> tuple[str, Callable[[str, str], _Recipe | None]] | None:
    """Detects the file's naming from its keys: (format name, recipe function), or None."""
    augreg = sorted(k[: -len("embedding/kernel")] for k in keys
                    if k == "embedding/kernel" or k.endswith("/embedding/kernel"))
    if augreg:  # AugReg files may nest everything under a prefix such as "opt/target/"
        return "AugReg", lambda m, leaf: _augreg_recipe(m, leaf, augreg[0])
    if "patch_embed.proj.weight" in keys:
        return "timm", _timm_recipe
    if "patch_embed/w" in keys:
        return "Haiku", lambda m, leaf: ((f"{m}/{leaf}",), _SAME)
    return None


def save_vit_weights(path: str | Path, params: Mapping[str, Mapping[str, jnp.ndarray]]) -> None:
    """Writes every parameter to an .npz under `module/leaf` keys (head included), the
    Haiku naming that `load_vit_weights` reads back. numpy appends `.npz` if missing."""
    arrays = {f"{module}/{leaf}": np.asarray(value)
              for module, leaves in params.items() for leaf, value in leaves.items()}
    np.savez(path, **arrays)


def load_vit_weights(path: str | Path, params: hk.Params) -> hk.Params:
    """Returns `params` with every tensor but the head taken from the .npz at `path`.

    The file may use timm state-dict names, AugReg (big_vision) names or our Haiku names.
    The head stays as initialised because the source head has other classes. Extra
    tensors in the file (e.g. deeper blocks for a shallower model) are ignored; a missing
    or differently shaped one raises DataError naming it.
    """
    expected = "an .npz of ViT weights with timm, AugReg or Haiku (save_vit_weights) names"
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(str(path), expected, _HOW_TO_GET, found=f"an unreadable file ({exc})"
                        ) from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise DataError(str(path), expected, _HOW_TO_GET, found="a single .npy array")
    with data:
        weights = {key: data[key] for key in data.files}
    detected = _naming(set(weights))
    if detected is None:
        found = f"keys {sorted(weights)[:5]}" if weights else "no arrays"
        raise DataError(str(path), expected, _HOW_TO_GET, found=found)
    naming, recipe = detected
    loaded: dict[str, dict[str, jnp.ndarray]] = {}
    for module, leaves in params.items():
        loaded[module] = dict(leaves)
        if module == "head":
            continue
        for leaf, value in leaves.items():
            found = recipe(module, leaf)
            if found is None:
                raise DataError(str(path), f"{naming} weights for parameter {module}/{leaf}",
                                _HOW_TO_GET, found="no naming rule for that module")
            keys, combine = found
            missing = [key for key in keys if key not in weights]
            if missing:
                raise DataError(str(path), f"{naming} key {missing[0]!r} (for {module}/{leaf})",
                                _HOW_TO_GET, found="no such key")
            array = combine(*(weights[key] for key in keys))
            if array.shape != value.shape:
                raise DataError(str(path), f"{naming} key {keys[0]!r} to give {module}/{leaf} "
                                f"shape {tuple(value.shape)}", _HOW_TO_GET,
                                found=f"shape {tuple(array.shape)} (check depth, patch_size, "
                                "image_size and widths)")
            loaded[module][leaf] = jnp.asarray(array, value.dtype)
    return loaded
