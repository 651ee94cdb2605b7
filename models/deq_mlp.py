"""A small DEQ-MLP for the embedded synthetic dataset: the whole FeDEQ pipeline in seconds.

f(z, u) = tanh(LayerNorm(z W) + u) is a contraction at initialisation (W is small), so the
same Anderson forward and normal-CG backward as the DEQ-ResNets apply unchanged.
"""

from collections.abc import Callable

import haiku as hk
import jax
import jax.numpy as jnp

from deq.budget import SolverBudget
from deq.budget import caps_only as _caps_only
from deq.config import SolverConfig
from deq.fixed_point import fixed_point
from models.base import ModelOutput


def _mlp_block(p: dict, z: jnp.ndarray, u: jnp.ndarray) -> jnp.ndarray:
    h = z @ p["w"]
    mean = jnp.mean(h, axis=-1, keepdims=True)
    h = (h - mean) * jax.lax.rsqrt(jnp.var(h, axis=-1, keepdims=True) + 1e-5)
    return jnp.tanh(h * p["scale"] + p["offset"] + u)


def deq_mlp(num_classes: int, solver: SolverConfig, width: int = 64) -> Callable:
    """Input -> linear injection u -> equilibrium z* -> linear -> `player_logits`."""

    def forward(x: jnp.ndarray, is_training: bool, probe: jnp.ndarray | None = None,
                budget: SolverBudget | None = None) -> ModelOutput:
        del is_training
        x = x.reshape(x.shape[0], -1)
        u = hk.Linear(width, name="injection")(x)
        get = lambda name, shape, init: hk.get_parameter(name, shape, jnp.float32, init=init)
        with hk.experimental.name_scope("deq_block"):
            params = {
                "w": get("w", (width, width), hk.initializers.RandomNormal(0.3 / width**0.5)),
                "scale": get("scale", (width,), hk.initializers.Constant(0.5)),
                "offset": get("offset", (width,), hk.initializers.Constant(0.0)),
            }
        z, stats = fixed_point(_mlp_block, params, u, jnp.zeros_like(u), probe, solver,
                                _caps_only(budget))
        embedding = jax.nn.relu(hk.Linear(width, name="linear")(z))
        logits = hk.Linear(num_classes, name="player_logits")(embedding)
        return ModelOutput(logits, embedding, stats)

    return forward
