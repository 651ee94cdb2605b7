"""DAC's CIFAR MobileNet-V2 (dac_spec 1): one model class for every expansion width.

A configuration fixes the stem width, each of the 17 inverted-residual blocks'
(expansion, output, stride) and the final convolution's width. DAC's search changes only
the expansions; the width-multiplier baseline (dac_spec 3.2) changes every width; both
are `MobileNetConfig`s, so a searched model, a width-multiplier model and the full model
are the same Haiku code with the same module names. A smaller model is then, entry by
entry, a channel subset of the full one (`channel_layout` says which axis of which leaf
holds which channels), which is what lets clients of different budgets train in one
federation (trainers/submodels.ChannelView).

The structure is kuangliu's CIFAR variant as the spec gives it: stride-1 stem and second
stage, an expansion convolution even at expansion 1, ReLU (not ReLU6), projection
shortcuts where a stride-1 block changes width, PyTorch BatchNorm and PyTorch's default
initialisation (Kaiming-uniform with a = sqrt(5), i.e. U(+-1/sqrt(fan_in))).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import haiku as hk
import jax
import jax.numpy as jnp

from deq.stats import SolverStats
from models.base import ModelOutput
from models.torch_batch_norm import TorchBatchNorm

FULL_BLOCKS: tuple[tuple[int, int, int], ...] = (
    (32, 16, 1), (96, 24, 1), (144, 24, 1), (144, 32, 2), (192, 32, 1), (192, 32, 1),
    (192, 64, 2), (384, 64, 1), (384, 64, 1), (384, 64, 1), (384, 96, 1), (576, 96, 1),
    (576, 96, 1), (576, 160, 2), (960, 160, 1), (960, 160, 1), (960, 320, 1))
"""(expansion width e, output width, stride) of the full model's blocks (dac_spec 1.2)."""

NUM_BLOCKS = len(FULL_BLOCKS)
MIN_WIDTH = 8  # DAC's floor on a pruned expansion; also the multiplier's rounding unit


@dataclass(frozen=True)
class MobileNetConfig:
    stem: int = 32
    blocks: tuple[tuple[int, int, int], ...] = FULL_BLOCKS
    final: int = 1280

    def __post_init__(self) -> None:
        if len(self.blocks) != NUM_BLOCKS:
            raise ValueError(f"a MobileNet-V2 configuration has {NUM_BLOCKS} blocks, got "
                             f"{len(self.blocks)}")
        for b, (e, out, s) in enumerate(self.blocks):
            if min(e, out) < 1 or s != FULL_BLOCKS[b][2]:
                raise ValueError(f"block {b}: expansion and output widths must be >= 1 and "
                                 f"the stride {FULL_BLOCKS[b][2]}; got {(e, out, s)}")

    @classmethod
    def from_expansions(cls, expansions: Sequence[int]) -> "MobileNetConfig":
        """The full model with DAC's searched expansion widths (all else unchanged)."""
        if len(expansions) != NUM_BLOCKS:
            raise ValueError(f"need {NUM_BLOCKS} expansion widths, got {len(expansions)}")
        return cls(blocks=tuple((int(e), out, s) for e, (_, out, s)
                                in zip(expansions, FULL_BLOCKS, strict=True)))

    @classmethod
    def width_multiplier(cls, wm: float) -> "MobileNetConfig":
        """`mbn2_std.mbn2(width_mul=wm)` (dac_spec 3.2): rounded stem and outputs, expansion
        t x the rounded input width, final conv 1280 * max(1, wm)."""
        stem = _round_width(32 * wm)
        blocks, cin = [], stem
        for b, (e, out, s) in enumerate(FULL_BLOCKS):
            t = e // (32 if b == 0 else FULL_BLOCKS[b - 1][1])
            width = _round_width(out * wm)
            blocks.append((t * cin, width, s))
            cin = width
        return cls(stem=stem, blocks=tuple(blocks), final=_round_width(1280 * max(1.0, wm)))

    @property
    def expansions(self) -> tuple[int, ...]:
        return tuple(e for e, _, _ in self.blocks)

    def block_inputs(self) -> list[int]:
        return [self.stem] + [out for _, out, _ in self.blocks[:-1]]

    def to_json(self) -> list[list[int]]:
        """DAC's `cfg` (a list of [e, c_out, s]); the stem and final width are the full
        model's in every searched configuration."""
        return [list(b) for b in self.blocks]

    @classmethod
    def from_json(cls, cfg: Sequence[Sequence[int]]) -> "MobileNetConfig":
        return cls(blocks=tuple(tuple(int(v) for v in b) for b in cfg))


