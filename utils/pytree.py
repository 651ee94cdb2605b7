"""Pytree arithmetic and the head/shared split, shared by every algorithm."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.base import HEAD_MARKER

PyTree = Any


def split_head(params: dict) -> tuple[dict, dict]:
    """(shared, head): head = modules whose name contains the head marker (`player`)."""
    shared = {k: v for k, v in params.items() if HEAD_MARKER not in k}
    head = {k: v for k, v in params.items() if HEAD_MARKER in k}
    return shared, head


def merge(*parts: dict) -> dict:
    out: dict = {}
    for part in parts:
        out.update(part)
    return out


def tree_add(a: PyTree, b: PyTree, scale: float | jnp.ndarray = 1.0) -> PyTree:
    return jax.tree.map(lambda x, y: x + scale * y, a, b)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: x - y, a, b)


def tree_vdot(a: PyTree, b: PyTree) -> jnp.ndarray:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                               strict=True))


def tree_sq_norm(a: PyTree) -> jnp.ndarray:
    return tree_vdot(a, a)


def tree_zeros_like(a: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, a)


def tree_where(pred: jnp.ndarray, a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def weighted_mean(stacked: PyTree, weights: jnp.ndarray) -> PyTree:
    """Mean over the leading (clients) axis with weights renormalised over those clients.

    Integer leaves (BatchNorm EMA counters) keep their dtype: the reference averages them
    into floats, which changes nothing but forces its jitted steps to retrace.
    """
    w = weights / jnp.sum(weights)

    def avg(x):
        out = jnp.tensordot(w, x.astype(jnp.float32), axes=1)
        return out.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else \
            jnp.round(out).astype(x.dtype)

    return jax.tree.map(avg, stacked)


def stack(trees: list[PyTree]) -> PyTree:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def index(tree: PyTree, i) -> PyTree:
    return jax.tree.map(lambda x: x[i], tree)


def broadcast(tree: PyTree, n: int) -> PyTree:
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree)


def tree_size(tree: PyTree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def tree_bytes(tree: PyTree) -> int:
    """Bytes of every leaf as it would be sent (shape x dtype size)."""
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def cast_floats(tree: PyTree, dtype: Any) -> PyTree:
    """Floating leaves to `dtype`; integer leaves (counters) travel unchanged."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def all_finite(tree: PyTree) -> jnp.ndarray:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)
