"""FedAvg (spec 3.1): E epochs of SGD from the global model, server adds the weighted mean
of the clients' deltas (parameters and BatchNorm state).

The text reference draws its cohort with replacement (`with_replacement`); a client drawn
twice trains twice and its second result is counted once per draw (the engine does this).

FedAvg's server is also the server of FedProx, MOON, FedNova and SCAFFOLD: they differ
in the client's objective (a penalty or a correction) and in how the mean update is
formed (`model_delta`), and every one of them passes that update through the server
transforms (`transforms`: InCo's cross-layer mixing) before adding it.
"""

from collections.abc import Callable, Sequence

from trainers.aggregation import owner_mean, split_owned
from trainers.algorithms.base import Algorithm, HParams, as_float, empty_clients
from trainers.local import random_epoch_count
from utils.pytree import tree_add, tree_sub

# transform(server, delta) -> delta, delta = {"params": ..., "state": ...} (the mean update)
ServerTransform = Callable[[dict, dict], dict]


class FedAvg(Algorithm):
    name = "fedavg"
    integer_mean = "round"  # how averaged integer leaves (BN counters) are rounded

    def __init__(self, task, hp: HParams, with_replacement: bool = False,
                 transforms: Sequence[ServerTransform] = ()):
        super().__init__(task, hp)
        self.samples_with_replacement = with_replacement
        self.transforms = tuple(transforms)

    @classmethod
    def from_options(cls, task, hp, options, text=None, **kwargs):
        """`kwargs`: the settings of a subclass (FedProx's mu, ...) and `transforms`."""
        return cls(task, hp, with_replacement=text is not None
                   and text.sample_with_replacement and cls is FedAvg, **kwargs)

    def init(self, params, state, num_clients):
        return {"params": params, "state": state}, empty_clients(num_clients)

    def train_from_global(self, server, data, schedule, rng, penalty=None, penalty_args=None,
                          correction=None):
        """E epochs from the global model (E_c with DAC's random epochs); the FedAvg
        family's whole client round."""
        schedule = schedule.stream(0, self.hp.local_epochs)
        if self.hp.random_epochs:
            schedule = schedule.first_epochs(random_epoch_count(rng, self.hp.local_epochs))
        return self.local_sgd(server["params"], {}, server["state"], data, schedule, rng,
                              penalty, penalty_args, correction)

    @staticmethod
    def model_upload(server, params, state) -> dict:
        return {"params": tree_sub(params, server["params"]),
                "state": tree_sub(state, server["state"])}

    def client_update(self, server, client, data, schedule, rng):
        params, state, sums = self.train_from_global(server, data, schedule, rng)
        return client, self.model_upload(server, params, state), {
            "phase": sums, "downloaded": as_float(1.0)}

    def model_delta(self, server, uploads, weights) -> dict:
        """The mean model update over each entry's owners (every client owns everything
        in a homogeneous federation)."""
        sent, owned = split_owned(uploads)
        model = {"params": sent["params"], "state": sent["state"]}
        masks = None if owned is None else {"params": owned["params"],
                                            "state": owned["state"]}
        return owner_mean(model, weights, masks, self.integer_mean)

    def apply_delta(self, server, delta) -> dict:
        for transform in self.transforms:
            delta = transform(server, delta)
        return {**server, "params": tree_add(server["params"], delta["params"]),
                "state": tree_add(server["state"], delta["state"])}

    def server_update(self, server, uploads, weights):
        return self.apply_delta(server, self.model_delta(server, uploads, weights))

