"""InCo's stage-split ResNets (spec 1.1): torchvision BasicBlock ResNets of 10-26 layers.

InCo gives each client group a ResNet that keeps the first n_s blocks of each stage s of
the server's ResNet26, so every client tensor must have the same key and shape as a
server tensor. Module names therefore follow the PyTorch state-dict keys one to one
(`layer2.0.conv1.weight` -> module `layer2_0/~/conv1`, leaf `w`), and the structure is
torchvision's, ImageNet stem included, even on 32x32 inputs.

Paddings are explicit: haiku's "SAME" pads even inputs asymmetrically, which would shift
every feature map relative to the reference. Convolution kernels use haiku's HWIO layout
(models.conv2d.Conv2D makes the same parameter as hk.Conv2D).
"""

import math
from collections.abc import Callable, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from deq.stats import SolverStats
from models.base import ModelOutput
from models.conv2d import Conv2D
from models.torch_batch_norm import TorchBatchNorm

ForwardFn = Callable[..., ModelOutput]

WIDTHS = (64, 128, 256, 512)
"""Channels of stages 1-4; the stem has WIDTHS[0] channels."""

STAGE_SPLITS: dict[str, tuple[int, int, int, int]] = {
    "resnet10": (1, 1, 1, 1),
    "resnet14": (1, 1, 2, 2),
    "resnet18": (2, 2, 2, 2),
    "resnet22": (2, 2, 3, 3),
    "resnet26": (3, 3, 3, 3),
}
"""Blocks per stage of each sub-model; every model is a prefix of ResNet26, stage by stage."""

# torch's kaiming_normal_(mode="fan_out", nonlinearity="relu"): a plain (untruncated)
# normal with variance 2 / (kh * kw * out_channels).
_KAIMING_FAN_OUT = hk.initializers.VarianceScaling(2.0, "fan_out", "normal")


def _conv(channels: int, kernel: int, stride: int, padding: int, name: str,
          fast: bool) -> Conv2D:
    # No bias anywhere: every convolution is followed by a BN with an offset.
    return Conv2D(channels, kernel_shape=kernel, stride=stride,
                  padding=((padding, padding), (padding, padding)),
                  w_init=_KAIMING_FAN_OUT, fast=fast, name=name)


def _max_pool_3x3_s2(x: jnp.ndarray) -> jnp.ndarray:
    """`nn.MaxPool2d(3, stride=2, padding=1)`: the padding is -inf, so it never wins."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))


class BasicBlock(hk.Module):
    """torchvision's BasicBlock; a projection shortcut where the shape changes.

    The projection is named `downsample_conv` / `downsample_bn` (torch's `downsample.0`
    and `downsample.1`) so that InCo's ownership rules, which read module names, can tell
    it apart from the block's own convolutions. Submodules are made in `__init__`, which
    gives them haiku's `layer{s}_{b}/~/conv1` names, the form the InCo rules use.
    """

    def __init__(self, in_channels: int, channels: int, stride: int, name: str,
                 fast_conv: bool = True):
        super().__init__(name=name)
        self.conv1 = _conv(channels, 3, stride, 1, "conv1", fast_conv)
        self.bn1 = TorchBatchNorm(name="bn1")
        self.conv2 = _conv(channels, 3, 1, 1, "conv2", fast_conv)
        self.bn2 = TorchBatchNorm(name="bn2")
        self.downsample = None
        if stride != 1 or in_channels != channels:  # torchvision's rule
            self.downsample = (_conv(channels, 1, stride, 0, "downsample_conv", fast_conv),
                               TorchBatchNorm(name="downsample_bn"))

    def __call__(self, x: jnp.ndarray, is_training: bool) -> jnp.ndarray:
        shortcut = x
        if self.downsample is not None:
            conv, bn = self.downsample
            shortcut = bn(conv(x), is_training)
        h = jax.nn.relu(self.bn1(self.conv1(x), is_training))
        h = self.bn2(self.conv2(h), is_training)
        return jax.nn.relu(h + shortcut)


def _check_layout(blocks_per_stage: Sequence[int], widths: Sequence[int]) -> None:
    if len(blocks_per_stage) != 4 or min(blocks_per_stage) < 1:
        raise ValueError(f"blocks_per_stage needs 4 positive ints, got {tuple(blocks_per_stage)}")
    if len(widths) != 4:
        raise ValueError(f"widths needs 4 ints (one per stage), got {tuple(widths)}")


def resnet_features(x: jnp.ndarray, is_training: bool, blocks_per_stage: Sequence[int],
                    widths: Sequence[int] = WIDTHS, fast_conv: bool = True) -> jnp.ndarray:
    """Stem and the four stages, without pooling: (B, H, W, C_in) -> (B, h, w, widths[-1]).

    Separate from the classifier so the spatial sizes (32 -> 16 -> 8 -> 8/4/2/1) can be
    checked. Must run inside a haiku transform.
    """
    _check_layout(blocks_per_stage, widths)
    h = _conv(widths[0], 7, 2, 3, "conv1", fast_conv)(x)
    h = jax.nn.relu(TorchBatchNorm(name="bn1")(h, is_training))
    h = _max_pool_3x3_s2(h)
    for s, (channels, blocks) in enumerate(zip(widths, blocks_per_stage, strict=True), 1):
        for b in range(blocks):
            stride = 2 if (s > 1 and b == 0) else 1
            block = BasicBlock(h.shape[-1], channels, stride, name=f"layer{s}_{b}",
                               fast_conv=fast_conv)
            h = block(h, is_training)
    return h


def stage_resnet(num_classes: int, blocks_per_stage: Sequence[int],
                 widths: Sequence[int] = WIDTHS, fast_conv: bool = True) -> ForwardFn:
    """Builds the forward function of a stage-split ResNet, for `hk.transform_with_state`.

    `fast_conv`: convolutions as patch products where XLA:CPU's are slow (models.conv2d;
    the same numbers to float rounding); False is XLA's convolution and gradient.

    Input channels are taken from the input (3, or 1 for Fashion-MNIST). The embedding is
    the pooled feature vector (widths[-1] dims) that MOON compares across models.
    """
    layout = tuple(int(n) for n in blocks_per_stage)
    widths = tuple(int(w) for w in widths)
    _check_layout(layout, widths)
    bound = 1.0 / math.sqrt(widths[-1])  # torch's nn.Linear default, weight and bias
    fc_init = hk.initializers.RandomUniform(-bound, bound)

    def forward(x: jnp.ndarray, is_training: bool, probe: jnp.ndarray | None = None
                ) -> ModelOutput:
        del probe  # only DEQ models use it; accepted so every model shares one call
        h = resnet_features(x, is_training, layout, widths, fast_conv)
        embedding = jnp.mean(h, axis=(1, 2))
        logits = hk.Linear(num_classes, w_init=fc_init, b_init=fc_init, name="fc")(embedding)
        return ModelOutput(logits, embedding, SolverStats.zeros())

    return forward


def inco_pairs(blocks_per_stage: Sequence[int]) -> list[tuple[str, str]]:
    """(target module, source module) pairs of InCo's ResNet rule (spec 5.2), leaf `w`.

    Targets are both convolutions of every block b >= 1 in the model; the source of stage
    s is always `layer{s}_0/~/conv2`, whose kernel has the targets' shape (C, C) in every
    stage, stage 1 included.
    """
    pairs = []
    for s, blocks in enumerate(blocks_per_stage, 1):
        source = f"layer{s}_0/~/conv2"
        for b in range(1, blocks):
            pairs += [(f"layer{s}_{b}/~/conv1", source), (f"layer{s}_{b}/~/conv2", source)]
    return pairs
