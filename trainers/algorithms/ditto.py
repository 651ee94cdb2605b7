"""Ditto (spec 3.4): a FedAvg global model plus a personal model v_i per client, trained
on  loss(v_i) + lambda/2 ||v_i - theta||^2  with theta the round's global model.

A sampled client runs E epochs of plain SGD from theta (the reference's prox term in this
phase is anchored at the iterate itself, so it is zero), then E epochs on its personal
objective with its own batch stream (the reference seeds it with the key's second word).
The server averages the global-phase deltas, weighted by samples.

Where the personal phase starts is the reference's bug: it continues from the freshly
trained global copy, so v_i is not persistent. The default here is Ditto as published
(v_i persists across rounds); `reference_start=True` reproduces the reference.

BatchNorm state, as in the reference: each client keeps its own, uses it in both phases,
and uploads its delta to the server's state after both phases.
"""

import jax.numpy as jnp

from trainers.algorithms.base import HParams, as_float, phase_stats
from trainers.algorithms.fedavg import FedAvg
from utils.pytree import broadcast, tree_sq_norm, tree_sub


def proximal(params: dict, args, x: jnp.ndarray, mask: jnp.ndarray, out=None
             ) -> jnp.ndarray:
    """lambda/2 ||params - anchor||^2, not scaled by the batch: the spec reports the
    division by the token count for text FeDEQ only. (FedProx's term with lambda = mu.)"""
    del x, mask, out
    lam, anchor = args
    return 0.5 * lam * tree_sq_norm(tree_sub(params, anchor))


class Ditto(FedAvg):
    name = "ditto"

    def __init__(self, task, hp: HParams, lam: float = 0.3, reference_start: bool = False):
        super().__init__(task, hp)
        self.lam = lam
        self.reference_start = reference_start

    @classmethod
    def from_options(cls, task, hp, options, text=None, **kwargs):
        del text
        return cls(task, hp, options.ditto_lambda, options.ditto_reference_start)

    @property
    def streams(self):
        return ((0, self.hp.local_epochs), (1, self.hp.local_epochs))

    def init(self, params, state, num_clients):
        server, _ = super().init(params, state, num_clients)
        return server, broadcast({"params": params, "state": state}, num_clients)

    def client_update(self, server, client, data, schedule, rng):
        epochs = self.hp.local_epochs
        theta, state, global_sums = self.local_sgd(server["params"], {}, client["state"], data,
                                                   schedule.stream(0, epochs), rng)
        start = theta if self.reference_start else client["params"]
        personal, state, personal_sums = self.local_sgd(
            start, {}, state, data, schedule.stream(1, epochs), rng, proximal,
            (jnp.asarray(self.lam, jnp.float32), server["params"]))
        upload = {"params": tree_sub(theta, server["params"]),
                  "state": tree_sub(state, server["state"])}
        return ({"params": personal, "state": state}, upload,
                {"phase": phase_stats(global_sums, personal_sums),
                 "downloaded": as_float(1.0)})

    def eval_params(self, server, client):
        return client["params"], client["state"]
