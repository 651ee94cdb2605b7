"""What every model returns, so that algorithms never need to know which model runs."""

from typing import NamedTuple

import jax.numpy as jnp

from deq.stats import SolverStats

HEAD_MARKER = "player"
"""A parameter is personal (head) when its Haiku module name contains this substring.

This is the reference's rule (`last_layers = "player"`); section 5 of the spec lists
what it covers for each model.
"""


class ModelOutput(NamedTuple):
    logits: jnp.ndarray
    embedding: jnp.ndarray
    solver_stats: SolverStats
