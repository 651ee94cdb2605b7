"""The algorithm interface: what one client does in a round and what the server does.

An algorithm never loops over clients, reads files, prints or times anything; the engine
(trainers/engine.py) does, and runs these functions for a whole cohort at once.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from trainers.local import ClientData, Schedule, sgd_phase
from trainers.optimizers import OptimizerSpec
from utils.pytree import merge, split_head

PyTree = Any


@dataclass(frozen=True)
class HParams:
    """Client optimisation settings shared by every algorithm (reference flags in spec 4.1)."""

    lr: float = 0.01
    local_epochs: int = 5          # E, -le
    personal_epochs: int = 3       # P, -pe
    weighted: bool = True          # aggregation weights proportional to n_i
    optimizer: str = "sgd"         # sgd (the FeDEQ reference) or adam (InCo's ResNets)
    momentum: float = 0.0
    weight_decay: float = 0.0
    # DAC's --random_epoch (dac_spec 4.1): each client trains E_c epochs, E_c uniform on
    # {floor(E / 3), ..., E}, drawn from its own key (the FedAvg family only).
    random_epochs: bool = False

    @property
    def optimizer_spec(self) -> OptimizerSpec:
        return OptimizerSpec(self.optimizer, self.lr, self.momentum, self.weight_decay)


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

    Optional, for algorithms that depart from the usual round (class attributes and
    hooks the engine reads, so that it never needs an algorithm's name):
    - `stats["uploaded"]` (1.0 / 0.0 per client): whether the upload was really sent
      (Finetune stops communicating after its switch); absent means every client sent.
    - `full_participation`: every seen client trains every round, no cohort is drawn.
    - `samples_with_replacement`: the cohort is drawn with replacement (text FedAvg); a
      client drawn twice trains twice from the same state and its last result stands
      for both draws.
    - `evaluates_unseen`: False where the reference has no unseen-client evaluation.
    - `score_client(...)`: scores one client its own way instead of the engine's pooled
      accuracy (kNN-Per); see its docstring.
    - `resume_settings`: numbers derived from flags a resumed run may change (for example
      a round count) that nevertheless change the results, so a checkpoint refuses them.

    Round-dependent behaviour must read a round counter kept in the server state with
    `jnp.where`-style selection: the map and vmap executors trace `client_update`.
    """

    name = "base"
    extra_initial_draw = False  # FeDEQ draws one unused cohort before round 0 (spec 3.8)
    full_participation = False  # Local trains every client every round (spec 3.3)
    samples_with_replacement = False  # FedAvg-seq draws its cohort with replacement (3.1)
    evaluates_unseen = True     # Finetune and Local never evaluate unseen clients

    def __init__(self, task: Any, hp: HParams):
        self.task = task
        self.hp = hp

    @classmethod
    def from_options(cls, task: Any, hp: HParams, options: Any, text: Any = None
                     ) -> "Algorithm":
        """The algorithm with its settings read from `trainers.registry.AlgorithmOptions`
        (`text`: the `TextOptions` when it runs a text trainer, else None). Algorithms
        with settings of their own override this, so the registry never branches on
        which algorithm it builds."""
        del options, text
        return cls(task, hp)

    @property
    def streams(self) -> tuple[tuple[int, int], ...]:
        return ((0, self.hp.local_epochs),)

    def local_sgd(self, trainable, frozen, state, data: ClientData, schedule: Schedule,
                  rng, penalty=None, penalty_args=None, correction=None):
        return sgd_phase(self.task, self.hp.optimizer_spec, trainable, frozen, state, data,
                         schedule, rng, penalty, penalty_args, correction)

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

    def adapt_head(self, body: PyTree, init_params: PyTree, state: PyTree, data: ClientData,
                   schedule: Schedule, rng: jax.Array) -> tuple[PyTree, PyTree]:
        """Unseen-client adaptation of the head-personalised methods (FedRep, FedPer,
        FeDEQ): a client that never trained has no head of its own, so it starts from the
        initial head and trains only the head for P epochs on the shared body."""
        _, head = split_head(init_params)
        if self.hp.personal_epochs > 0:
            head, state, _ = self.local_sgd(head, body, state, data,
                                            schedule.stream(0, self.hp.personal_epochs), rng)
        return merge(body, head), state

    def confine(self, client: PyTree, server: PyTree, ownership: Callable) -> PyTree:
        """After the update of a client that owns only some entries (FeDEQ width tiers,
        trainers/algorithms/deq_tiers.py): its record with the entries it does not own
        reset. `ownership(tree)` gives a tree's masks."""
        raise TypeError(f"{self.name} has no width tiers; give every tier width 1")

    def score_client(self, params: PyTree, state: PyTree, train: tuple, test: tuple,
                     rng: jax.Array, chunk: int) -> dict | None:
        """None: the engine scores the client with pooled accuracy and loss.

        An algorithm that scores clients its own way returns, per split it scores, a dict
        of sums `{"correct", "loss", "count"}`; the engine adds them over clients and
        divides, so a per-client accuracy returned with count 1 becomes an unweighted
        mean over clients. `train` and `test` are padded (x, y, mask) arrays whose
        length is a multiple of `chunk`, the number of examples per forward pass.
        """
        del params, state, train, test, rng, chunk
        return None

    @property
    def resume_settings(self) -> dict[str, Any]:
        return {}


def phase_stats(*sums: jnp.ndarray) -> jnp.ndarray:
    return sum(sums[1:], sums[0])


def as_float(x) -> jnp.ndarray:
    return jnp.asarray(x, jnp.float32)


def map_chunks(fn: Callable, arrays: tuple, mask: jnp.ndarray, chunk: int) -> Any:
    """`fn(*chunk_arrays, chunk_mask)` over consecutive chunks of the leading axis (a
    multiple of `chunk`), outputs stacked on a new leading axis. Chunks holding only
    padding are skipped (zeros returned): padding to the largest client can otherwise
    double the cost of scoring small clients."""
    parts = tuple(a.reshape((-1, chunk) + a.shape[1:]) for a in (*arrays, mask))
    zero = jax.eval_shape(lambda a: fn(*a), tuple(p[0] for p in parts))
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
    return lax.map(lambda a: lax.cond(jnp.any(a[-1]), lambda b: fn(*b), lambda _: zero, a),
                   parts)


def empty_clients(num_clients: int) -> dict:
    """Per-client state for algorithms that keep none (a zero-size leaf keeps shapes)."""
    return {"none": jnp.zeros((num_clients, 0), jnp.float32)}


def key_words(key: jax.Array) -> tuple[int, int]:
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return int(data[0]), int(data[1])
