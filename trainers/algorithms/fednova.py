"""FedNova (NIID-Bench, inco_spec 6): the server normalises each client's update by its
number of local steps, so clients with more data do not pull harder.

With plain SGD (rho = 0) a_i = tau_i, the client's steps; d_i = (w_i - w_global) / a_i;
w <- w + (sum_i p_i a_i) sum_i p_i d_i with p_i = n_i / sum_S n_j (data-weighted by its
definition, whatever --unweighted_updates says). For sub-models both sums run, per entry,
over its owners. Applied to every entry the server holds (parameters and BatchNorm
state), as NIID-Bench applies it to the whole state dict. Equal steps: FedAvg (tested).
"""

import jax
import jax.numpy as jnp

from trainers.aggregation import owner_mean, split_owned
from trainers.algorithms.base import as_float
from trainers.algorithms.fedavg import FedAvg


class FedNova(FedAvg):
    name = "fednova"

    def aggregation_weights(self, sizes: jnp.ndarray) -> jnp.ndarray:
        return sizes.astype(jnp.float32)

    def client_update(self, server, client, data, schedule, rng):
        params, state, sums = self.train_from_global(server, data, schedule, rng)
        steps = jnp.maximum(sums[0], 1.0)
        upload = self.model_upload(server, params, state)
        upload = {**jax.tree.map(lambda d: d / steps if jnp.issubdtype(d.dtype, jnp.floating)
                                 else d, upload), "steps": steps}
        return client, upload, {"phase": sums, "downloaded": as_float(1.0)}

    def model_delta(self, server, uploads, weights):
        normalised = super().model_delta(server, uploads, weights)   # sum p_i d_i
        _, owned = split_owned(uploads)
        steps = uploads["steps"]
        if owned is None:
            tau = jnp.sum(weights * steps) / jnp.sum(weights)
            return jax.tree.map(lambda d: _scale(d, tau), normalised)
        model_masks = {"params": owned["params"], "state": owned["state"]}
        per_leaf = jax.tree.map(lambda m: steps.reshape((-1,) + (1,) * (m.ndim - 1))
                                * jnp.ones_like(m, jnp.float32), model_masks)
        tau = owner_mean(per_leaf, weights, model_masks)
        return jax.tree.map(_scale, normalised, tau)


def _scale(delta: jnp.ndarray, tau: jnp.ndarray) -> jnp.ndarray:
    if jnp.issubdtype(delta.dtype, jnp.floating):
        return (delta * tau).astype(delta.dtype)
    return delta
