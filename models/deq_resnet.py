"""DEQ-ResNet-S (FEMNIST) and DEQ-ResNet-M (CIFAR), as the reference builds them (spec 5.1).

Three reference details are reproduced on purpose, because they shape the numbers:
GroupNorm statistics are taken per image row (the reference applies haiku's GroupNorm to
unbatched (H, W, C) tensors, so the row axis is treated as the batch); the solve starts
from z0 = u; and the equilibrium block is always initialised from PRNGKey(42).
"""

from collections.abc import Callable

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from deq.budget import SolverBudget
from deq.config import SolverConfig
from deq.conv import conv3x3, plain_conv3x3
from deq.fixed_point import fixed_point
from models.base import ModelOutput
from models.batch_norm import BatchNorm

GROUPS = 8
BLOCK_INIT_KEY = 42
_CONV_INIT = hk.initializers.RandomNormal(stddev=0.01)


def row_group_norm(x: jnp.ndarray, scale: jnp.ndarray, offset: jnp.ndarray,
                   groups: int = GROUPS, eps: float = 1e-5,
                   channels: jnp.ndarray | None = None) -> jnp.ndarray:
    """GroupNorm whose statistics run over (width, channels of the group) for each row.

    `channels` (1.0 / 0.0 per channel): statistics over the marked channels only and the
    others set to 0, which is exactly the GroupNorm of the narrowed tensor when each
    group keeps the same number of channels (`hidden_channels`)."""
    b, h, w, c = x.shape
    xg = x.reshape(b, h, w, groups, c // groups)
    if channels is None:
        mean = jnp.mean(xg, axis=(2, 4), keepdims=True)
        var = jnp.var(xg, axis=(2, 4), keepdims=True)
        xg = (xg - mean) * jax.lax.rsqrt(var + eps)
        return xg.reshape(b, h, w, c) * scale + offset
    m = channels.reshape(1, 1, 1, groups, c // groups)
    count = w * jnp.sum(m, axis=4, keepdims=True)
    mean = jnp.sum(xg * m, axis=(2, 4), keepdims=True) / count
    var = jnp.sum(jnp.square(xg - mean) * m, axis=(2, 4), keepdims=True) / count
    xg = (xg - mean) * jax.lax.rsqrt(var + eps)
    return (xg.reshape(b, h, w, c) * scale + offset) * channels


def hidden_channels(width: int, rate: float, groups: int = GROUPS) -> np.ndarray:
    """The hidden channels a block of width `width` keeps at `rate`: the first
    round(rate * width / groups) (at least 1) of every normalisation group, so that the
    narrowed block's groups are the full block's groups, each cut alike."""
    per_group = width // groups
    keep = min(max(int(round(rate * per_group)), 1), per_group)
    return (np.arange(groups)[:, None] * per_group + np.arange(keep)[None]).reshape(-1)


def hidden_mask(width: int, rate: float, groups: int = GROUPS) -> np.ndarray:
    mask = np.zeros(width, np.float32)
    mask[hidden_channels(width, rate, groups)] = 1.0
    return mask


HIDDEN_LAYOUT = {"conv1_w": -1, "conv2_w": -2, "gn1_scale": -1, "gn1_offset": -1}
"""Per leaf of the `deq_block` module, the axis that runs over the hidden channels."""


def slice_block(params: dict, channels: np.ndarray) -> dict:
    """The block's parameters (`DEQBlockParams` layout) narrowed to `channels`."""
    idx = jnp.asarray(channels)
    return {**params, "conv1": params["conv1"][..., idx],
            "conv2": params["conv2"][:, :, idx, :],
            "gn1": tuple(v[idx] for v in params["gn1"])}


class DEQBlockParams(hk.Module):
    """Creates the block's parameters; the block itself is the pure `resnet_block`."""

    def __call__(self, c1: int, c2: int, gated: bool = False) -> dict:
        get = lambda name, shape, init: hk.get_parameter(name, shape, jnp.float32, init=init)
        ones, zeros = hk.initializers.Constant(1.0), hk.initializers.Constant(0.0)
        # The width search's gates (trainers/deq_search.py), one per hidden channel.
        gate = {"gate": get("gate", (c2,), ones)} if gated else {}
        return {**gate,
            "conv1": get("conv1_w", (3, 3, c1, c2), _CONV_INIT),
            "conv2": get("conv2_w", (3, 3, c2, c1), _CONV_INIT),
            "gn1": (get("gn1_scale", (c2,), ones), get("gn1_offset", (c2,), zeros)),
            "gn2": (get("gn2_scale", (c1,), ones), get("gn2_offset", (c1,), zeros)),
            "gn3": (get("gn3_scale", (c1,), ones), get("gn3_offset", (c1,), zeros)),
        }


def make_resnet_block(fast_conv: bool) -> Callable:
    """f(z, u) = GN3(softplus(z + GN2(u + conv2(GN1(softplus(conv1(z)))))))
    (`p["hidden"]`, when present, masks the hidden channels: a narrower block with z's
    shape unchanged)."""
    conv = conv3x3 if fast_conv else plain_conv3x3

    def resnet_block(p: dict, z: jnp.ndarray, u: jnp.ndarray) -> jnp.ndarray:
        a = row_group_norm(jax.nn.softplus(conv(z, p["conv1"])), *p["gn1"],
                           channels=p.get("hidden"))
        if "gate" in p:
            a = a * p["gate"]
        b = row_group_norm(u + conv(a, p["conv2"]), *p["gn2"])
        return row_group_norm(jax.nn.softplus(z + b), *p["gn3"])

    return resnet_block


def _batch_norm(name: str | None = None) -> BatchNorm:
    return BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9, eps=1e-5,
                        name=name)


def _max_pool(x: jnp.ndarray) -> jnp.ndarray:
    return hk.max_pool(x, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding="SAME")


def deq_resnet(c1: int, c2: int, num_classes: int, solver: SolverConfig,
               gated: bool = False) -> Callable:
    """Forward function of DEQ-ResNet with stem width c1 and block width c2 (`gated`:
    with the width search's channel gates)."""
    block = make_resnet_block(solver.fast_conv)

    def forward(x: jnp.ndarray, is_training: bool, probe: jnp.ndarray | None = None,
                budget: SolverBudget | None = None) -> ModelOutput:
        h = hk.Conv2D(c1, 3, with_bias=False, w_init=_CONV_INIT, name="stem_conv")(x)
        h = _batch_norm("stem_bn")(jax.nn.softplus(h), is_training)
        u = _max_pool(h)
        with hk.with_rng(jax.random.PRNGKey(BLOCK_INIT_KEY)):
            params = DEQBlockParams(name="deq_block")(c1, c2, gated)
        if budget is not None and budget.hidden is not None:
            params = {**params, "hidden": budget.hidden}
        z, stats = fixed_point(block, params, u, u, probe, solver, budget)
        h = _max_pool(z).reshape(x.shape[0], -1)
        h = jax.nn.softplus(hk.Linear(256, name="linear_1")(h))
        embedding = jax.nn.softplus(hk.Linear(128, name="linear_2")(h))
        h = _batch_norm("linear_bn")(embedding, is_training)
        logits = hk.Linear(num_classes, name="player_logits")(h)
        return ModelOutput(logits, embedding, stats)

    return forward
