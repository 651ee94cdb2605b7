"""SCAFFOLD (NIID-Bench, inco_spec 6): control variates correct each client's drift.

After every optimiser step the client moves  w <- w - lr (c - c_i)  (outside the
optimiser, as NIID-Bench does, also under Adam); after its K steps it sets
c_i+ = c_i - c + (w_global - w) / (K lr) and uploads its model delta and c_i+ - c_i. The
server adds the mean model delta (FedAvg's) and  c <- c + (1/N) sum_{i in S} (c_i+ - c_i),
N = all clients; for sub-models, per entry over its owners: the sampled owners' sum
divided by how many clients of the federation own the entry. c_i persists per client.

The variates cover the trainable parameters; NIID-Bench also corrects BatchNorm's
running statistics and counter, which are not optimised (docs/DEVIATIONS.md).
With zero variates and one step this is FedAvg (tested).
"""

import jax
import jax.numpy as jnp

from trainers.aggregation import owner_count, owner_mean, split_owned
from trainers.algorithms.base import HParams, as_float
from trainers.algorithms.fedavg import FedAvg
from utils.pytree import broadcast, tree_add, tree_sub, tree_zeros_like


def control_step(params: dict, args) -> dict:
    """w - lr (c - c_i), after each optimiser step (trainers/local.py `correction`)."""
    lr, drift = args
    return jax.tree.map(lambda w, d: w - lr * d, params, drift)


class Scaffold(FedAvg):
    name = "scaffold"

    def __init__(self, task, hp: HParams, **kwargs):
        super().__init__(task, hp, **kwargs)
        self.population = None  # per-entry owner counts over all clients; None: N

    def init(self, params, state, num_clients):
        server, _ = super().init(params, state, num_clients)
        zeros = tree_zeros_like(params)
        self.num_clients = num_clients
        return ({**server, "control": zeros},
                broadcast({"control": zeros}, num_clients))

    def client_update(self, server, client, data, schedule, rng):
        lr = jnp.asarray(self.hp.lr, jnp.float32)
        drift = tree_sub(server["control"], client["control"])
        params, state, sums = self.train_from_global(server, data, schedule, rng,
                                                     correction=control_step,
                                                     penalty_args=(lr, drift))
        steps = jnp.maximum(sums[0], 1.0)
        new_control = jax.tree.map(lambda ci, c, w0, w: ci - c + (w0 - w) / (steps * lr),
                                   client["control"], server["control"], server["params"],
                                   params)
        upload = {**self.model_upload(server, params, state),
                  "control": tree_sub(new_control, client["control"])}
        return ({"control": new_control}, upload,
                {"phase": sums, "downloaded": as_float(1.0)})

    def server_update(self, server, uploads, weights):
        new = self.apply_delta(server, self.model_delta(server, uploads, weights))
        sent, owned = split_owned(uploads)
        masks = None if owned is None else owned["control"]
        mean = owner_mean(sent["control"], jnp.ones_like(weights), masks)  # sampled owners
        senders = owner_count(masks, weights.shape[0])
        if masks is None:
            step = jax.tree.map(lambda m: m * (senders / self.num_clients), mean)
        else:   # per entry: the sampled owners' sum over all of the federation's owners
            step = jax.tree.map(lambda m, s, p: m * (s / jnp.maximum(p, 1.0)), mean, senders,
                                self.population)
        return {**new, "control": tree_add(server["control"], step)}
