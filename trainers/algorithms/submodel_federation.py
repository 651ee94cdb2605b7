"""Clients of unequal compute: any FedAvg-family algorithm on sub-models of one server
model (InCo's "Hetero*" and "InCo*" methods: HeteroAvg, InCoAvg, HeteroProx, ...).

The server holds the largest model. A client of tier k (InCo: its group) receives the
tier's cut of every server-shaped tree, runs the base algorithm's own client update on
it, and sends its update pasted into the server's shapes with an ownership mask per
leaf; the base algorithm's server step then averages each entry over its owners
(trainers/aggregation.py) and applies its server transforms (InCo's mixing). So the
client algorithms are unchanged: one instance per tier, each with that tier's task,
hence one compiled program per tier and not per client.

Evaluation follows InCo (inco_spec 7): each tier's sub-model, cut from the server model
after the round, is scored on the global test set; the reported accuracy is the mean
over tiers.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trainers.aggregation import OWNED
from trainers.algorithms.base import Algorithm
from trainers.submodels import ModuleView, module_names
from utils.pytree import tree_bytes, tree_zeros_like


def inco_groups(num_clients: int, num_tiers: int = 5) -> np.ndarray:
    """InCo's assignment (inco_spec 2): rank r = i + 1 with g = floor(N / tiers) is in
    tier j (0-based) when j g + 0.5 < r < (j + 1) g + 0.5; the remainder (and every
    client when N < tiers) goes to the last, largest tier."""
    g = num_clients // num_tiers
    if g == 0:
        return np.full(num_clients, num_tiers - 1)
    ranks = np.arange(1, num_clients + 1)
    return np.minimum((ranks - 0.5) // g, num_tiers - 1).astype(int)


class SubModelFederation(Algorithm):
    """`bases[k]` is the base algorithm built with tier k's task; the last tier's model
    is the server's. `tier_of[i]` is client i's tier. `views`: how each tier's trees
    are cut from the server's (default: whole modules by name, InCo's depth split;
    `ChannelView`s for channel subsets). `server`: the base algorithm with the server's
    model when no tier trains all of it (DAC tiers whose channels are not nested);
    default the last tier's. `tier_costs`: per tier, static figures (MACs per image,
    parameters) the engine logs beside the tier's accuracy."""

    def __init__(self, bases: Sequence[Algorithm], tier_names: Sequence[str],
                 tier_of: np.ndarray, example_x: jnp.ndarray, upload_scale: float = 1.0,
                 views: Sequence[ModuleView] | None = None, server: Algorithm | None = None,
                 tier_costs: Sequence[dict[str, float]] | None = None):
        server_alg = bases[-1] if server is None else server
        self.server_base = server_alg
        super().__init__(server_alg.task, server_alg.hp)
        self.bases, self.tier_names = list(bases), list(tier_names)
        self.tier_of = np.asarray(tier_of, int)
        self.name = server_alg.name
        self.upload_scale = upload_scale  # InCo's ViT clients divide their delta by E
        self.tier_costs = list(tier_costs) if tier_costs is not None else None
        if views is None:
            shapes = [jax.eval_shape(b.task.model.init, jax.random.PRNGKey(0), example_x)
                      for b in self.bases]
            universe = module_names(*shapes[-1])
            views = [ModuleView(module_names(*s), universe) for s in shapes]
        self.views = list(views)
        self._tier_fns = [self._client_fn(k) for k in range(len(self.bases))]
        self._upload_shapes = None

    # ------------------------------------------------------------ the base's interface
    @property
    def streams(self):
        return self.server_base.streams

    def aggregation_weights(self, sizes):
        return self.server_base.aggregation_weights(sizes)

    @property
    def resume_settings(self):
        return {"tiers": self.tier_names, "tier_of": self.tier_of.tolist()}

    def init(self, params, state, num_clients):
        if len(self.tier_of) != num_clients:
            raise ValueError(f"{len(self.tier_of)} tier assignments for {num_clients} clients")
        server, clients = self.server_base.init(params, state, num_clients)
        if hasattr(self.server_base, "population"):     # SCAFFOLD: owners per entry
            counts = np.bincount(self.tier_of, minlength=len(self.views))
            self.server_base.population = jax.tree.map(
                lambda *ms: sum(float(c) * m for c, m in zip(counts, ms, strict=True)),
                *[v.masks(server["control"]) for v in self.views])
        return server, clients

    def client_update(self, server, client, data, schedule, rng):
        raise TypeError("a sub-model federation runs its clients per tier (tier_client_fn)")

    def tier_client_fn(self, k: int):
        return self._tier_fns[k]

    def _client_fn(self, k: int):
        view, base = self.views[k], self.bases[k]
        # Compiled once per tier: the loop executor runs `update` eagerly, where every
        # gather and scatter of a cut would otherwise be compiled op by op.
        cut, paste = jax.jit(view.cut), jax.jit(view.paste)

        def update(server, c):
            client, data, schedule, rng = c
            new_sub, upload, stats = base.client_update(cut(server), cut(client),
                                                        data, schedule, rng)
            if self.upload_scale != 1.0:
                upload = jax.tree.map(lambda u: u * self.upload_scale
                                      if jnp.issubdtype(u.dtype, jnp.floating) else u, upload)
            template = self._upload_template(server, client, data, schedule, rng)
            full = paste(template, upload)
            return paste(client, new_sub), {**full, OWNED: view.masks(template)}, stats

        return update

    def _upload_template(self, server, client, data, schedule, rng):
        """Zeros shaped like the server tier's upload, which every tier's upload is
        pasted into (its shapes are traced once: every round's are the same)."""
        if self._upload_shapes is None:
            shapes = jax.eval_shape(self.server_base.client_update, server, client, data,
                                    schedule, rng)[1]
            # a compiled function, not its value: inside a traced executor a cached array
            # would be a tracer of that trace
            self._upload_shapes = jax.jit(lambda: tree_zeros_like(shapes))
        return self._upload_shapes()

    def server_update(self, server, uploads, weights):
        new = self.server_base.server_update(server, uploads, weights)
        # InCo's server clips running variances at 0 (inco_spec 5.4): a mean of owners'
        # variances is never negative, so this only guards against rounding.
        state = jax.tree_util.tree_map_with_path(
            lambda path, v: jnp.maximum(v, 0) if str(path[-1]) == "['var']" else v,
            new["state"])
        # Counters stay integers (num_batches_tracked: the truncated mean is added), so
        # the next round's programs see the same types and are not compiled again.
        return jax.tree.map(lambda v, old: v.astype(old.dtype), {**new, "state": state},
                            server)

    def broadcast(self, server):
        return self.server_base.broadcast(server)

    def tier_download_bytes(self, server) -> list[int]:
        return [tree_bytes(v.cut(self.broadcast(server))) for v in self.views]

    def eval_params(self, server, client):
        return server["params"], server["state"]

    # ------------------------------------------------------------ global evaluation
    def server_models(self, server) -> list[tuple[str, Any, Any, Any]]:
        """(tier name, task, params, state) of every tier's sub-model of the server."""
        return [(name, base.task, view.cut(server["params"]), view.cut(server["state"]))
                for name, base, view in zip(self.tier_names, self.bases, self.views,
                                            strict=True)]
