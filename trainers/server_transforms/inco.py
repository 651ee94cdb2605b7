"""InCo Aggregation's server rule (ICLR 2024, "Internal Cross-layer Gradients"), spec 5.2-5.6.

After HeteroAvg (spec 5.1) the server replaces the averaged update g_k of each deep target
layer by a mix of g_k and the update g_0 of a shallow source layer of the same shape, so
that deep layers of sub-models that few clients train borrow the direction of layers that
every client trains. Both g's are slices of the *pre-InCo* averaged update, so the targets
do not depend on the order of `pairs` (a module may even be a target and a source).

Per slice (one 3x3 kernel per (in, out) pair for HWIO conv weights, or the whole vector for
the ViT LayerNorm scale), with n = ||g||_F, alpha = <g_0, g_0>, beta = <g_0, g_k>:

- ``mode="code"`` (released code, the default):
  ``lam = min(|beta| / (alpha + eps), clamp_max)``,
  ``clip((g_k/(n_k+eps) + lam * g_0/(n_0+eps)) * (n_k+n_0)/2, -clip, clip)``.
- ``mode="paper"`` (Algorithm 1, App. H.1): ``theta = beta / (alpha + eps)``, signed,
  ``(g_k/(n_k+eps) - theta * g_0/(n_0+eps)) * (n_k+n_0)/2``; no cap, no clip.
- ``mode="none"``: identity (plain HeteroAvg).

How they relate (spec 5.6): Theorem 3.1 projects the *un-normalised* g_k onto the half-space
<g, g_0> >= 0: it leaves g_k alone when beta >= 0 and adds |beta|/alpha * g_0 when beta < 0.
Algorithm 1 applies that coefficient to the *normalised* vectors and subtracts theta = beta/alpha
whatever the sign of beta. The code always adds lam >= 0, so it agrees with Algorithm 1 only
when beta < 0, |beta|/alpha <= clamp_max and the clip is not hit, and with Theorem 3.1 never.
Theorem 3.1 itself is not implemented. eps enters both modes (the paper has none) so that a
zero slice maps to zero instead of NaN; with eps=1e-7 it is negligible otherwise.

A zero target stays exactly zero in both modes (n_k = beta = 0 makes every term vanish), and
`present` additionally keeps targets that no sampled client owns bit-for-bit unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import jax.numpy as jnp

MODES = ("code", "paper", "none")


@dataclass(frozen=True)
class InCoConfig:
    """Knobs of the InCo rule; defaults are the released code's (spec 5.2).

    clamp_max caps the code's coefficient on g_0 (`--clamp_max`); clip is the hard-coded
    elementwise bound of the code's mixed tensor (0 or None disables it); eps guards both
    norm denominators and alpha. The paper mode ignores clamp_max and clip."""

    mode: str = "code"
    clamp_max: float = 5.0
    clip: float | None = 0.1
    eps: float = 1e-7

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"InCo mode must be one of {MODES}, got {self.mode!r}")


def _slice_sum(x: jnp.ndarray, axes: tuple[int, ...] | None) -> jnp.ndarray:
    """Sum over one slice, kept broadcastable against the full tensor."""
    return jnp.sum(x, axis=axes, keepdims=True)


def mix_slices(g_k: jnp.ndarray, g_0: jnp.ndarray, slice_axes: tuple[int, ...] | None,
               cfg: InCoConfig) -> jnp.ndarray:
    """The rule for one target tensor, applied independently to every slice over
    `slice_axes` (None: the whole tensor is one slice). Returns g_k's dtype."""
    if cfg.mode == "none":
        return g_k
    dtype = g_k.dtype
    g_k = g_k.astype(jnp.result_type(g_k.dtype, g_0.dtype))
    g_0 = g_0.astype(g_k.dtype)
    n_k = jnp.sqrt(_slice_sum(g_k * g_k, slice_axes))
    n_0 = jnp.sqrt(_slice_sum(g_0 * g_0, slice_axes))
    alpha = _slice_sum(g_0 * g_0, slice_axes)
    beta = _slice_sum(g_0 * g_k, slice_axes)
    hat_k = g_k / (n_k + cfg.eps)
    hat_0 = g_0 / (n_0 + cfg.eps)
    scale = (n_k + n_0) / 2
    if cfg.mode == "paper":
        theta = beta / (alpha + cfg.eps)
        return ((hat_k - theta * hat_0) * scale).astype(dtype)
    lam = jnp.abs(beta) / (alpha + cfg.eps)
    if cfg.clamp_max is not None:
        lam = jnp.minimum(lam, cfg.clamp_max)
    mixed = (hat_k + lam * hat_0) * scale
    if cfg.clip:
        mixed = jnp.clip(mixed, -cfg.clip, cfg.clip)
    return mixed.astype(dtype)


def _is_present(present: Mapping | None, module: str, leaf: str):
    """The `present` flag of a module as a bool array; None when unknown (treated as present).
    Accepts `{module: flag}` or `{module: {leaf: flag}}`."""
    if present is None or module not in present:
        return None
    flag = present[module]
    if isinstance(flag, Mapping):
        if leaf not in flag:
            return None
        flag = flag[leaf]
    return jnp.asarray(flag) != 0


def inco_mix(update: dict, pairs: Sequence[tuple[str, str]], leaf: str,
             slice_axes: tuple[int, ...] | None, cfg: InCoConfig,
             present: dict | None = None) -> dict:
    """Apply the InCo rule to `update[target][leaf]` for every (target, source) pair.

    `update` is a Haiku-style `{module: {leaf: array}}` tree of averaged updates. Every
    target reads its own and its source's *pre-mix* values. A pair is skipped when either
    module or its `leaf` is missing from `update`. With `present` (a flag per module, or per
    module and leaf), a target whose flag is false, or whose source's flag is false (the rule
    needs a fresh g_0), keeps its update unchanged; modules absent from `present` count as
    present. Returns a new outer dict (and new inner dicts for changed modules); every other
    leaf is the same object. Pure jnp on values, so it jits with `pairs`, `leaf`,
    `slice_axes` and `cfg` static and `update`, `present` traced.
    """
    targets = [t for t, _ in pairs]
    if len(set(targets)) != len(targets):
        raise ValueError(f"InCo target listed more than once in {list(pairs)}")
    if cfg.mode == "none":
        return dict(update)
    out = dict(update)
    for target, source in pairs:
        if leaf not in update.get(target, {}) or leaf not in update.get(source, {}):
            continue
        g_k, g_0 = update[target][leaf], update[source][leaf]
        if jnp.shape(g_k) != jnp.shape(g_0):
            raise ValueError(f"InCo pair ({target}, {source}) has shapes "
                             f"{jnp.shape(g_k)} and {jnp.shape(g_0)}")
        mixed = mix_slices(jnp.asarray(g_k), jnp.asarray(g_0), slice_axes, cfg)
        for module in (target, source):
            flag = _is_present(present, module, leaf)
            if flag is not None:
                mixed = jnp.where(flag, mixed, g_k)
        out[target] = {**update[target], leaf: mixed}
    return out
