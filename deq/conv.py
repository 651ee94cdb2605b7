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

