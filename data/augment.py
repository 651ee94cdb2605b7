"""InCo's training augmentations (spec 3.2) on batches of normalised images, on the device.

InCo augments every training image on the CPU with torchvision; here a whole batch is
augmented inside the jitted step from a JAX key, so the augmentation is reproducible and
costs no host time. Images arrive normalised (``data.inco``), which changes nothing for
the crop and the flip, as they only move pixels, provided the crop's zero padding of the
raw image is written as its normalised value ``(0 - mean) / std``; Cutout is applied after
normalisation in the original anyway, so its zeros are zeros here too.

* ``cifar``: RandomCrop(32, padding 4) -> horizontal flip (p = 0.5) -> Cutout(16).
* ``svhn``: Cutout(16) only.
* ``cinic``: crop -> flip, no Cutout.
* ``none``: the identity (FMNIST).

Cutout(16) draws a centre (y, x) uniformly over the integer pixels and zeroes rows
``[max(y - 8, 0), min(y + 8, H))`` and the same columns around x, on all channels.
All shapes are fixed and every example is handled at once (no loop over the batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

Augmentation = Callable[[jax.Array, jax.Array], jax.Array]

AUGMENTATIONS: tuple[str, ...] = ("none", "cifar", "svhn", "cinic")
# name -> (crop and flip, cutout)
_STEPS = {"none": (False, False), "cifar": (True, True), "svhn": (False, True),
          "cinic": (True, False)}

CROP_PADDING = 4
CUTOUT_SIZE = 16


def random_crop(key: jax.Array, x: jax.Array, pad_value: jax.Array,
                padding: int = CROP_PADDING) -> jax.Array:
    """RandomCrop(H x W, padding): pad each image with ``pad_value`` (per channel) and cut
    an H x W window at offsets drawn uniformly from [0, 2 * padding] on each axis."""
    b, h, w, c = x.shape
    padded = jnp.broadcast_to(pad_value.astype(x.dtype), (b, h + 2 * padding,
                                                          w + 2 * padding, c))
    padded = padded.at[:, padding:padding + h, padding:padding + w, :].set(x)
    k_row, k_col = jax.random.split(key)
    rows = jax.random.randint(k_row, (b,), 0, 2 * padding + 1)
    cols = jax.random.randint(k_col, (b,), 0, 2 * padding + 1)

    def crop(img: jax.Array, r: jax.Array, q: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(img, (r, q, 0), (h, w, c))

    return jax.vmap(crop)(padded, rows, cols)


def random_flip(key: jax.Array, x: jax.Array) -> jax.Array:
    """Mirror each image left-right with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (x.shape[0],))
    return jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)


def cutout(key: jax.Array, x: jax.Array, size: int = CUTOUT_SIZE) -> jax.Array:
    """Zero a ``size`` x ``size`` square (clipped at the borders) around a random pixel."""
    b, h, w, _ = x.shape
    k_row, k_col = jax.random.split(key)
    cy = jax.random.randint(k_row, (b, 1), 0, h)
    cx = jax.random.randint(k_col, (b, 1), 0, w)
    half = size // 2
    rows, cols = jnp.arange(h)[None, :], jnp.arange(w)[None, :]
    in_rows = (rows >= cy - half) & (rows < cy + half)  # (b, h)
    in_cols = (cols >= cx - half) & (cols < cx + half)  # (b, w)
    hole = in_rows[:, :, None] & in_cols[:, None, :]
    return jnp.where(hole[..., None], jnp.zeros((), x.dtype), x)


def make_augmentation(name: str, mean: Sequence[float],
                      std: Sequence[float]) -> Augmentation:
    """``augment(key, x)`` for a batch ``x`` (B, H, W, C) normalised with ``mean``/``std``.

    The result is deterministic given ``key``, keeps shape and dtype, and can be jitted.
    """
    if name not in _STEPS:
        raise ValueError(f"unknown augmentation {name!r}; choose one of {', '.join(AUGMENTATIONS)}")
    if len(mean) != len(std) or any(s == 0 for s in std):
        raise ValueError(f"mean and std need one nonzero std per channel; got {mean}, {std}")
    crop_flip, with_cutout = _STEPS[name]
    pad_value = -jnp.asarray(mean, jnp.float32) / jnp.asarray(std, jnp.float32)

    def augment(key: jax.Array, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != len(mean):
            raise ValueError(f"expected a (B, H, W, {len(mean)}) batch; got shape {x.shape}")
        k_crop, k_flip, k_cut = jax.random.split(key, 3)
        if crop_flip:
            x = random_flip(k_flip, random_crop(k_crop, x, pad_value))
        if with_cutout:
            x = cutout(k_cut, x)
        return x

    return augment
