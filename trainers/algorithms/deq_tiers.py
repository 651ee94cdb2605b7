"""FeDEQ for clients of unequal compute: per-client solver budgets and block widths.

Each client belongs to a tier (trainers/deq_tier_table.py): a forward iteration cap and
tolerance, a backward cap, the share of the equilibrium block's hidden channels it
keeps, and its local epochs. The tier is data in the client's record, not a separate
model: caps bound the solver's loops and the width is a channel mask
(models/deq_resnet.py), so every tier runs the same compiled program, z keeps its shape
for everyone, and the base algorithm (FeDEQ) is unchanged. What this wrapper adds:

- the client's budget is in force for its update (`deq.budget.use_budget`), and its
  epochs cap the schedule;
- uploads carry ownership masks over the hidden channels, so the server averages each
  channel over the clients that own it (`trainers.aggregation.owner_mean`), and the
  base algorithm's `confine` keeps the consensus terms to owned entries;
- evaluation scores each client at its tier's budget and, with `eval_maxiter`, also at
  a larger cap (test-time compute), per tier.
"""

from dataclasses import replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deq.budget import SolverBudget, use_budget
from models.deq_cost import DeqResNetCost
from models.deq_resnet import HIDDEN_LAYOUT, hidden_mask
from trainers.aggregation import OWNED
from trainers.algorithms.base import Algorithm
from trainers.deq_tier_table import SolverTier
from utils.pytree import tree_bytes

BLOCK_MODULE = "deq_block"


