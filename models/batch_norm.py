"""BatchNorm whose training-mode statistics can skip padded examples.

The reference logs a loss computed in training mode over each client's whole set at
once (spec 2.3): BatchNorm then normalises with that set's own statistics. Here client
sets are padded to a common length, so the padding would enter those statistics. Inside
`batch_statistics_over(mask)` every BatchNorm of the models takes its batch mean and
variance over the examples with mask 1 only. Outside it (every training step) it is
haiku's BatchNorm, unchanged.

The mask travels in a context variable rather than through every model's signature
because it is read while haiku traces the forward function, where each BN sits several
modules deep (ResNet blocks).
"""

import contextlib
import contextvars
from collections.abc import Iterator

import haiku as hk
import jax
import jax.numpy as jnp

_EXAMPLE_MASK: contextvars.ContextVar = contextvars.ContextVar("example_mask", default=None)


@contextlib.contextmanager
def batch_statistics_over(mask: jnp.ndarray) -> Iterator[None]:
    """Training-mode BatchNorm statistics over the examples where `mask` (batch,) is 1."""
    token = _EXAMPLE_MASK.set(mask)
    try:
        yield
    finally:
        _EXAMPLE_MASK.reset(token)


class BatchNorm(hk.BatchNorm):
    """haiku's BatchNorm (same parameters and state), with masked batch statistics."""

    def __call__(self, inputs: jnp.ndarray, is_training: bool, test_local_stats: bool = False,
                 scale: jnp.ndarray | None = None, offset: jnp.ndarray | None = None
                 ) -> jnp.ndarray:
        mask = _EXAMPLE_MASK.get()
        if mask is None or not is_training:
            return super().__call__(inputs, is_training, test_local_stats, scale, offset)
        axis = tuple(range(inputs.ndim - 1))
        weight = mask.astype(inputs.dtype).reshape((-1,) + (1,) * (inputs.ndim - 1))
        count = jnp.maximum(jnp.sum(weight), 1.0) * (inputs[0].size // inputs.shape[-1])
        mean = jnp.sum(inputs * weight, axis, keepdims=True) / count
        mean_of_squares = jnp.sum(jnp.square(inputs) * weight, axis, keepdims=True) / count
        var = mean_of_squares - jnp.square(mean)
        self.mean_ema(mean)
        self.var_ema(var)
        shape = (1,) * (inputs.ndim - 1) + (inputs.shape[-1],)
        scale = hk.get_parameter("scale", shape, inputs.dtype, self.scale_init)
        offset = hk.get_parameter("offset", shape, inputs.dtype, self.offset_init)
        inv = scale * jax.lax.rsqrt(var + jax.lax.convert_element_type(self.eps, var.dtype))
        return (inputs - mean) * inv + offset
