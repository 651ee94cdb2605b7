"""MOON (NIID-Bench, inco_spec 6): FedAvg whose clients add a model-contrastive term.

loss = CE + mu * CE([cos(z, z_glob), cos(z, z_prev)] / tau, target 0), where z is the
representation (`ModelOutput.embedding`: the pooled features of the stage ResNets, the
class token after the final norm of the ViT) of the model being trained, z_glob that of
the round's global model and z_prev that of the client's previous local model (a pool of
one model; before a client's first round it is the initial global model). Both frozen
models run in evaluation mode on the same (augmented) batch.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from trainers.algorithms.base import HParams, as_float
from trainers.algorithms.fedavg import FedAvg
from utils.pytree import broadcast


def _cosine(a: jnp.ndarray, b: jnp.ndarray, eps: float = 1e-8) -> jnp.ndarray:
    # torch.nn.CosineSimilarity: x.y / max(||x|| ||y||, eps); finite when a = b = 0.
    return jnp.sum(a * b, -1) / jnp.maximum(
        jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), eps)


@functools.lru_cache(maxsize=32)
def contrastive_penalty(task):
    """The MOON term for `task`'s model, as a penalty of trainers/local.py (cached per
    task: the penalty keys the compiled step)."""

    def penalty(params, args, x, mask, out):
        del params
        mu, tau, global_model, prev_model, key = args
        z_glob = task.apply(*global_model, key, x, False)[0].embedding
        z_prev = task.apply(*prev_model, key, x, False)[0].embedding
        z_glob, z_prev = jax.lax.stop_gradient((z_glob, z_prev))
        # One vector per example: a sequence model's (T, D) representation is compared
        # whole (MOON is defined for images; this is our choice for text).
        z, z_glob, z_prev = (a.reshape(a.shape[0], -1) for a in (out.embedding, z_glob,
                                                                  z_prev))
        logits = jnp.stack([_cosine(z, z_glob), _cosine(z, z_prev)], -1) / tau
        ce = optax.softmax_cross_entropy_with_integer_labels(
            logits, jnp.zeros(logits.shape[:1], jnp.int32))
        m = mask.astype(ce.dtype)
        return mu * jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)

    return penalty


class MOON(FedAvg):
    name = "moon"

    def __init__(self, task, hp: HParams, mu: float = 0.001, temperature: float = 0.5,
                 **kwargs):
        super().__init__(task, hp, **kwargs)
        self.mu, self.temperature = mu, temperature

    @classmethod
    def from_options(cls, task, hp, options, text=None, **kwargs):
        return super().from_options(task, hp, options, text, mu=options.moon_mu,
                                    temperature=options.moon_temperature, **kwargs)

    def init(self, params, state, num_clients):
        server, _ = super().init(params, state, num_clients)
        return server, broadcast({"prev": {"params": params, "state": state}}, num_clients)

    def client_update(self, server, client, data, schedule, rng):
        args = (jnp.asarray(self.mu, jnp.float32), jnp.asarray(self.temperature, jnp.float32),
                (server["params"], server["state"]),
                (client["prev"]["params"], client["prev"]["state"]), rng)
        params, state, sums = self.train_from_global(
            server, data, schedule, rng, contrastive_penalty(self.task), args)
        return ({"prev": {"params": params, "state": state}},
                self.model_upload(server, params, state),
                {"phase": sums, "downloaded": as_float(1.0)})
