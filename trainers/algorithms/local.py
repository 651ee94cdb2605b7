"""Local training (spec 3.3): every client trains its own model every round, starting
from one shared initialisation; nothing is communicated."""

import jax.numpy as jnp

from trainers.algorithms.base import Algorithm, as_float
from utils.pytree import broadcast


def nothing() -> dict:
    """A zero-byte pytree: what Local sends and what its server holds."""
    return {"none": jnp.zeros((0,), jnp.float32)}


class Local(Algorithm):
    name = "local"
    full_participation = True  # every client, every round; the reference draws no cohort
    evaluates_unseen = False   # the reference has no unseen evaluation for Local

    def init(self, params, state, num_clients):
        return nothing(), broadcast({"params": params, "state": state}, num_clients)

    def broadcast(self, server):
        return server

    def client_update(self, server, client, data, schedule, rng):
        params, state, sums = self.local_sgd(client["params"], {}, client["state"], data,
                                             schedule.stream(0, self.hp.local_epochs), rng)
        return ({"params": params, "state": state}, nothing(),
                {"phase": sums, "downloaded": as_float(0.0)})

    def server_update(self, server, uploads, weights):
        return server

    def eval_params(self, server, client):
        return client["params"], client["state"]
