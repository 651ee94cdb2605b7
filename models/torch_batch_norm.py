"""BatchNorm with PyTorch's semantics, for the InCo client models (spec 1.1).

InCo's ResNets are torchvision models, and `hk.BatchNorm` differs from `nn.BatchNorm2d`
in ways that change results: haiku zero-debiases its moving averages, tracks the biased
batch variance and keeps no batch counter. Here the state is exactly PyTorch's buffers,
so a state tree can be compared key by key with a `state_dict()`:

- `mean` (init 0) and `var` (init 1): the running statistics, updated in training as
  `m <- (1 - momentum) m + momentum * batch_stat` with no debiasing; `var` takes the
  *unbiased* batch variance, while the forward pass normalises with the biased one;
- `count` (int32): `num_batches_tracked`, incremented once per training call.

Evaluation normalises with the running statistics. Inside
`models.batch_norm.batch_statistics_over(mask)` training-mode statistics are taken over
the masked examples only, so the engine's whole-set reference loss (padded client sets)
sees the same statistics as an unpadded batch.
"""

import haiku as hk
import jax
import jax.numpy as jnp

# The mask set by `batch_statistics_over`; read directly so that both BatchNorms obey
# the one context manager the engine enters.
from models.batch_norm import _EXAMPLE_MASK

MOMENTUM = 0.1
EPS = 1e-5


def _batch_moments(x: jnp.ndarray, mask: jnp.ndarray | None
                   ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Per-channel (mean, biased variance, element count) over all axes but the last.

    With a mask (batch,), examples with mask 0 carry no weight. Two passes (mean first,
    then squared deviations) keep the variance accurate when the mean is large.
    """
    axes = tuple(range(x.ndim - 1))
    per_example = x[0].size // x.shape[-1]  # spatial positions per example and channel
    if mask is None:
        weight = jnp.ones((x.shape[0],), x.dtype)
    else:
        weight = mask.astype(x.dtype)
    weight = weight.reshape((-1,) + (1,) * (x.ndim - 1))
    n = jnp.sum(weight) * per_example
    safe_n = jnp.maximum(n, 1.0)
    mean = jnp.sum(x * weight, axes) / safe_n
    var = jnp.sum(jnp.square(x - mean) * weight, axes) / safe_n
    return mean, var, n


class TorchBatchNorm(hk.Module):
    """`nn.BatchNorm2d` / `nn.BatchNorm1d` (affine, tracked stats) over the last axis.

    Parameters `scale` (init 1) and `offset` (init 0) and the state entries `mean`,
    `var`, `count` all have shape (channels,) or () like PyTorch's, so parameter and
    buffer counts match the reference one for one.
    """

    def __init__(self, momentum: float = MOMENTUM, eps: float = EPS, name: str | None = None):
        super().__init__(name=name)
        self.momentum = momentum
        self.eps = eps

    def __call__(self, x: jnp.ndarray, is_training: bool) -> jnp.ndarray:
        channels = x.shape[-1]
        scale = hk.get_parameter("scale", (channels,), x.dtype, init=jnp.ones)
        offset = hk.get_parameter("offset", (channels,), x.dtype, init=jnp.zeros)
        running_mean = hk.get_state("mean", (channels,), x.dtype, init=jnp.zeros)
        running_var = hk.get_state("var", (channels,), x.dtype, init=jnp.ones)
        count = hk.get_state("count", (), jnp.int32, init=jnp.zeros)
        if is_training:
            mean, var, n = _batch_moments(x, _EXAMPLE_MASK.get())
            # PyTorch stores var * n / (n - 1). With a single value per channel it would
            # divide by zero (PyTorch refuses such a batch); the guard keeps state finite.
            unbiased = var * n / jnp.maximum(n - 1.0, 1.0)
            m = self.momentum
            hk.set_state("mean", (1.0 - m) * running_mean + m * mean)
            hk.set_state("var", (1.0 - m) * running_var + m * unbiased)
            hk.set_state("count", count + 1)
        else:
            mean, var = running_mean, running_var
        inv = scale * jax.lax.rsqrt(var + jnp.asarray(self.eps, var.dtype))
        return (x - mean) * inv + offset
