"""A 3x3 convolution whose gradient is itself a forward convolution.

Why: XLA:CPU runs the gradient of a convolution (a convolution with a dilated or
transposed operand) about 35x slower inside a loop than outside it (jax issue 12868), and
every iterative backward solver of a DEQ evaluates such gradients in a loop. For a
stride-1 SAME 3x3 convolution the input gradient is exactly a forward convolution of the
cotangent with the spatially flipped kernel whose in/out channels are swapped, which XLA
runs at full speed anywhere. The backward rule calls `conv3x3` again, so second-order
products (the Jacobian-vector products that normal-equation CG needs, taken as the vjp of
a vjp) stay forward convolutions too.
"""

import haiku as hk
import jax
import jax.numpy as jnp
from jax import lax

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def plain_conv3x3(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """The same convolution with XLA's own gradient (the reference's behaviour)."""
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DIMENSIONS)


def adjoint_kernel(w: jnp.ndarray) -> jnp.ndarray:
    """The kernel whose forward convolution is the input-gradient of `w`'s convolution."""
    return jnp.swapaxes(jnp.flip(w, (0, 1)), 2, 3)


@jax.custom_vjp
def conv3x3(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """Stride-1 SAME 3x3 convolution, NHWC input, HWIO kernel, no bias."""
    return plain_conv3x3(x, w)


def _conv3x3_fwd(x, w):
    return plain_conv3x3(x, w), (x, w)


def _conv3x3_bwd(residuals, g):
    x, w = residuals
    dx = conv3x3(g, adjoint_kernel(w))
    _, weight_vjp = jax.vjp(lambda k: plain_conv3x3(x, k), w)
    (dw,) = weight_vjp(g)
    return dx, dw


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


class Conv3x3(hk.Module):
    """Haiku wrapper with the parameter layout of `hk.Conv2D(kernel_shape=3, with_bias=False)`."""

    def __init__(self, output_channels: int, w_init: hk.initializers.Initializer,
                 fast: bool = True, name: str | None = None):
        super().__init__(name=name)
        self.output_channels = output_channels
        self.w_init = w_init
        self.fast = fast

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        w = hk.get_parameter("w", (3, 3, x.shape[-1], self.output_channels), x.dtype,
                             init=self.w_init)
        return (conv3x3 if self.fast else plain_conv3x3)(x, w)
