"""FedRep (spec 3.5): a shared body averaged by the server, a personal head per client.

A sampled client downloads the body (and BatchNorm state), trains its head for P epochs
with the body frozen, then the body for E epochs with the head frozen; both phases walk
the data in the same order (one seed, as in the reference). The server takes the
*uniform* mean of the uploaded bodies and states. FedPer (fedper.py) changes only the
second phase and the default weighting.
"""

from dataclasses import replace

from trainers.algorithms.base import Algorithm, HParams, as_float, phase_stats
from utils.pytree import broadcast, merge, split_head, weighted_mean


class FedRep(Algorithm):
    name = "fedrep"

    def __init__(self, task, hp: HParams, weighted: bool = False):
        """`weighted`: average the bodies with weights proportional to n_i (still uniform
        under --unweighted_updates); FedRep's reference averages uniformly."""
        super().__init__(task, replace(hp, weighted=hp.weighted and weighted))

    @property
    def streams(self):
        return ((0, max(self.hp.local_epochs, self.hp.personal_epochs)),)

    def init(self, params, state, num_clients):
        body, head = split_head(params)
        return {"body": body, "state": state}, broadcast({"head": head}, num_clients)

    def broadcast(self, server):
        return server

    def client_update(self, server, client, data, schedule, rng):
        body, state, head = server["body"], server["state"], client["head"]
        sums = []
        if self.hp.personal_epochs > 0:
            head, state, s = self.local_sgd(head, body, state, data,
                                            schedule.stream(0, self.hp.personal_epochs), rng)
            sums.append(s)
        body, head, state, s = self.second_phase(
            body, head, state, data, schedule.stream(0, self.hp.local_epochs), rng)
        sums.append(s)
        return ({"head": head}, {"body": body, "state": state},
                {"phase": phase_stats(*sums), "downloaded": as_float(1.0)})

    def second_phase(self, body, head, state, data, schedule, rng):
        """FedRep: the body alone, the head frozen."""
        body, state, sums = self.local_sgd(body, head, state, data, schedule, rng)
        return body, head, state, sums

    def server_update(self, server, uploads, weights):
        return weighted_mean(uploads, weights)

    def eval_params(self, server, client):
        return merge(server["body"], client["head"]), server["state"]

    def adapt_unseen(self, server, init_params, init_state, data, schedule, rng):
        return self.adapt_head(server["body"], init_params, server["state"], data, schedule,
                               rng)
