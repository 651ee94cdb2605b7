"""FedPer (spec 3.6): FedRep's round, except that the second phase trains body and head
jointly, and the server's mean is weighted by samples (vision; text is uniform).

The head-only phase before the joint one is the reference's; the original FedPer has
none. Unseen clients are adapted as in FedRep.
"""

from trainers.algorithms.base import HParams
from trainers.algorithms.fedrep import FedRep
from utils.pytree import merge, split_head


class FedPer(FedRep):
    name = "fedper"

    def __init__(self, task, hp: HParams, weighted: bool = True):
        super().__init__(task, hp, weighted)

    @classmethod
    def from_options(cls, task, hp, options, text=None, **kwargs):
        # The text reference's FedPer averages uniformly, as its FeDEQ does.
        return cls(task, hp, weighted=not (text is not None and text.uniform_average))

    def second_phase(self, body, head, state, data, schedule, rng):
        params, state, sums = self.local_sgd(merge(body, head), {}, state, data, schedule, rng)
        body, head = split_head(params)
        return body, head, state, sums
