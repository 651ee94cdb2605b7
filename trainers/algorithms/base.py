"""The algorithm interface: what one client does in a round and what the server does.

An algorithm never loops over clients, reads files, prints or times anything; the engine
(trainers/engine.py) does, and runs these functions for a whole cohort at once.
"""

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from trainers.local import ClientData, Schedule, sgd_phase

PyTree = Any


@dataclass(frozen=True)
class HParams:
    """Client optimisation settings shared by every algorithm (reference flags in spec 4.1)."""

    lr: float = 0.01
    local_epochs: int = 5          # E, -le
    personal_epochs: int = 3       # P, -pe
    weighted: bool = True          # aggregation weights proportional to n_i


class Algorithm:
    """Subclasses define the methods below; all are pure and work on ONE client.

    - `streams`: the batch streams a client needs, as (key word, epochs): the reference
      seeds each stream's shuffles with one 32-bit word of the client's JAX key.
    - `init(params, state, num_clients) -> (server, clients)`, clients stacked on axis 0.
    - `client_update(server, client, data, schedule, rng) -> (client, upload, stats)`;
      `stats` is a dict of float arrays summed over the client's steps, plus
      `downloaded` (1.0 when the client received the server's broadcast this round).
    - `server_update(server, uploads, weights) -> server`, uploads stacked on axis 0.
    - `broadcast(server)`: the pytree a client downloads (for byte counting).
    - `eval_params(server, client) -> (params, state)`: the model a client is scored with.
    - `adapt_unseen(server, init_params, init_state, data, schedule, rng)
      -> (params, state)` for clients held out of training.
    """

    name = "base"
    extra_initial_draw = False  # FeDEQ draws one unused cohort before round 0 (spec 3.8)

    def __init__(self, task: Any, hp: HParams):
        self.task = task
        self.hp = hp

    @property
    def streams(self) -> tuple[tuple[int, int], ...]:
        return ((0, self.hp.local_epochs),)

    def local_sgd(self, trainable, frozen, state, data: ClientData, schedule: Schedule,
                  rng, penalty=None, penalty_args=None):
        return sgd_phase(self.task, self.hp.lr, trainable, frozen, state, data, schedule,
                         rng, penalty, penalty_args)

    def aggregation_weights(self, sizes: jnp.ndarray) -> jnp.ndarray:
        return sizes.astype(jnp.float32) if self.hp.weighted else jnp.ones_like(
            sizes, jnp.float32)

    # Defaults for algorithms whose server holds one global model.
    def eval_params(self, server, client):
        return server["params"], server["state"]

    def broadcast(self, server):
        return {"params": server["params"], "state": server["state"]}

    def adapt_unseen(self, server, init_params, init_state, data, schedule, rng):
        del init_params, init_state, data, schedule, rng
        return server["params"], server["state"]


def phase_stats(*sums: jnp.ndarray) -> jnp.ndarray:
    return sum(sums[1:], sums[0])


def as_float(x) -> jnp.ndarray:
    return jnp.asarray(x, jnp.float32)


def empty_clients(num_clients: int) -> dict:
    """Per-client state for algorithms that keep none (a zero-size leaf keeps shapes)."""
    return {"none": jnp.zeros((num_clients, 0), jnp.float32)}


def key_words(key: jax.Array) -> tuple[int, int]:
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return int(data[0]), int(data[1])
