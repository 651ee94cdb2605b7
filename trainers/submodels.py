"""Sub-models as views of the server's model: cut, paste and ownership masks.

A tier's model keeps a subset of the server model's Haiku modules (InCo's stage and
layer splitting: whole blocks), with the same names and shapes, so a client's model is
the server's pytree with some modules left out. Every tree the algorithms exchange
(parameters, BatchNorm state, SCAFFOLD's variates, MOON's previous model, uploads) is a
nesting of plain dicts whose innermost level maps module names to leaves; `cut` and
`paste` act on every such level at once, so no algorithm needs to know it runs on a
sub-model. Cut then paste is the identity on owned entries (tested).

`ChannelView` adds channel subsets (DAC's searched MobileNets, HeteroFL's width
multipliers): a tier's leaf is the server's leaf at given channel indices along given
axes, and its mask is the outer product of those channels' indicators, which
`trainers.aggregation.owner_mean` broadcasts like any other mask.
"""

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


class ModuleView:
    """The modules one tier owns, within the modules the server model has."""

    def __init__(self, owned: Iterable[str], universe: Iterable[str]):
        self.universe = frozenset(universe)
        self.owned = frozenset(owned)
        missing = self.owned - self.universe
        if missing:
            raise ValueError(f"sub-model modules not in the server model: {sorted(missing)}")

    def _is_module_level(self, tree: Any) -> bool:
        return isinstance(tree, dict) and bool(tree) and set(tree) <= self.universe

    def cut(self, tree: PyTree) -> PyTree:
        """The tier's part of a server-shaped tree (stacked trees too: only keys move)."""
        if self._is_module_level(tree):
            return {k: v for k, v in tree.items() if k in self.owned}
        if isinstance(tree, dict):
            return {k: self.cut(v) for k, v in tree.items()}
        return tree

    def paste(self, full: PyTree, part: PyTree) -> PyTree:
        """`full` with the tier's entries replaced by `part`'s."""
        if self._is_module_level(full):
            return {k: part.get(k, v) if k in self.owned else v for k, v in full.items()}
        if isinstance(full, dict):
            return {k: self.paste(v, part[k]) if k in part else v for k, v in full.items()}
        return part

    def masks(self, full: PyTree) -> PyTree:
        """Per leaf of a server-shaped tree, 1.0 where the tier owns it (a scalar: whole
        modules are owned or not); leaves outside module levels (counts, scalars) 1.0."""
        def walk(tree, inside):
            if self._is_module_level(tree):
                return {k: jax.tree.map(lambda _, k=k: jnp.float32(k in self.owned), v)
                        for k, v in tree.items()}
            if isinstance(tree, dict):
                return {k: walk(v, inside) for k, v in tree.items()}
            return jnp.float32(1.0)
        return walk(full, False)


class ChannelView(ModuleView):
    """A ModuleView whose owned modules are also narrowed to channel subsets.

    `layout[module][leaf]` names the channel set of each axis of a leaf (None: not
    narrowed), aligned on the leaf's trailing axes so stacked trees (a leading clients
    axis) work too; `channels[set]` is the sorted server indices the tier keeps (a set
    not listed is kept whole). Cut then paste is the identity on owned entries (tested).
    """

    def __init__(self, owned: Iterable[str], universe: Iterable[str],
                 layout: dict[str, dict[str, tuple[str | None, ...]]],
                 channels: dict[str, np.ndarray]):
        super().__init__(owned, universe)
        self.layout = layout
        self.channels = {k: np.asarray(v, np.int32) for k, v in channels.items()}

    def _axes(self, module: str, leaf: str, value: Any) -> list[tuple[int, np.ndarray]]:
        sets = self.layout.get(module, {}).get(leaf, ())
        first = np.ndim(value) - len(sets)
        return [(first + a, self.channels[s]) for a, s in enumerate(sets)
                if s is not None and s in self.channels]

    def _map_module(self, fn, module: str, tree: Any, *others: Any) -> Any:
        return {leaf: fn(self._axes(module, leaf, v), v, *(o[leaf] for o in others))
                for leaf, v in tree.items()}

    def cut(self, tree: PyTree) -> PyTree:
        if self._is_module_level(tree):
            return {k: self._map_module(_take, k, v) for k, v in tree.items()
                    if k in self.owned}
        if isinstance(tree, dict):
            return {k: self.cut(v) for k, v in tree.items()}
        return tree

    def paste(self, full: PyTree, part: PyTree) -> PyTree:
        if self._is_module_level(full):
            return {k: self._map_module(_put, k, v, part[k]) if k in self.owned and k in part
                    else v for k, v in full.items()}
        if isinstance(full, dict):
            return {k: self.paste(v, part[k]) if k in part else v for k, v in full.items()}
        return part

    def masks(self, full: PyTree) -> PyTree:
        """Per leaf, 1.0 on the kept channels (0.0 for a module the tier lacks), shaped
        (size 1 except on the axes the layout names) alike for every tier, so the
        cohort's masks stack whichever tiers it holds."""
        def walk(tree):
            if self._is_module_level(tree):
                return {k: {leaf: self._mask(k, leaf, v) for leaf, v in leaves.items()}
                        for k, leaves in tree.items()}
            if isinstance(tree, dict):
                return {k: walk(v) for k, v in tree.items()}
            return jnp.float32(1.0)
        return walk(full)

    def _mask(self, module: str, leaf: str, value: Any) -> jnp.ndarray:
        sets = self.layout.get(module, {}).get(leaf, ())
        first = np.ndim(value) - len(sets)
        shape = [1] * np.ndim(value)
        for a, name in enumerate(sets):
            if name is not None:
                shape[first + a] = value.shape[first + a]
        if module not in self.owned:
            return jnp.zeros(shape, jnp.float32) if shape else jnp.float32(0.0)
        mask = np.ones(shape, np.float32)
        for axis, idx in self._axes(module, leaf, value):
            hot = np.zeros(shape[axis], np.float32)
            hot[idx] = 1.0
            mask = mask * hot.reshape([-1 if a == axis else 1 for a in range(len(shape))])
        return jnp.asarray(mask) if shape else jnp.float32(1.0)


def _take(axes: list[tuple[int, np.ndarray]], leaf: Any) -> Any:
    for axis, idx in axes:
        leaf = jnp.take(leaf, jnp.asarray(idx), axis=axis)
    return leaf


def _put(axes: list[tuple[int, np.ndarray]], leaf: Any, part: Any) -> Any:
    if not axes:
        return part
    grids = [np.arange(n) for n in leaf.shape]
    for axis, idx in axes:
        grids[axis] = idx
    return leaf.at[np.ix_(*grids)].set(part)


def module_names(*trees: dict) -> set[str]:
    """The module names of Haiku params/state trees."""
    return {name for tree in trees for name in tree}
