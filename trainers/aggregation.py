"""The server's average, over the clients that own each entry.

One function serves FedAvg, FeDEQ's consensus step and HeteroAvg: clients may train
sub-models (whole blocks, channel subsets) of the server's model, and then send, with
their update, an ownership mask per leaf (1 where they own the entry; any shape that
broadcasts to the leaf: a scalar for a whole tensor, a vector over channels). The server
forms  sum_c w_c m_c d_c / sum_c w_c m_c  entrywise; an entry no sampled client owns
gets 0, so adding the result leaves it unchanged. With every mask at one this is the
plain weighted mean (tested), which is why homogeneous algorithms need no other path.
"""

from typing import Any

import jax
import jax.numpy as jnp

from utils.pytree import weighted_mean

PyTree = Any
OWNED = "owned"  # the key of an upload dict that holds its ownership masks


def split_owned(uploads: dict) -> tuple[dict, PyTree | None]:
    """(the update proper, its masks or None)."""
    if isinstance(uploads, dict) and OWNED in uploads:
        rest = {k: v for k, v in uploads.items() if k != OWNED}
        return rest, uploads[OWNED]
    return uploads, None


def _client_axis(mask: jnp.ndarray, leaf: jnp.ndarray) -> jnp.ndarray:
    """A stacked mask (clients, *m) reshaped to broadcast against a stacked leaf."""
    extra = leaf.ndim - mask.ndim
    return mask.reshape(mask.shape[:1] + (1,) * extra + mask.shape[1:]) if extra > 0 else mask


def owner_mean(stacked: PyTree, weights: jnp.ndarray, masks: PyTree | None = None,
               integers: str = "round") -> PyTree:
    """Weighted mean over the leading (clients) axis, per entry over its owners.

    `masks`: the same tree structure as `stacked`, each leaf (clients, ...) broadcasting
    to the leaf's per-client shape, aligned on the trailing axes; None: everyone owns
    everything (exactly `weighted_mean`). Integer leaves (BatchNorm counters) keep their
    dtype: "round" to the nearest (as the FeDEQ code paths always have), "trunc" toward
    zero (InCo's code truncates its averaged num_batches_tracked).
    """
    if masks is None:
        return weighted_mean(stacked, weights)

    def mean(leaf, mask):
        m = _client_axis(mask.astype(jnp.float32), leaf)
        w = weights.astype(jnp.float32).reshape((-1,) + (1,) * (m.ndim - 1)) * m
        total = jnp.sum(w, axis=0)
        value = jnp.sum(w * leaf.astype(jnp.float32), axis=0) / jnp.where(total > 0, total, 1)
        value = jnp.where(total > 0, value, 0.0)
        value = jnp.broadcast_to(value, leaf.shape[1:])
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return value.astype(leaf.dtype)
        rounded = jnp.trunc(value) if integers == "trunc" else jnp.round(value)
        return rounded.astype(leaf.dtype)

    return jax.tree.map(mean, stacked, masks)


def owner_count(masks: PyTree | None, num: int) -> PyTree | int:
    """Per entry, how many of the stacked clients own it (`num` when masks is None)."""
    if masks is None:
        return num
    return jax.tree.map(lambda m: jnp.sum(m.astype(jnp.float32), axis=0), masks)
