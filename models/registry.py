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
from models.mobilenet_v2 import MobileNetConfig, mobilenet_v2
from models.resnet import resnet20_femnist, resnet34_cifar
from models.stage_resnet import STAGE_SPLITS, stage_resnet
from models.transformer import transformer8
from models.vit import VIT_SPLITS, vit


@dataclass(frozen=True)
class ModelSpec:
    """A model ready for the engine: `transformed.apply(params, state, rng, x, is_training,
    probe) -> (ModelOutput, state)`."""

    name: str
    transformed: hk.TransformedWithState
    is_deq: bool
    # Initialise in one compiled program rather than op by op (MobileNet-V2's 17 blocks
    # take ~30 s eagerly on a CPU). Off for the older models, whose eager initial values
    # the parity checks were taken with.
    jit_init: bool = False

    def init(self, rng: jax.Array, example_x: jnp.ndarray) -> tuple[hk.Params, hk.State]:
        if self.jit_init:
            return jax.jit(self.transformed.init, static_argnums=2)(rng, example_x, True)
        return self.transformed.init(rng, example_x, True)


DEQ_RESNET_WIDTHS = {"deq_resnet_s": (64, 128), "deq_resnet_m": (128, 256)}
"""(stem width c1, hidden width c2) of the DEQ-ResNets (spec 5.1)."""


@dataclass(frozen=True)
class _Entry:
    # (classes, solver, eval dropout), plus (patch size, image size) when `vit`
    build: Callable[..., Callable]
    is_deq: bool
    input_ranks: tuple[int, ...]  # example ranks the model accepts: 3 for images, 1 for vectors
    vit: bool = False  # takes build_model's vit_patch_size and vit_image_size


_MODELS: dict[str, _Entry] = {
    "deq_mlp": _Entry(lambda c, s, d: deq_mlp(c, s), True, (1, 2, 3)),
    "deq_resnet_s": _Entry(lambda c, s, d: deq_resnet(*DEQ_RESNET_WIDTHS["deq_resnet_s"], c, s),
                           True, (3,)),
    "deq_resnet_m": _Entry(lambda c, s, d: deq_resnet(*DEQ_RESNET_WIDTHS["deq_resnet_m"], c, s),
                           True, (3,)),
    "resnet20": _Entry(lambda c, s, d: resnet20_femnist(c, s.fast_conv), False, (3,)),
    "resnet34": _Entry(lambda c, s, d: resnet34_cifar(c, fast_conv=s.fast_conv), False,
                       (3,)),
    # Token sequences (B, T); num_classes is the vocabulary (90). The DEQ-Transformer
    # ignores the solver flags, as the reference does: it always runs its own Broyden.
    # Only these two have dropout, which the reference leaves on at evaluation.
    "transformer8": _Entry(lambda c, s, d: transformer8(c, dropout_at_eval=d), False, (1,)),
    "deq_transformer": _Entry(lambda c, s, d: deq_transformer(c, dropout_at_eval=d), True,
                              (1,)),
    # InCo's client models (spec 1.1-1.2): two nested families, each model a prefix of
    # the family's largest (server) model. Default arguments pin each loop's value.
    **{name: _Entry(lambda c, s, d, b=blocks: stage_resnet(c, b, fast_conv=s.fast_conv),
                    False, (3,))
       for name, blocks in STAGE_SPLITS.items()},
    **{name: _Entry(lambda c, s, d, p, i, k=depth: vit(c, k, patch_size=p, image_size=i),
                    False, (3,), vit=True)
       for name, depth in VIT_SPLITS.items()},
    # DAC's CIFAR MobileNet-V2 (dac_spec 1), full widths; searched and width-multiplier
    # configurations are built with `build_mobilenet`.
    "mobilenet_v2": _Entry(lambda c, s, d: mobilenet_v2(c), False, (3,)),
}
MODELS = tuple(_MODELS)
DEQ_MODELS = tuple(name for name, entry in _MODELS.items() if entry.is_deq)

_FAMILIES = (tuple(STAGE_SPLITS), tuple(VIT_SPLITS))  # smallest first, server model last


def build_model(name: str, *, num_classes: int, input_shape: tuple[int, ...],
                solver: SolverConfig | None = None, dropout_at_eval: bool = True,
                vit_patch_size: int = 4, vit_image_size: int = 32) -> ModelSpec:
    """Builds a model, failing early with the allowed names when it cannot fit the data.

    `dropout_at_eval` (models with dropout only): keep dropout on in evaluation forward
    passes, as the reference's transformers do. `vit_patch_size` / `vit_image_size`
    (ViTs only): the paper's 16 / 224 is too slow on a CPU, so the defaults keep 32x32
    images as they are with 4x4 patches; smaller images are resized inside the model."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
    entry = _MODELS[name]
    if len(input_shape) not in entry.input_ranks:
        raise ValueError(f"model {name!r} takes inputs of rank {entry.input_ranks}, but the "
                         f"dataset's examples have shape {input_shape}")
    args = (num_classes, solver or SolverConfig(), dropout_at_eval)
    if entry.vit:
        if max(input_shape[:2]) > vit_image_size:
            raise ValueError(f"model {name!r} is built for {vit_image_size}x{vit_image_size} "
                             f"images, but the dataset's examples have shape {input_shape}")
        forward = entry.build(*args, vit_patch_size, vit_image_size)
    else:
        forward = entry.build(*args)
    return ModelSpec(name, hk.transform_with_state(forward), entry.is_deq,
                     jit_init=name == "mobilenet_v2")


def build_mobilenet(cfg: MobileNetConfig, num_classes: int, name: str = "mobilenet_v2"
                    ) -> ModelSpec:
    """A MobileNet-V2 of any configuration (a DAC snapshot, a width multiplier)."""
    return ModelSpec(name, hk.transform_with_state(mobilenet_v2(num_classes, cfg)), False,
                     jit_init=True)


def submodel_family(name: str) -> tuple[str, ...] | None:
    """The InCo family `name` belongs to (smallest model first, server model last), or
    None for a model that has no sub-models."""
    return next((family for family in _FAMILIES if name in family), None)


def is_head(module_name: str) -> bool:
    return HEAD_MARKER in module_name
