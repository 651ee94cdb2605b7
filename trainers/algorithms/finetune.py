"""FedAvg + fine-tuning (spec 3.2): FedAvg while round < finetune_frac * num_rounds, then
each sampled client trains its own copy and nothing is communicated or aggregated.

The reference resets every client's copy to the global model after each FedAvg round.
Here a copy is kept only once the client has fine-tuned (`tuned`); until then the client
*is* the global model, which the server freezes at the switch. That is the model the
reference holds, without rewriting every client's copy every round.
"""

import jax.numpy as jnp

from trainers.algorithms.base import HParams, as_float
from trainers.algorithms.fedavg import FedAvg
from utils.pytree import broadcast, tree_sub, tree_where


class Finetune(FedAvg):
    name = "finetune"
    evaluates_unseen = False  # the reference has no unseen evaluation for Finetune

    def __init__(self, task, hp: HParams, global_rounds: float):
        """`global_rounds` = finetune_frac * num_rounds, a float as in the reference: the
        rounds r < global_rounds are FedAvg rounds."""
        super().__init__(task, hp)
        self.global_rounds = float(global_rounds)

    @classmethod
    def from_options(cls, task, hp, options, text=None, **kwargs):
        del text
        return cls(task, hp, options.finetune_frac * options.num_rounds)

    @property
    def resume_settings(self) -> dict[str, float]:
        # The switch depends on --num_rounds, which a resumed run may otherwise change.
        return {"finetune_global_rounds": self.global_rounds}

    def init(self, params, state, num_clients):
        server, _ = super().init(params, state, num_clients)
        own = {"params": params, "state": state, "tuned": jnp.asarray(False)}
        return {**server, "round": jnp.asarray(0, jnp.int32)}, broadcast(own, num_clients)

    def federated(self, server) -> jnp.ndarray:
        return server["round"] < self.global_rounds

    def client_update(self, server, client, data, schedule, rng):
        federated = self.federated(server)
        own = client["tuned"] & ~federated
        params = tree_where(own, client["params"], server["params"])
        state = tree_where(own, client["state"], server["state"])
        params, state, sums = self.local_sgd(params, {}, state, data,
                                             schedule.stream(0, self.hp.local_epochs), rng)
        upload = {"params": tree_sub(params, server["params"]),
                  "state": tree_sub(state, server["state"])}
        tuned = {"params": params, "state": state, "tuned": jnp.asarray(True)}
        new_client = tree_where(federated, client, tuned)
        return new_client, upload, {"phase": sums, "downloaded": as_float(federated),
                                    "uploaded": as_float(federated)}

    def server_update(self, server, uploads, weights):
        federated = self.federated(server)
        averaged = super().server_update(server, uploads, weights)
        return {"params": tree_where(federated, averaged["params"], server["params"]),
                "state": tree_where(federated, averaged["state"], server["state"]),
                "round": server["round"] + 1}

    def eval_params(self, server, client):
        return (tree_where(client["tuned"], client["params"], server["params"]),
                tree_where(client["tuned"], client["state"], server["state"]))
