"""Builds InCo's federations (HeteroAvg, InCoAvg, HeteroProx, ...) from settings: one
base algorithm per tier with that tier's task, the group assignment, and InCo's server
transform for the server model's family."""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.stage_resnet import STAGE_SPLITS, inco_pairs
from models.vit import VIT_SPLITS, vit_inco_pairs
from trainers.algorithms.base import HParams
from trainers.algorithms.submodel_federation import SubModelFederation, inco_groups
from trainers.names import SUBMODEL_TRAINERS
from trainers.registry import AlgorithmOptions, build_algorithm
from trainers.server_transforms import InCoConfig, inco_mix


def inco_transform(server_model: str, cfg: InCoConfig) -> Callable[[dict, dict], dict]:
    """InCo's mixing of the averaged update for the server model's family (inco_spec
    5.2: ResNet conv kernels per 3x3 slice; 5.3: the ViT's norm2 scales as vectors)."""
    if server_model in STAGE_SPLITS:
        pairs, leaf, axes = inco_pairs(STAGE_SPLITS[server_model]), "w", (0, 1)
    elif server_model in VIT_SPLITS:
        pairs, leaf, axes = vit_inco_pairs(VIT_SPLITS[server_model]), "scale", None
    else:
        raise ValueError(f"InCo needs a stage-split ResNet or a layer-split ViT as the server "
                         f"model; got {server_model!r} (allowed: "
                         f"{', '.join([*STAGE_SPLITS, *VIT_SPLITS])})")

    def transform(server: dict, delta: dict) -> dict:
        del server
        return {**delta, "params": inco_mix(delta["params"], pairs, leaf, axes, cfg)}

    return transform


def build_submodel_federation(trainer: str, tier_models: Sequence[str],
                              tasks: Sequence[Any], hp: HParams, options: AlgorithmOptions,
                              inco: InCoConfig, num_clients: int, example_x: Any
                              ) -> SubModelFederation:
    """`tier_models`/`tasks`: smallest first, the server model last. ViT clients divide
    their delta by the local epochs, as InCo's ViT code does (inco_spec 4)."""
    base_name, with_inco = SUBMODEL_TRAINERS[trainer]
    transforms = ((inco_transform(tier_models[-1], inco),)
                  if with_inco and inco.mode != "none" else ())
    bases = [build_algorithm(base_name, task, hp, options, transforms=transforms)
             for task in tasks]
    for base in bases:
        base.integer_mean = "trunc"   # InCo truncates its averaged counters (5.4)
    scale = 1.0 / hp.local_epochs if tier_models[-1] in VIT_SPLITS else 1.0
    federation = SubModelFederation(bases, list(tier_models),
                                    inco_groups(num_clients, len(tier_models)), example_x,
                                    upload_scale=scale)
    federation.name = trainer
    return federation


def tier_counts(federation: SubModelFederation) -> dict[str, int]:
    counts = np.bincount(federation.tier_of, minlength=len(federation.tier_names))
    return dict(zip(federation.tier_names, counts.tolist(), strict=True))


def submodel_lines(federation: SubModelFederation, input_shape: tuple[int, ...]) -> str:
    """What a run prints at start: every tier's model, parameter count, share of the
    server model and number of clients."""
    x = jnp.zeros((2, *input_shape), jnp.float32)
    counts = tier_counts(federation)
    sizes = []
    for base in federation.bases:
        params, _ = jax.eval_shape(base.task.model.init, jax.random.PRNGKey(0), x)
        sizes.append(sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)))
    lines = ["sub-models (smallest first, server last):"]
    for name, size in zip(federation.tier_names, sizes, strict=True):
        lines.append(f"  {name:10s} {size:>12,} params ({size / sizes[-1]:.3f} of the server "
                     f"model), {counts[name]} clients")
    return "\n".join(lines)
