"""DAC's gate regulariser and pruning rule (dac_spec 2.2, 2.5).

The search model (`models.mobilenet_v2.mobilenet_v2(..., gated=True)`) has one active
gate vector w_b per block, on the expanded channels before the depthwise convolution.
The regulariser pushes each block's softmax(w_b) to low entropy and w_b into [0, 1]:

    rho * sum_b ( H(softmax(w_b)) + 0.1 * sum_i [max(0, -w_bi) + max(0, w_bi - 1)] )

with rho = --penalty_factor = 0.1, i.e. the report's lambda_1 = 0.1 and lambda_2 = 0.01.
A channel counts as removed when |w_bi| < threshold (0.1); a block keeps at least
`floor` (8) channels. DAC only counts the removed channels (its extraction of the
surviving indices is never called, bug 2.8.1); here the survivors are also recorded, so
a searched model can be cut from the full one channel for channel.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.mobilenet_v2 import FULL_BLOCKS, MIN_WIDTH, NUM_BLOCKS, MobileNetConfig, block_name

PENALTY_FACTOR = 0.1
BOUND_WEIGHT = 0.1
THRESHOLD = 0.1


def gate_vectors(params: dict) -> list[jnp.ndarray]:
    """The 17 active gate vectors, block order."""
    return [params[block_name(b)]["gate"] for b in range(NUM_BLOCKS)]


def entropy_term(w: jnp.ndarray) -> jnp.ndarray:
    p = jax.nn.softmax(w)
    return -jnp.sum(p * jax.nn.log_softmax(w))


def bound_term(w: jnp.ndarray) -> jnp.ndarray:
    return jnp.sum(jax.nn.relu(-w) + jax.nn.relu(w - 1.0))


def gate_penalty(params: dict, penalty_factor: float = PENALTY_FACTOR,
                 bound_weight: float = BOUND_WEIGHT) -> jnp.ndarray:
    return penalty_factor * sum(entropy_term(w) + bound_weight * bound_term(w)
                                for w in gate_vectors(params))


def surviving_channels(w: Any, threshold: float = THRESHOLD, floor: int = MIN_WIDTH
                       ) -> np.ndarray:
    """Sorted indices with |w_i| >= threshold; when fewer than `floor` survive, the
    `floor` largest |w_i| (ties to the lower index). DAC's width max(e - z, 8) says how
    many, not which: the largest magnitudes are our choice (docs/DEVIATIONS.md)."""
    magnitude = np.abs(np.asarray(w, np.float64))
    keep = np.flatnonzero(magnitude >= threshold)
    if len(keep) < floor:
        keep = np.sort(np.argsort(-magnitude, kind="stable")[:min(floor, len(magnitude))])
    return keep


def pruned_config(params: dict, threshold: float = THRESHOLD, floor: int = MIN_WIDTH
                  ) -> tuple[MobileNetConfig, list[list[int]]]:
    """The configuration the gates describe (e'_b = max(e_b - z_b, floor)) and the
    channel indices each block keeps."""
    channels = [surviving_channels(w, threshold, floor).tolist()
                for w in gate_vectors(params)]
    for b, kept in enumerate(channels):
        if len(kept) > FULL_BLOCKS[b][0]:
            raise ValueError(f"block {b}: {len(kept)} gates for {FULL_BLOCKS[b][0]} channels")
    return MobileNetConfig.from_expansions([len(c) for c in channels]), channels