FULL = MobileNetConfig()


def _round_width(v: float) -> int:
    """`_make_divisible(v, 8)`: nearest multiple of 8, at least 8, never under 0.9 v."""
    rounded = max(MIN_WIDTH, int(v + MIN_WIDTH / 2) // MIN_WIDTH * MIN_WIDTH)
    return rounded + MIN_WIDTH if rounded < 0.9 * v else rounded


def has_projection(cin: int, cout: int, stride: int) -> bool:
    return stride == 1 and cin != cout


def has_identity(cin: int, cout: int, stride: int) -> bool:
    return stride == 1 and cin == cout


# ------------------------------------------------------------------ exact cost counter
def count_params(cfg: MobileNetConfig = FULL, num_classes: int = 10,
                 in_channels: int = 3) -> int:
    """Trainable parameters (conv and linear weights, BN scale and offset, linear bias);
    BN running statistics are buffers and not counted (dac_spec 1.3)."""
    total = 9 * in_channels * cfg.stem + 2 * cfg.stem
    for cin, (e, out, s) in zip(cfg.block_inputs(), cfg.blocks, strict=True):
        total += cin * e + 9 * e + e * out + 4 * e + 2 * out
        if has_projection(cin, out, s):
            total += cin * out + 2 * out
    last = cfg.blocks[-1][1]
    total += last * cfg.final + 2 * cfg.final
    return total + cfg.final * num_classes + num_classes


def count_macs(cfg: MobileNetConfig = FULL, num_classes: int = 10, image: int = 32,
               in_channels: int = 3) -> int:
    """Multiply-accumulates per image as thop counts them (dac_spec 1.3): every conv and
    linear weight's multiply-adds plus 2 per BatchNorm output element; ReLU, pooling,
    residual adds and the linear bias are free."""
    h = image
    total = (9 * in_channels * cfg.stem + 2 * cfg.stem) * h * h
    for cin, (e, out, s) in zip(cfg.block_inputs(), cfg.blocks, strict=True):
        h2 = h // s
        total += cin * e * h * h + 9 * e * h2 * h2 + e * out * h2 * h2
        total += 2 * (e * h * h + e * h2 * h2 + out * h2 * h2)
        if has_projection(cin, out, s):
            total += (cin * out + 2 * out) * h2 * h2
        h = h2
    last = cfg.blocks[-1][1]
    total += (last * cfg.final + 2 * cfg.final) * h * h
    return total + cfg.final * num_classes


def peak_feature_map(cfg: MobileNetConfig = FULL, image: int = 32) -> int:
    """`mbn2_nas.maximal_fm` (dac_spec 3.3): the largest max(e, c_out) h'^2 of a block,
    against the stem's and the final conv's outputs."""
    h, peak = image, cfg.stem * image * image
    for e, out, s in cfg.blocks:
        h //= s
        peak = max(peak, max(e, out) * h * h)
    return max(peak, cfg.final * h * h)


# ------------------------------------------------------------------ the Haiku model
def _torch_uniform(fan_in: int) -> hk.initializers.Initializer:
    bound = 1.0 / fan_in ** 0.5
    return hk.initializers.RandomUniform(-bound, bound)


# PyTorch's default conv init, kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in)).
_CONV_INIT = hk.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")


class Pointwise(hk.Module):
    """A 1x1 convolution as a matrix product over the channels (weight `w` of shape
    (1, 1, C_in, C_out), as `hk.Conv2D`'s): XLA:CPU differentiates a dot several times
    faster than a convolution."""

    def __init__(self, channels: int, name: str):
        super().__init__(name=name)
        self.channels = channels

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        w = hk.get_parameter("w", (1, 1, x.shape[-1], self.channels), x.dtype,
                             init=_CONV_INIT)
        return jnp.einsum("bhwc,cd->bhwd", x, w[0, 0])


def _conv(channels: int, kernel: int, stride: int, name: str) -> hk.Module:
    if kernel == 1 and stride == 1:
        return Pointwise(channels, name)
    pad = kernel // 2
    return hk.Conv2D(channels, kernel, stride=stride, padding=((pad, pad), (pad, pad)),
                     with_bias=False, w_init=_CONV_INIT, name=name)


class Depthwise3x3(hk.Module):
    """A 3x3 depthwise convolution, padding 1, as nine shifted multiply-adds.

    The same arithmetic as `hk.DepthwiseConv2D` (its `w` of shape (3, 3, 1, C) too, and
    equal outputs, tested), but XLA:CPU runs a grouped convolution 5-10x slower than
    these elementwise products, forward and backward; on a GPU both are fast."""

    def __init__(self, stride: int, name: str):
        super().__init__(name=name)
        self.stride = stride

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b, h, w, c = x.shape
        kernel = hk.get_parameter("w", (3, 3, 1, c), x.dtype, init=_CONV_INIT)
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        s = self.stride
        ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
        out = None
        for i in range(3):
            for j in range(3):
                tap = jax.lax.slice(padded, (0, i, j, 0),
                                    (b, i + (ho - 1) * s + 1, j + (wo - 1) * s + 1, c),
                                    (1, s, s, 1)) * kernel[i, j, 0]
                out = tap if out is None else out + tap
        return out


class InvertedResidual(hk.Module):
    """expand 1x1 -> BN -> ReLU -> (gate) -> depthwise 3x3 -> BN -> ReLU -> project 1x1
    -> BN, plus the shortcut. With `gated`, DAC's one active gate (dac_spec 2.1): a
    per-channel scalar `gate` (init 1) multiplying the expanded channels before the
    depthwise convolution."""

    def __init__(self, cin: int, e: int, out: int, stride: int, gated: bool, name: str):
        super().__init__(name=name)
        self.e, self.stride, self.gated = e, stride, gated
        self.expand_conv = _conv(e, 1, 1, "expand_conv")
        self.expand_bn = TorchBatchNorm(name="expand_bn")
        self.depthwise_conv = Depthwise3x3(stride, name="depthwise_conv")
        self.depthwise_bn = TorchBatchNorm(name="depthwise_bn")
        self.project_conv = _conv(out, 1, 1, "project_conv")
        self.project_bn = TorchBatchNorm(name="project_bn")
        self.identity = has_identity(cin, out, stride)
        self.projection = None
        if has_projection(cin, out, stride):
            self.projection = (_conv(out, 1, 1, "shortcut_conv"),
                               TorchBatchNorm(name="shortcut_bn"))

    def __call__(self, x: jnp.ndarray, is_training: bool) -> jnp.ndarray:
        h = jax.nn.relu(self.expand_bn(self.expand_conv(x), is_training))
        if self.gated:
            h = h * hk.get_parameter("gate", (self.e,), h.dtype, init=jnp.ones)
        h = jax.nn.relu(self.depthwise_bn(self.depthwise_conv(h), is_training))
        h = self.project_bn(self.project_conv(h), is_training)
        if self.identity:
            return h + x
        if self.projection is not None:
            conv, bn = self.projection
            return h + bn(conv(x), is_training)
        return h


def block_name(b: int) -> str:
    return f"block{b:02d}"


def mobilenet_v2(num_classes: int, cfg: MobileNetConfig = FULL, gated: bool = False
                 ) -> Callable[..., ModelOutput]:
    """The forward function, for `hk.transform_with_state`. `gated`: DAC's search model
    (one `gate` vector per block); the gate-free model is what a configuration trains as.
    The embedding (for MOON) is the pooled 1280-wide feature."""

    def forward(x: jnp.ndarray, is_training: bool, probe: jnp.ndarray | None = None
                ) -> ModelOutput:
        del probe
        h = _conv(cfg.stem, 3, 1, "stem_conv")(x)
        h = jax.nn.relu(TorchBatchNorm(name="stem_bn")(h, is_training))
        for b, (cin, (e, out, s)) in enumerate(zip(cfg.block_inputs(), cfg.blocks,
                                                   strict=True)):
            h = InvertedResidual(cin, e, out, s, gated, name=block_name(b))(h, is_training)
        h = _conv(cfg.final, 1, 1, "final_conv")(h)
        h = jax.nn.relu(TorchBatchNorm(name="final_bn")(h, is_training))
        embedding = jnp.mean(h, axis=(1, 2))  # avg_pool2d(4) of the 4x4 map, flattened
        init = _torch_uniform(cfg.final)
        logits = hk.Linear(num_classes, w_init=init, b_init=init, name="fc")(embedding)
        return ModelOutput(logits, embedding, SolverStats.zeros())

    return forward


# ------------------------------------------------------------------ channel layout
ChannelSets = dict[str, tuple[str | None, ...]]  # leaf -> the channel set of each axis


def channel_layout(cfg: MobileNetConfig = FULL) -> dict[str, ChannelSets]:
    """Which channel set each axis of each parameter and state leaf indexes (None: an
    axis no sub-model narrows, e.g. kernel rows). Sets are named `stem`, `exp{b}`,
    `out{b}` and `final`; an identity block's output set is its input's (the residual
    adds channel i to channel i), so tied widths stay tied."""
    layout: dict[str, ChannelSets] = {}

    def conv(name, cin_set, cout_set):
        layout[name] = {"w": (None, None, cin_set, cout_set)}

    def bn(name, channels):
        layout[name] = {"scale": (channels,), "offset": (channels,), "mean": (channels,),
                        "var": (channels,), "count": ()}

    conv("stem_conv", None, "stem")
    bn("stem_bn", "stem")
    previous = "stem"
    for b, (cin, (_, out, s)) in enumerate(zip(cfg.block_inputs(), cfg.blocks, strict=True)):
        name, exp = block_name(b), f"exp{b}"
        out_set = previous if has_identity(cin, out, s) else f"out{b}"
        conv(f"{name}/~/expand_conv", previous, exp)
        bn(f"{name}/~/expand_bn", exp)
        layout[name] = {"gate": (exp,)}
        layout[f"{name}/~/depthwise_conv"] = {"w": (None, None, None, exp)}
        bn(f"{name}/~/depthwise_bn", exp)
        conv(f"{name}/~/project_conv", exp, out_set)
        bn(f"{name}/~/project_bn", out_set)
        if has_projection(cin, out, s):
            conv(f"{name}/~/shortcut_conv", previous, out_set)
            bn(f"{name}/~/shortcut_bn", out_set)
        previous = out_set
    conv("final_conv", previous, "final")
    bn("final_bn", "final")
    layout["fc"] = {"w": ("final", None), "b": (None,)}
    return layout


def set_widths(cfg: MobileNetConfig, server: MobileNetConfig = FULL) -> dict[str, int]:
    """The width `cfg` gives every channel set of the `server` model's layout (a smaller
    width multiplier can make a projection block an identity one; the server's sets are
    what is sliced)."""
    widths = {"stem": cfg.stem, "final": cfg.final}
    previous = "stem"
    for b, ((e, out, _), cin, (_, s_out, s)) in enumerate(zip(
            cfg.blocks, server.block_inputs(), server.blocks, strict=True)):
        widths[f"exp{b}"] = e
        out_set = previous if has_identity(cin, s_out, s) else f"out{b}"
        widths[out_set] = out
        previous = out_set
    return widths
