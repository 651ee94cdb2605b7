"""Model names -> Haiku transforms, and which parameters are the personal head."""

from collections.abc import Callable
from dataclasses import dataclass

import haiku as hk
import jax
import jax.numpy as jnp

from deq.config import SolverConfig
from models.base import HEAD_MARKER
from models.deq_mlp import deq_mlp
from models.deq_resnet import deq_resnet
from models.deq_transformer import deq_transformer
from models.resnet import resnet20_femnist, resnet34_cifar
from models.transformer import transformer8


@dataclass(frozen=True)
class ModelSpec:
    """A model ready for the engine: `transformed.apply(params, state, rng, x, is_training,
    probe) -> (ModelOutput, state)`."""

    name: str
    transformed: hk.TransformedWithState
    is_deq: bool

    def init(self, rng: jax.Array, example_x: jnp.ndarray) -> tuple[hk.Params, hk.State]:
        return self.transformed.init(rng, example_x, True)


@dataclass(frozen=True)
class _Entry:
    build: Callable[[int, SolverConfig, bool], Callable]  # (classes, solver, eval dropout)
    is_deq: bool
    input_ranks: tuple[int, ...]  # example ranks the model accepts: 3 for images, 1 for vectors


_MODELS: dict[str, _Entry] = {
    "deq_mlp": _Entry(lambda c, s, d: deq_mlp(c, s), True, (1, 2, 3)),
    "deq_resnet_s": _Entry(lambda c, s, d: deq_resnet(64, 128, c, s), True, (3,)),
    "deq_resnet_m": _Entry(lambda c, s, d: deq_resnet(128, 256, c, s), True, (3,)),
    "resnet20": _Entry(lambda c, s, d: resnet20_femnist(c), False, (3,)),
    "resnet34": _Entry(lambda c, s, d: resnet34_cifar(c), False, (3,)),
    # Token sequences (B, T); num_classes is the vocabulary (90). The DEQ-Transformer
    # ignores the solver flags, as the reference does: it always runs its own Broyden.
    # Only these two have dropout, which the reference leaves on at evaluation.
    "transformer8": _Entry(lambda c, s, d: transformer8(c, dropout_at_eval=d), False, (1,)),
    "deq_transformer": _Entry(lambda c, s, d: deq_transformer(c, dropout_at_eval=d), True,
                              (1,)),
}
MODELS = tuple(_MODELS)


def build_model(name: str, *, num_classes: int, input_shape: tuple[int, ...],
                solver: SolverConfig | None = None, dropout_at_eval: bool = True
                ) -> ModelSpec:
    """Builds a model, failing early with the allowed names when it cannot fit the data.

    `dropout_at_eval` (models with dropout only): keep dropout on in evaluation forward
    passes, as the reference's transformers do."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
    entry = _MODELS[name]
    if len(input_shape) not in entry.input_ranks:
        raise ValueError(f"model {name!r} takes inputs of rank {entry.input_ranks}, but the "
                         f"dataset's examples have shape {input_shape}")
    forward = entry.build(num_classes, solver or SolverConfig(), dropout_at_eval)
    return ModelSpec(name, hk.transform_with_state(forward), entry.is_deq)


def is_head(module_name: str) -> bool:
    return HEAD_MARKER in module_name
