"""Sub-models as views of the server's model: cut, paste and ownership masks.

A tier's model keeps a subset of the server model's Haiku modules (InCo's stage and
layer splitting: whole blocks), with the same names and shapes, so a client's model is
the server's pytree with some modules left out. Every tree the algorithms exchange
(parameters, BatchNorm state, SCAFFOLD's variates, MOON's previous model, uploads) is a
nesting of plain dicts whose innermost level maps module names to leaves; `cut` and
`paste` act on every such level at once, so no algorithm needs to know it runs on a
sub-model. Cut then paste is the identity on owned entries (tested).

Channel subsets (DAC, width tiers) will need masks that are vectors over a channel axis;
`trainers.aggregation.owner_mean` already takes any broadcastable mask.
"""

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp

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


def module_names(*trees: dict) -> set[str]:
    """The module names of Haiku params/state trees."""
    return {name for tree in trees for name in tree}
