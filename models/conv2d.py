"""A drop-in for `hk.Conv2D` (no bias, no groups) that XLA:CPU runs at matmul speed.

Why: XLA:CPU's convolution is fast on large feature maps but falls off a cliff on the
tiny ones of ImageNet-stem ResNets fed 32x32 images (InCo's stage-split ResNets end in
2x2 and 1x1 maps): a 3x3 convolution of 256 channels on a 2x2 map runs at ~5 GFLOP/s
against ~100 for a matrix product of the same size, and the gradient of every strided
or small convolution is 2-15x slower again. Both are the same sum of products as a
patch matrix times the reshaped kernel ("im2col"), and XLA runs that product (and its
gradient, two more products) at full speed. Taps that see only padding for every output
position (8 of 9 on a 1x1 map) are dropped: they add exact zeros.

The rule, measured on a 2-core CPU (docs/PERFORMANCE.md): the backward pass always goes
through the patch product; the forward pass too where the output map has at most 4
positions, or at most 16 with a stride, and through XLA's convolution otherwise. On
other backends (GPU, TPU) XLA's convolutions are fast and used unchanged. The parameter
is haiku's `w` (HWIO) made by the same `hk.get_parameter` call, so initial values and
checkpoints are those of `hk.Conv2D`.
"""

from collections.abc import Sequence

import haiku as hk
import jax
import jax.numpy as jnp
from jax import lax

Padding = str | Sequence[tuple[int, int]]
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def xla_conv(x: jnp.ndarray, w: jnp.ndarray, stride: int,
             padding: tuple[tuple[int, int], tuple[int, int]]) -> jnp.ndarray:
    """XLA's own convolution (NHWC input, HWIO kernel) with explicit paddings."""
    return lax.conv_general_dilated(x, w, (stride, stride), padding,
                                    dimension_numbers=_DIMENSIONS)


def _live_taps(size: int, out: int, kernel: int, stride: int, low: int) -> list[int]:
    """Kernel offsets along one axis that read a real (unpadded) row for some output."""
    return [i for i in range(kernel)
            if any(0 <= o * stride + i - low < size for o in range(out))]


def output_size(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - kernel) // stride + 1


def patch_conv(x: jnp.ndarray, w: jnp.ndarray, stride: int,
               padding: tuple[tuple[int, int], tuple[int, int]]) -> jnp.ndarray:
    """The same convolution as one matrix product of (live) patches and kernel rows."""
    (kh, kw), (_, height, width, _) = w.shape[:2], x.shape
    out_h = output_size(height, kh, stride, padding[0])
    out_w = output_size(width, kw, stride, padding[1])
    rows = _live_taps(height, out_h, kh, stride, padding[0][0])
    cols = _live_taps(width, out_w, kw, stride, padding[1][0])
    padded = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    span_h, span_w = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
    patches = jnp.concatenate([padded[:, i:i + span_h:stride, j:j + span_w:stride, :]
                               for i in rows for j in cols], axis=-1)
    kernel = jnp.concatenate([w[i, j] for i in rows for j in cols], axis=0)
    return jnp.einsum("bhwk,kd->bhwd", patches, kernel)


def _patch_backward_conv(stride: int, padding):
    """XLA's forward convolution with the patch product's gradient."""

    @jax.custom_vjp
    def conv(x, w):
        return xla_conv(x, w, stride, padding)

    def forward(x, w):
        return xla_conv(x, w, stride, padding), (x, w)

    def backward(residuals, g):
        # The patch product's own primal is unused here, and XLA drops it.
        _, vjp = jax.vjp(lambda a, b: patch_conv(a, b, stride, padding), *residuals)
        return vjp(g)

    conv.defvjp(forward, backward)
    return conv


def explicit_padding(x: jnp.ndarray, w: jnp.ndarray, stride: int,
                     padding: Padding) -> tuple[tuple[int, int], ...]:
    """(low, high) per spatial axis; "SAME"/"VALID" as lax (and hk.Conv2D) read them."""
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(x.shape[1:3], w.shape[:2], (stride, stride), padding)
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv2d(x: jnp.ndarray, w: jnp.ndarray, stride: int = 1, padding: Padding = "SAME",
           fast: bool = True) -> jnp.ndarray:
    """A bias-free 2-D convolution; `fast` picks the faster of the two exact forms on a
    CPU (module docstring), `fast=False` is XLA's convolution with XLA's gradient."""
    pads = explicit_padding(x, w, stride, padding)
    if not fast or jax.default_backend() != "cpu":
        return xla_conv(x, w, stride, pads)
    positions = (output_size(x.shape[1], w.shape[0], stride, pads[0])
                 * output_size(x.shape[2], w.shape[1], stride, pads[1]))
    if positions <= 4 or (stride > 1 and positions <= 16):
        return patch_conv(x, w, stride, pads)
    return _patch_backward_conv(stride, pads)(x, w)


class Conv2D(hk.Module):
    """`hk.Conv2D(channels, kernel, stride, padding, with_bias=False, w_init)` with the
    same parameter, computed by `conv2d`."""

    def __init__(self, output_channels: int, kernel_shape: int, stride: int = 1,
                 padding: Padding = "SAME", w_init: hk.initializers.Initializer | None = None,
                 fast: bool = True, name: str | None = None):
        super().__init__(name=name)
        self.output_channels = output_channels
        self.kernel_shape = kernel_shape
        self.stride = stride
        self.padding = padding
        self.w_init = w_init
        self.fast = fast

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        k = self.kernel_shape
        shape = (k, k, x.shape[-1], self.output_channels)
        w_init = self.w_init
        if w_init is None:  # hk.Conv2D's default: truncated normal, stddev 1/sqrt(fan_in)
            w_init = hk.initializers.TruncatedNormal(1.0 / (k * k * x.shape[-1]) ** 0.5)
        w = hk.get_parameter("w", shape, x.dtype, init=w_init)
        return conv2d(x, w, self.stride, self.padding, self.fast)