class DeqTiers(Algorithm):
    """`tiers` resolved (every field set), `tier_of[i]` client i's tier; `hidden_width`:
    the block's hidden channels (None: a block without width tiers); `eval_maxiter`:
    also score every client at this forward cap; `costs`: per tier, the MAC counter at
    its width (None where the model has no counter)."""

    def __init__(self, base: Algorithm, tiers: list[SolverTier], tier_of: np.ndarray,
                 hidden_width: int | None, bwd_solver: str, eval_maxiter: int | None = None,
                 costs: list[DeqResNetCost] | None = None):
        super().__init__(base.task, base.hp)
        self.base = base
        self.tiers = [t if t.name else replace(t, name=f"tier{k}") for k, t in enumerate(tiers)]
        self.tier_of = np.asarray(tier_of, int)
        self.tier_names = [t.name for t in self.tiers]
        self.name = base.name
        self.extra_initial_draw = base.extra_initial_draw
        self.evaluates_unseen = base.evaluates_unseen
        self.eval_maxiter = eval_maxiter
        self.bwd_solver = bwd_solver
        self.costs = costs
        narrowed = any(t.width < 1 for t in self.tiers)
        if narrowed and hidden_width is None:
            raise ValueError("this model's equilibrium block has no width tiers; give "
                             "every tier width 1")
        self.hidden = ([hidden_mask(hidden_width, t.width) for t in self.tiers]
                       if narrowed else None)

    # ------------------------------------------------------------ the base's interface
    @property
    def streams(self):
        return self.base.streams

    def aggregation_weights(self, sizes):
        return self.base.aggregation_weights(sizes)

    @property
    def resume_settings(self) -> dict[str, Any]:
        return {**self.base.resume_settings,
                "solver_tiers": [vars(t) for t in self.tiers],
                "tier_of": self.tier_of.tolist()}

    def broadcast(self, server):
        return self.base.broadcast(server)

    def eval_params(self, server, client):
        return self.base.eval_params(server, client["base"])

    def server_update(self, server, uploads, weights):
        return self.base.server_update(server, uploads, weights)

    # ------------------------------------------------------------ tiers
    def _record(self, k: int) -> dict:
        t = self.tiers[k]
        record = {"maxiter": np.int32(t.maxiter), "tol": np.float32(t.tol),
                  "bwd_maxiter": np.int32(t.bwd_maxiter), "epochs": np.int32(t.epochs)}
        if self.hidden is not None:
            record["hidden"] = self.hidden[k]
        return record

    def init(self, params, state, num_clients):
        if len(self.tier_of) != num_clients:
            raise ValueError(f"{len(self.tier_of)} tier assignments for {num_clients} clients")
        server, clients = self.base.init(params, state, num_clients)
        records = [self._record(k) for k in range(len(self.tiers))]
        budgets = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)[self.tier_of]), *records)
        return server, {"base": clients, "tier": budgets}

    @staticmethod
    def budget(record: dict, maxiter=None) -> SolverBudget:
        return SolverBudget(record["maxiter"] if maxiter is None else jnp.asarray(
            maxiter, jnp.int32), record["tol"], record["bwd_maxiter"], record.get("hidden"))

    def ownership(self, tree: Any, hidden: jnp.ndarray | None) -> Any:
        """Per leaf of a tree holding the model's params or state: the hidden-channel
        mask, shaped to broadcast, on the block's narrowed leaves; 1.0 elsewhere."""
        def mask(path, leaf):
            names = [getattr(p, "key", None) for p in path]
            axis = HIDDEN_LAYOUT.get(names[-1]) if BLOCK_MODULE in names else None
            if hidden is None or axis is None:
                return jnp.float32(1.0)
            shape = [1] * np.ndim(leaf)
            shape[axis] = -1
            return hidden.reshape(shape)
        return jax.tree_util.tree_map_with_path(mask, tree)

    def client_update(self, server, client, data, schedule, rng):
        record = client["tier"]
        schedule = schedule.first_epochs(record["epochs"])
        with use_budget(self.budget(record)):
            new, upload, stats = self.base.client_update(server, client["base"], data,
                                                         schedule, rng)
        hidden = record.get("hidden")
        if hidden is not None:
            new = self.base.confine(new, server, lambda tree: self.ownership(tree, hidden))
            upload = {**upload, OWNED: self.ownership(upload, hidden)}
        return {"base": new, "tier": record}, upload, stats

    def adapt_unseen(self, server, init_params, init_state, data, schedule, rng):
        """Unseen clients adapt with the largest tier's budget (the last one)."""
        with use_budget(self.budget(jax.tree.map(jnp.asarray, self._record(-1)))):
            return self.base.adapt_unseen(server, init_params, init_state, data, schedule,
                                          rng)

    def eval_budgets(self, client) -> dict[str, SolverBudget | None]:
        """The budgets a client is scored at, by metric-name suffix: its tier's, and the
        test-time cap's (`eval_maxiter`)."""
        if client is None:     # unseen clients: the largest tier
            client = {"tier": jax.tree.map(jnp.asarray, self._record(-1))}
        budgets = {"": self.budget(client["tier"])}
        if self.eval_maxiter:
            budgets[f"_at{self.eval_maxiter}"] = self.budget(client["tier"], self.eval_maxiter)
        return budgets

    def tier_download_bytes(self, server) -> list[int]:
        """Per tier, the bytes of the broadcast entries it owns."""
        down = self.broadcast(server)
        if self.hidden is None:
            return [tree_bytes(down)] * len(self.tiers)
        return [_owned_bytes(down, self.ownership(down, jnp.asarray(h))) for h in self.hidden]

    def tier_macs(self, k: int, phase: dict[str, float], bwd_solver: str | None = None
                  ) -> dict[str, float]:
        """Tier k's MACs per example at the iterations its clients used this round."""
        if not self.costs:
            return {}
        cost = self.costs[k]
        return {"macs_per_example": cost.forward(phase["solver_iters"]),
                "train_macs_per_example": cost.training(
                    phase["solver_iters"], phase["bwd_iters"], bwd_solver or self.bwd_solver)}


def _owned_bytes(tree: Any, masks: Any) -> int:
    count = jax.tree.map(lambda leaf, m: int(np.sum(np.broadcast_to(np.asarray(m), leaf.shape)))
                         * leaf.dtype.itemsize, tree, masks)
    return int(sum(jax.tree.leaves(count)))
