"""FedAvg (spec 3.1): E epochs of SGD from the global model, server adds the weighted mean
of the clients' deltas (parameters and BatchNorm state).

The text reference draws its cohort with replacement (`with_replacement`); a client drawn
twice trains twice and its second result is counted once per draw (the engine does this).
"""

from trainers.algorithms.base import Algorithm, HParams, as_float, empty_clients
from utils.pytree import tree_add, tree_sub, weighted_mean


class FedAvg(Algorithm):
    name = "fedavg"

    def __init__(self, task, hp: HParams, with_replacement: bool = False):
        super().__init__(task, hp)
        self.samples_with_replacement = with_replacement

    def init(self, params, state, num_clients):
        return {"params": params, "state": state}, empty_clients(num_clients)

    def client_update(self, server, client, data, schedule, rng):
        params, state, sums = self.local_sgd(server["params"], {}, server["state"], data,
                                             schedule.stream(0, self.hp.local_epochs), rng)
        upload = {"params": tree_sub(params, server["params"]),
                  "state": tree_sub(state, server["state"])}
        return client, upload, {"phase": sums, "downloaded": as_float(1.0)}

    def server_update(self, server, uploads, weights):
        mean_delta = weighted_mean(uploads, weights)
        return {"params": tree_add(server["params"], mean_delta["params"]),
                "state": tree_add(server["state"], mean_delta["state"])}
