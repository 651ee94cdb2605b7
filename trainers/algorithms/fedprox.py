"""FedProx (NIID-Bench, inco_spec 6): FedAvg whose clients add  mu/2 ||w - w_global||^2
over the trainable parameters to every batch's loss. mu = 0 is FedAvg (tested)."""

import jax.numpy as jnp

from trainers.algorithms.base import HParams, as_float
from trainers.algorithms.ditto import proximal
from trainers.algorithms.fedavg import FedAvg


class FedProx(FedAvg):
    name = "fedprox"

    def __init__(self, task, hp: HParams, mu: float = 0.1, **kwargs):
        super().__init__(task, hp, **kwargs)
        self.mu = mu

    @classmethod
    def from_options(cls, task, hp, options, text=None, **kwargs):
        return super().from_options(task, hp, options, text, mu=options.prox_mu, **kwargs)

    def client_update(self, server, client, data, schedule, rng):
        # Anchored at the model received (for a sub-model: the sub-model cut for it).
        params, state, sums = self.train_from_global(
            server, data, schedule, rng, proximal,
            (jnp.asarray(self.mu, jnp.float32), server["params"]))
        return client, self.model_upload(server, params, state), {
            "phase": sums, "downloaded": as_float(1.0)}
