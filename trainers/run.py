"""From validated settings to finished run directories (one per repeat)."""


import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data.augment import make_augmentation
from data.cifar import CIFAR_INPUT_SHAPE
from data.dac import DAC_PARTITIONS, dac_partition
from data.errors import DataError
from data.fmnist import FMNIST_INPUT_SHAPE
from data.inco import INCO_DATASETS, inco_augmentation, inco_stats
from data.leaf import FEMNIST_INPUT_SHAPE, FEMNIST_NUM_CLASSES
from data.partition import shards_per_class
from data.registry import DATASETS, dataset_partitions, load_dataset
from data.shakespeare import SEQ_LEN, VOCAB_SIZE
from deq.config import SolverConfig
from models.deq_cost import deq_resnet_cost
from models.deq_resnet import hidden_channels
from models.deq_transformer import DEQ_TRANSFORMER_SOLVER
from models.registry import (
    DEQ_MODELS,
    DEQ_RESNET_WIDTHS,
    MODELS,
    build_mobilenet,
    build_model,
    submodel_family,
)
from models.vit import VIT_SPLITS, load_vit_weights
from trainers.algorithms.base import HParams
from trainers.algorithms.deq_tiers import DeqTiers
from trainers.algorithms.fedeq import FedEQConfig
from trainers.channel_setup import (
    budget_tiers,
    build_channel_federation,
    channel_tier_lines,
    parse_budgets,
    server_config,
    width_tiers,
)
from trainers.deq_tier_table import assign_tiers, parse_tiers, tiers_json
from trainers.engine import Engine, RunConfig
from trainers.names import SUBMODEL_TRAINERS
from trainers.registry import (
    TRAINERS,
    AlgorithmOptions,
    TextOptions,
    build_algorithm,
    resolve_trainer,
)
from trainers.server_transforms import InCoConfig
from trainers.submodel_setup import build_submodel_federation, submodel_lines
from trainers.task import make_task
from utils import checkpoint
from utils.distributed import is_writer
from utils.input_error import InputError, input_errors
from utils.rundir import RunDir, atomic_write

_DEFAULT_CLIENTS = {"synthetic": 30, "femnist": 100, "cifar10": 100, "cifar100": 100,
                    "shakespeare": 200}
_DEFAULT_ROUNDS = {"synthetic": 30}
_TEXT_DATASETS = frozenset({"shakespeare"})
# Flags that may differ when a run is resumed: none of them changes a trained number
# (a larger --num_rounds extends a finished run).
# (A process's index and the coordinator's address differ between the processes of one
# run and between its starts.)
_RESUMABLE_CHANGES = frozenset({"outdir", "quiet", "num_rounds", "checkpoint_every", "repeat",
                                "rescore_unchanged", "repeat_mode", "process_id",
                                "coordinator"})


@dataclass(frozen=True)
class RunRequest:
    trainer: str
    model: str
    dataset: str
    data_dir: str
    num_clients: int
    outdir: str
    repeat: int
    frac_unseen: float
    run: RunConfig
    hp: HParams
    solver: SolverConfig
    options: AlgorithmOptions
    l2_reg: float
    flags: dict
    data_kwargs: dict = field(default_factory=dict)  # labels per client, source, partition
    submodels: tuple[str, ...] = ()   # InCo: the tiers' models, server last; () otherwise
    channel_tiers: tuple = ()         # DAC / HeteroFL: ChannelTiers, smallest first
    solver_tiers: tuple = ()          # FeDEQ compute tiers (--tiers), as given
    tier_assignment: str = "groups"
    eval_maxiter: int | None = None
    inco: InCoConfig = InCoConfig()
    augment: str = "none"
    model_kwargs: dict = field(default_factory=dict)  # ViT patch and image size
    vit_weights: str | None = None
    repeat_mode: str = "in_process"
    argv: tuple[str, ...] = ()  # the command line, rerun per repeat in "subprocess" mode

    @staticmethod
    def from_flags(f: Any, default_model, default_outdir) -> "RunRequest":
        """Checks every flag before any work, with a message that says what is allowed."""
        with input_errors():
            entry = resolve_trainer(f.trainer)  # raises with the allowed names
        dataset = f.dataset
        _check(dataset in DATASETS, f"--dataset {dataset!r} is not a dataset; allowed: "
               f"{', '.join(DATASETS)}")
        _check(entry.family != "text" or dataset in _TEXT_DATASETS,
               f"--trainer {f.trainer} is a text trainer and {dataset} is not a text dataset; "
               f"use the trainer without the _seq suffix (e.g. "
               f"{f.trainer.removesuffix('_seq')}) for {dataset}")
        # A vision trainer would run on text without the reference's text settings.
        text_twin = f"{entry.algorithm.name}_seq"
        _check(entry.family == "text" or dataset not in _TEXT_DATASETS,
               f"--trainer {f.trainer} is a vision trainer and {dataset} is a text dataset; "
               + (f"use {text_twin}" if text_twin in TRAINERS and f.trainer not in
                  SUBMODEL_TRAINERS else "text trainers: "
                  + ", ".join(t for t in TRAINERS if t.endswith("_seq"))))
        _check(f.num_clients is None or f.num_clients >= 1,
               f"--num_clients must be >= 1, got {f.num_clients}")
        num_clients = f.num_clients or _DEFAULT_CLIENTS.get(dataset, 100)
        rounds = f.num_rounds if f.num_rounds is not None else _DEFAULT_ROUNDS.get(dataset, 400)
        channel_tiers = _channel_tiers(f)
        model = f.model or ("mobilenet_v2" if channel_tiers else default_model(dataset,
                                                                                f.trainer))
        _check(0 < f.clients_per_round <= 1, f"--clients_per_round must be in (0, 1], got "
               f"{f.clients_per_round}")
        _check(0 <= f.frac_unseen < 1, f"--frac_unseen must be in [0, 1), got {f.frac_unseen}")
        _check(int(f.frac_unseen * num_clients) < num_clients,
               "--frac_unseen leaves no seen client")
        _check(rounds >= 0, f"--num_rounds must be >= 0, got {rounds}")
        _check(f.eval_every >= 1, f"--eval_every must be >= 1, got {f.eval_every}")
        _check(f.eval_train_every >= 0, "--eval_train_every must be >= 0 (0: never score the "
               f"train split), got {f.eval_train_every}")
        _check(f.batch_size == -1 or f.batch_size >= 1, "--batch_size must be >= 1 or -1 (the "
               f"whole client), got {f.batch_size}")
        _check(f.inner_epochs >= 1, f"--inner_epochs must be >= 1, got {f.inner_epochs}")
        _check(f.personalized_epochs >= 0,
               f"--personalized_epochs must be >= 0, got {f.personalized_epochs}")
        _check(f.repeat >= 1, f"--repeat must be >= 1, got {f.repeat}")
        _check(0 <= f.seed and f.seed + 1000 * (f.repeat - 1) < 2**32, "--seed must be in "
               f"[0, 2**32) for every repeat (seed + 1000 k), got {f.seed} with --repeat "
               f"{f.repeat}")
        _check(f.checkpoint_every >= 0, "--checkpoint_every must be >= 0 (0: only the last)")
        _check(f.learning_rate > 0, f"--learning_rate must be > 0, got {f.learning_rate}")
        _check(f.labels_per_client >= 1,
               f"--labels_per_client must be >= 1, got {f.labels_per_client}")
        _check(f.rho > 0, f"--rho must be > 0, got {f.rho}")
        _check((f.fwd_maxiter is None and f.fwd_tol is None) or model != "deq_transformer",
               "--fwd_maxiter / --fwd_tol: the DEQ-Transformer runs its own Broyden with "
               "the reference's settings (spec 5.5) and ignores solver flags; drop them")
        ditto_lambda = getattr(f, "lambda")
        _check(ditto_lambda >= 0, f"--lambda (Ditto) must be >= 0, got {ditto_lambda}")
        _check(0 <= f.finetune_frac <= 1,
               f"--finetune_frac must be in [0, 1], got {f.finetune_frac}")
        _check(f.knn_neighbors >= 1, f"--knn_neighbors must be >= 1, got {f.knn_neighbors}")
        _check(0 <= f.knn_lam <= 1, f"--knn_lam must be in [0, 1], got {f.knn_lam}")
        submodels = () if channel_tiers else _submodels(f, model, f.trainer)
        _check_models(f, submodels or (model,), dataset, bool(submodels))
        partition = f.partition or ("hetero-fixed" if submodels else "dac-iid"
                                    if channel_tiers else dataset_partitions(dataset)[0])
        _check_partition(f, dataset, partition, num_clients)
        vit = (submodels[-1] if submodels else model) in VIT_SPLITS
        optimizer = f.optimizer or ("adam" if submodels and not vit else "sgd")
        # DAC's clients: momentum 0.5, hard-coded in its code (dac_spec 4.1)
        momentum = f.momentum if f.momentum is not None else (
            0.9 if vit else 0.5 if channel_tiers else 0.0)
        weight_decay = f.weight_decay if f.weight_decay is not None else (1e-5 if vit else 0.0)
        augment = f.augment
        if augment == "auto":
            augment = inco_augmentation(dataset) if partition != "shards" else "none"
        if vit and f.augment == "auto":
            augment = "none"  # InCo's ViT pipeline (RandomResizedCrop to 224) is not built
        _check(f.inco_clamp_max > 0, "--inco_clamp_max must be > 0")
        _check(f.inco_clip >= 0, "--inco_clip must be >= 0 (0: no clip)")
        _check(f.prox_mu >= 0, "--prox_mu must be >= 0")
        _check(f.moon_mu >= 0, "--moon_mu must be >= 0")
        _check(f.moon_temperature > 0, "--moon_temperature must be > 0")
        _check(f.alpha > 0 and math.isfinite(f.alpha), f"--alpha must be a number > 0, got "
               f"{f.alpha}")
        _check(not f.vit_weights or vit, f"--vit_weights is read only for a ViT "
               f"({', '.join(VIT_SPLITS)}), not --model {model}")
        _check(not f.vit_weights or os.path.isfile(f.vit_weights),
               f"--vit_weights {f.vit_weights}: no such file; pass an .npz of ViT-S weights "
               f"(timm or AugReg names), or leave the flag out to train from scratch")
        processes = jax.process_count()   # after utils.distributed.initialize
        executor = f.executor or ("sharded" if processes > 1 else "")
        _check(processes == 1 or executor == "sharded",
               f"--executor {f.executor} with {processes} processes would run every client "
               f"in each of them; use --executor sharded (the default with several)")
        _check(f.device_executor is None or executor == "sharded",
               f"--device_executor {f.device_executor} is read only with --executor sharded")
        _check(processes == 1 or f.repeat == 1 or f.repeat_mode == "in_process",
               "--repeat_mode subprocess cannot start repeats of a multi-process run; use "
               "--repeat_mode in_process")
        # The flags main.py defines (absl's own logging flags are left out).
        flag_values = {fl.name: fl.value
                       for fl in f.get_key_flags_for_module(sys.modules["__main__"])}
        return RunRequest(
            trainer=f.trainer, model=model, dataset=dataset, data_dir=f.data_dir,
            num_clients=num_clients,
            outdir=f.outdir or default_outdir(f.trainer, dataset, num_clients, model),
            repeat=f.repeat, frac_unseen=f.frac_unseen,
            run=RunConfig(num_rounds=rounds, seed=f.seed, clients_per_round=f.clients_per_round,
                          batch_size=f.batch_size, eval_every=f.eval_every,
                          eval_train_every=f.eval_train_every,
                          executor=executor, device_executor=f.device_executor or "",
                          eval_chunk=f.eval_chunk, quiet=f.quiet or not is_writer(),
                          checkpoint_every=f.checkpoint_every, upload_dtype=f.upload_dtype,
                          rescore_unchanged=f.rescore_unchanged,
                          reference_losses=f.reference_losses,
                          global_eval_drop_last=f.global_eval_drop_last),
            hp=HParams(lr=f.learning_rate, local_epochs=f.inner_epochs,
                       personal_epochs=f.personalized_epochs,
                       weighted=not f.unweighted_updates, optimizer=optimizer,
                       momentum=momentum, weight_decay=weight_decay,
                       random_epochs=f.random_epoch),
            solver=SolverConfig(fwd_solver=f.fwd_solver, bwd_solver=f.bwd_solver,
                                fwd_maxiter=f.fwd_maxiter, fwd_tol=f.fwd_tol,
                                fast_conv=f.fast_conv, anderson_impl=f.anderson_impl),
            options=AlgorithmOptions(
                fedeq=FedEQConfig(rho=f.rho,
                                  lam_init=f.lam_admm if f.fedeq_lam_init_vision else 0.0,
                                  dual_in_average=f.fedeq_dual_average),
                ditto_lambda=ditto_lambda, ditto_reference_start=f.ditto_reference_start,
                finetune_frac=f.finetune_frac, num_rounds=rounds,
                knn_lam=f.knn_lam, knn_neighbors=f.knn_neighbors, lam_admm=f.lam_admm,
                prox_mu=f.prox_mu, moon_mu=f.moon_mu, moon_temperature=f.moon_temperature,
                text=TextOptions(
                    sample_with_replacement=f.text_sample_with_replacement,
                    uniform_average=f.text_uniform_average,
                    admm_per_token=f.text_admm_per_token,
                    acc_ignores_padding=f.text_acc_ignores_padding,
                    eval_dropout=f.text_eval_dropout)),
            l2_reg=f.l2_reg,
            flags={**flag_values, "model": model, "num_clients": num_clients,
                   "num_rounds": rounds},
            data_kwargs={"labels_per_client": f.labels_per_client,
                         "source": "tfds" if f.data_source == "tfds" else "pickle",
                         "partition": partition, "alpha": f.alpha,
                         "partition_file": f.partition_file},
            submodels=submodels, channel_tiers=channel_tiers,
            solver_tiers=_solver_tiers(f, model, bool(submodels or channel_tiers)),
            tier_assignment=f.tier_assignment, eval_maxiter=f.eval_maxiter,
            inco=InCoConfig(mode=f.inco_mode, clamp_max=f.inco_clamp_max,
                            clip=f.inco_clip or None),
            augment=augment,
            model_kwargs={"vit_patch_size": f.vit_patch_size,
                          "vit_image_size": f.vit_image_size},
            vit_weights=f.vit_weights,
            repeat_mode=f.repeat_mode, argv=tuple(sys.argv),
        )




def _submodels(f: Any, model: str, trainer: str) -> tuple[str, ...]:
    """InCo's tiers: --submodels, or the family of the (server) model."""
    if trainer not in SUBMODEL_TRAINERS:
        _check(not f.submodels, f"--submodels is for InCo's trainers "
               f"({', '.join(SUBMODEL_TRAINERS)}), not --trainer {trainer}")
        return ()
    if f.submodels:
        names = tuple(n.strip() for n in f.submodels.split(",") if n.strip())
    else:
        names = submodel_family(model) or ()
    _check(bool(names), f"--trainer {trainer} needs sub-models: pass --model resnet26 or "
           f"vit_s12 (a family's server model) or --submodels")
    families = sorted({fam for m in MODELS if (fam := submodel_family(m))}, key=str)
    listed = " or ".join(",".join(fam) for fam in families)
    for name in names:
        _check(submodel_family(name) is not None,
               f"--submodels {','.join(names)}: {name!r} is not a sub-model; allowed: one "
               f"family, smallest first and its server model last, e.g. {listed}")
    family = submodel_family(names[-1])
    for name in names:
        _check(family is not None and name in family,
               f"--submodels {','.join(names)}: {name} is not a sub-model of {names[-1]}; "
               f"allowed: {', '.join(family or ('resnet10..resnet26', 'vit_s8..vit_s12'))}")
    _check(list(names) == sorted(names, key=family.index),
           f"--submodels must go from the smallest model to the server model; got "
           f"{','.join(names)}")
    return names


# What each dataset's examples are (classes, shape of one example), so that --model can be
# checked before any file is read (tests/test_bad_inputs.py compares it with the loaders).
DATASET_SHAPES: dict[str, tuple[int, tuple[int, ...]]] = {
    "synthetic": (10, (60,)),
    "femnist": (FEMNIST_NUM_CLASSES, FEMNIST_INPUT_SHAPE),
    "cifar10": (10, CIFAR_INPUT_SHAPE),
    "cifar100": (100, CIFAR_INPUT_SHAPE),
    "shakespeare": (VOCAB_SIZE, (SEQ_LEN,)),
    "fmnist": (10, FMNIST_INPUT_SHAPE),
    "svhn": (10, CIFAR_INPUT_SHAPE),
    "cinic10": (10, CIFAR_INPUT_SHAPE),
}


def _misfit(name: str, dataset: str, model_kwargs: dict) -> str | None:
    """Why model `name` cannot be built for `dataset`'s examples, or None if it can."""
    num_classes, input_shape = DATASET_SHAPES[dataset]
    try:
        build_model(name, num_classes=num_classes, input_shape=input_shape, **model_kwargs)
    except ValueError as err:
        return str(err).split(";")[0]  # the reason, not advice meant for the code's callers
    return None


def _check_models(f: Any, names: tuple[str, ...], dataset: str, submodels: bool) -> None:
    """Every model the run builds exists and fits the dataset; if one does not, say which
    models do fit it."""
    for name in names:
        _check(name in MODELS, f"--model {name!r} is not a model; allowed: {', '.join(MODELS)}")
    _check(f.vit_patch_size >= 1 and f.vit_image_size >= 1
           and f.vit_image_size % f.vit_patch_size == 0,
           f"--vit_image_size ({f.vit_image_size}) must be a positive multiple of "
           f"--vit_patch_size ({f.vit_patch_size})")
    kwargs = {"vit_patch_size": f.vit_patch_size, "vit_image_size": f.vit_image_size}
    num_classes, shape = DATASET_SHAPES[dataset]
    for name in names:
        reason = _misfit(name, dataset, kwargs)
        if reason is None:
            continue
        candidates = [m for m in MODELS if not submodels or submodel_family(m)]
        fit = [m for m in candidates if _misfit(m, dataset, kwargs) is None]
        what = "--submodels" if submodels and f.submodels else "--model"
        raise InputError(
            f"{what} {name} does not fit --dataset {dataset} ({num_classes} classes, examples "
            f"of shape {shape}): {reason}; models that fit {dataset}"
            f"{' (sub-model families)' if submodels else ''}: {', '.join(fit) or 'none'}")


def _check_partition(f: Any, dataset: str, partition: str, num_clients: int) -> None:
    """--partition, --partition_file, --data_source and the shard counts fit together."""
    supported = dataset_partitions(dataset)
    _check(partition in supported, f"--dataset {dataset} does not support --partition "
           f"{partition}; it supports {', '.join(supported)}")
    _check(f.partition_file is None or partition == "hetero-fixed",
           f"--partition_file is only read with --partition hetero-fixed, not --partition "
           f"{partition}; leave it out, or pass --partition hetero-fixed")
    _check(f.data_source == "files" or partition == "shards",
           f"--partition {partition} reads the official files; --data_source "
           f"{f.data_source} is only supported with --partition shards")
    if partition == "shards" and dataset in ("cifar10", "cifar100"):
        with input_errors("--num_clients and --labels_per_client: "):
            shards_per_class(num_clients, f.labels_per_client, DATASET_SHAPES[dataset][0])
    if partition in DAC_PARTITIONS:  # 50,000 CIFAR-10 training images
        with input_errors("--num_clients: "):
            dac_partition(np.zeros(50_000, np.int64), num_clients, partition, 0)


def _solver_tiers(f: Any, model: str, heterogeneous: bool) -> tuple:
    """FeDEQ's --tiers, checked against the model and solver they need."""
    if not f.tiers:
        _check(f.eval_maxiter is None, "--eval_maxiter is read only with --tiers")
        return ()
    _check(not heterogeneous, "--tiers gives DEQ clients solver and width tiers; it does "
           "not combine with sub-model or channel tiers (--submodels, --budgets)")
    _check(model in DEQ_MODELS, f"--tiers needs a DEQ model ({', '.join(DEQ_MODELS)}), not "
           f"--model {model}")
    _check(model == "deq_transformer" or (f.fwd_solver == "anderson"
                                          and f.anderson_impl == "batched"),
           "--tiers passes iteration caps as data, which needs the batched Anderson solver: "
           "--fwd_solver anderson --anderson_impl batched")
    _check(f.eval_maxiter is None or f.eval_maxiter >= 1, "--eval_maxiter must be >= 1")
    with input_errors():
        tiers = tuple(parse_tiers(f.tiers))
    widths = model in DEQ_RESNET_WIDTHS
    _check(widths or all(t.width == 1 for t in tiers), f"--tiers: {model}'s block has no "
           "width tiers; give every tier width 1 (caps and tolerances still apply)")
    if model == "deq_transformer":   # its Broyden's memory is sized by the static cap
        cap = DEQ_TRANSFORMER_SOLVER.maxiter
        _check(all((t.maxiter or cap) <= cap for t in tiers) and (f.eval_maxiter or 0) <= cap,
               f"--tiers / --eval_maxiter: the DEQ-Transformer's caps can be at most {cap}")
    return tiers


def _channel_tiers(f: Any) -> tuple:
    """DAC's budgets (--budgets + --dac_snapshots) or HeteroFL's --width_multipliers."""
    if not f.budgets and not f.width_multipliers:
        _check(not f.dac_snapshots, "--dac_snapshots is read only with --budgets")
        return ()
    _check(f.trainer in SUBMODEL_TRAINERS, f"--budgets / --width_multipliers need a sub-model "
           f"trainer ({', '.join(SUBMODEL_TRAINERS)}), not --trainer {f.trainer}")
    _check(not SUBMODEL_TRAINERS[f.trainer][1], f"--trainer {f.trainer}: InCo's "
           f"cross-layer mixing is defined for stage-split ResNets and ViTs, not MobileNet "
           f"tiers; use {f.trainer.replace('inco', 'hetero')}")
    _check(not (f.budgets and f.width_multipliers),
           "pass --budgets or --width_multipliers, not both")
    _check(not f.submodels, "--submodels (InCo's ResNets) cannot be combined with "
           "--budgets / --width_multipliers (MobileNet-V2 tiers)")
    _check(f.model in (None, "mobilenet_v2"), f"--budgets / --width_multipliers train "
           f"MobileNet-V2 tiers; drop -m {f.model} or pass -m mobilenet_v2")
    _check(f.dataset == "cifar10", f"MobileNet-V2 tiers are DAC's CIFAR-10 models; got "
           f"--dataset {f.dataset}")
    if f.width_multipliers:
        try:
            wms = [float(w) for w in f.width_multipliers]
        except ValueError:
            raise InputError(f"--width_multipliers takes numbers, got "
                             f"{','.join(f.width_multipliers)}") from None
        _check(all(0 < w <= 1 for w in wms), "--width_multipliers must lie in (0, 1]")
        return tuple(width_tiers(wms))
    _check(bool(f.dac_snapshots), "--budgets needs --dac_snapshots FILE (the search's "
           "snapshots.json: bash runners/dac/run_search.sh, or DAC's net_cfg.json)")
    with input_errors():  # parse_budgets says what --budgets takes
        budgets = parse_budgets(f.budgets)
    return tuple(budget_tiers(budgets, f.dac_snapshots))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InputError(message)


def _augmentation(req: RunRequest) -> Any:
    if req.augment == "none":
        return None
    mean, std = inco_stats(req.dataset) if req.dataset in INCO_DATASETS else ((0.0,), (1.0,))
    return make_augmentation(req.augment, mean, std)


def _build(req: RunRequest, seed: int) -> tuple[Any, Any, Any]:
    """(data, task, algorithm): everything a run needs that can fail on its input (files,
    a model that does not fit the data), built before any file is written."""
    data = load_dataset(req.dataset, req.data_dir, req.num_clients, req.frac_unseen, seed,
                        **req.data_kwargs)
    text = req.options.text
    augment = _augmentation(req)

    def task_for(name: str):
        with input_errors(f"--model {name} on --dataset {req.dataset}: "):
            model = build_model(name, num_classes=data.num_classes,
                                input_shape=data.input_shape, solver=req.solver,
                                dropout_at_eval=text.eval_dropout, **req.model_kwargs)
        return make_task(data.task, model, req.l2_reg, text.acc_ignores_padding, augment)

    if req.channel_tiers:
        def mobilenet_task(cfg, name):
            return make_task(data.task, build_mobilenet(cfg, data.num_classes, name),
                             req.l2_reg, text.acc_ignores_padding, augment)

        tiers = req.channel_tiers
        tasks = [mobilenet_task(t.config, t.name) for t in tiers]
        task = mobilenet_task(server_config(tiers)[0], "mobilenet_v2_server")
        algorithm = build_channel_federation(req.trainer, tiers, tasks, task, req.hp,
                                             req.options, data.num_clients,
                                             jnp.asarray(data.train[0].x[:2]))
        print(channel_tier_lines(tiers, algorithm), flush=True)
    elif req.submodels:
        tasks = [task_for(name) for name in req.submodels]
        task = tasks[-1]
        algorithm = build_submodel_federation(
            req.trainer, req.submodels, tasks, req.hp, req.options, req.inco,
            data.num_clients, jnp.asarray(data.train[0].x[:2]))
        print(submodel_lines(algorithm, data.input_shape), flush=True)
    else:
        task = task_for(req.model)
        algorithm = build_algorithm(req.trainer, task, req.hp, req.options)
        if req.solver_tiers:
            algorithm = build_deq_tiers(algorithm, req, data, seed)
            print(deq_tier_lines(algorithm), flush=True)
    seen = len(data.train)
    # The engine's own cohort size (it refuses an empty cohort with a plain ValueError).
    _check(algorithm.full_participation or int((req.run.clients_per_round * seen) // 1) >= 1,
           f"--clients_per_round {req.run.clients_per_round} samples no client out of the "
           f"{seen} seen clients; use a fraction in [{1 / max(seen, 1):.4g}, 1]")
    return data, task, algorithm


def build_deq_tiers(base: Any, req: RunRequest, data: Any, seed: int) -> DeqTiers:
    """The FeDEQ tier wrapper: tiers resolved against the run's solver and epochs,
    clients assigned, the MAC counter at each tier's width."""
    solver = DEQ_TRANSFORMER_SOLVER if req.model == "deq_transformer" else req.solver
    tiers = [t.resolved(solver.maxiter, solver.tol, solver.bwd_maxiter, req.hp.local_epochs,
                        solver.bwd_solver) for t in req.solver_tiers]
    tier_of = assign_tiers(len(data.train), len(tiers), req.tier_assignment, seed)
    widths = DEQ_RESNET_WIDTHS.get(req.model)
    costs = None
    if widths is not None:
        c1, c2 = widths
        costs = [deq_resnet_cost(tuple(data.input_shape), c1, len(hidden_channels(c2, t.width)),
                                 data.num_classes) for t in tiers]
    with input_errors():
        return DeqTiers(base, tiers, tier_of, widths[1] if widths else None,
                        solver.bwd_solver, req.eval_maxiter, costs)


def deq_tier_lines(alg: DeqTiers) -> str:
    counts = np.bincount(alg.tier_of, minlength=len(alg.tiers))
    lines = ["FeDEQ tiers (fwd cap / tol, bwd cap, width, epochs):"]
    for k, t in enumerate(alg.tiers):
        macs = (f", {alg.costs[k].forward(t.maxiter) / 1e6:.1f}M MACs/example at the cap"
                if alg.costs else "")
        lines.append(f"  {t.name:8s} {t.maxiter:>3d} / {t.tol:g}, {t.bwd_maxiter:>3d}, "
                     f"{t.width:g}, {t.epochs}: {counts[k]} clients{macs}")
    return "\n".join(lines)


def _engine(req: RunRequest, seed: int, built: tuple[Any, Any, Any],
            run_dir: RunDir | None) -> Engine:
    data, task, algorithm = built
    settings = {k: v for k, v in req.flags.items() if k not in _RESUMABLE_CHANGES}
    engine = Engine(data, task, algorithm, replace(req.run, seed=seed), run_dir,
                    settings={**settings, "seed": seed})
    if req.vit_weights:
        path = req.vit_weights
        engine.params_hook = lambda params: load_vit_weights(path, params)
    return engine


def build_engine(req: RunRequest, seed: int, run_dir: RunDir | None) -> Engine:
    built = _build(req, seed)
    _write_assignment(run_dir, built)
    return _engine(req, seed, built, run_dir)


def _write_assignment(run_dir: RunDir | None, built: tuple[Any, Any, Any]) -> None:
    """Which examples each client holds (partition.npz) and, with --tiers, the resolved
    tier table and every client's tier (tiers.json)."""
    if run_dir is None:
        return
    if built[0].partition is not None:
        run_dir.write_partition(built[0].partition)  # the clients this seed drew
    if isinstance(built[2], DeqTiers):
        text = tiers_json(built[2].tiers, built[2].tier_of)
        run_dir.on_release(lambda: atomic_write(run_dir.path / "tiers.json", text))


class RepeatFailed(RuntimeError):
    """A repeat run in its own process exited with an error. ``code`` 2 means the repeat
    refused its input and has printed the one error line itself."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _run_in_subprocess(req: RunRequest, k: int, seed: int, out: Path) -> dict:
    """Reruns this command for one repeat in a fresh interpreter (fork + exec, never a bare
    fork of a process whose JAX runtime has started); the later flags override the
    earlier ones. Its checkpoints make a rerun of the parent continue where it stopped."""
    command = [sys.executable, *req.argv, "--repeat=1", f"--seed={seed}", f"--outdir={out}",
               "--repeat_mode=in_process"]
    code = subprocess.run(command, check=False).returncode
    if code != 0:
        raise RepeatFailed(f"repeat {k} (seed {seed}) exited with code {code}; its run "
                           f"directory {out} keeps its last checkpoint: rerun the same "
                           f"command to continue", code)
    return json.loads((out / "summary.json").read_text())


class _Start:
    """What one start of a run creates, so that a start refused for its input (a data
    error found late, e.g. in --vit_weights) removes the folders it made. A folder that
    existed before, or that holds a checkpoint, is never removed."""

    def __init__(self, outdir: Path):
        path = outdir.absolute()
        # Only the writing process creates folders, so only it may remove them.
        self.created = next((p for p in [*reversed(path.parents), path] if not p.exists()),
                            None) if is_writer() else None

    def discard(self) -> None:
        made = self.created
        if made is not None and made.is_dir() and not any(made.rglob(checkpoint.FILENAME)):
            shutil.rmtree(made, ignore_errors=True)


def _run_dir(path: Path) -> RunDir:
    """A run directory; one that holds a checkpoint is held: nothing is written into it
    until the engine has accepted that checkpoint (a refused resume leaves it as it was)."""
    return RunDir(path, hold=checkpoint.exists(path), writer=is_writer())


def run_repeats(req: RunRequest) -> list[dict]:
    """Runs the repeats one after another (seed + 1000 k, as the reference), in this
    process or each in its own (`repeat_mode`); with one repeat the run directory is
    `outdir` itself. A run directory is created only once the data, model and algorithm
    of its first repeat are built, so a bad input leaves no folder behind."""
    start = _Start(Path(req.outdir))
    try:
        root, summaries = _run_all(req)
    except (InputError, DataError):
        start.discard()
        raise
    except RepeatFailed as err:
        if err.code == 2:  # the repeat refused its input (it removed its own folder)
            start.discard()
        raise
    results = [(s["final_train_acc"], s["final_test_acc"]) for s in summaries]
    root.write_final_result(results)
    test = np.array([r[1] for r in results])
    overall = {"repeats": summaries, "final_test_acc_mean": float(test.mean()),
               "final_test_acc_std": float(test.std()),
               "settings": {k: v for k, v in asdict(req.run).items()}}
    if all("unseen_test_acc" in s for s in summaries):
        unseen = np.array([s["unseen_test_acc"] for s in summaries])
        overall.update(unseen_test_acc_mean=float(unseen.mean()),
                       unseen_test_acc_std=float(unseen.std()))
    if req.repeat > 1:
        root.write_summary(overall)
    _print_summary(req, summaries, test)
    return summaries


def _run_all(req: RunRequest) -> tuple[RunDir, list[dict]]:
    outdir = Path(req.outdir)
    root: RunDir | None = None
    summaries = []
    for k in range(req.repeat):
        seed = req.run.seed + 1000 * k
        if req.repeat > 1 and req.repeat_mode == "subprocess":
            # The repeat builds (and checks) everything itself; the root's files follow
            # its first success, so a refused first repeat leaves the root untouched.
            summaries.append(_run_in_subprocess(req, k, seed, outdir / f"run{k}"))
            if root is None:
                root = RunDir(outdir, writer=is_writer())
                root.write_flags(req.flags)
            continue
        built = _build(req, seed)  # before any folder is made
        run_dir = _run_dir(outdir if req.repeat == 1 else outdir / f"run{k}")
        if root is None:
            root = run_dir if req.repeat == 1 else RunDir(outdir, hold=run_dir.held,
                                                          writer=run_dir.writer)
            root.write_flags(req.flags)
            if root is not run_dir:
                run_dir.on_release(root.release)
        if req.repeat > 1:
            run_dir.write_flags({**req.flags, "seed": seed})
        _write_assignment(run_dir, built)
        summaries.append(_engine(req, seed, built, run_dir).run())
    assert root is not None
    return root, summaries


def _solver_lines(s: dict) -> list[str]:
    if "fwd_solves" not in s:
        return []
    share = lambda k, n: f"{s[k]:,} of {s[n]:,} ({100 * s[k] / max(s[n], 1):.1f}%)"
    return [f"training fixed-point solves that missed tolerance: forward "
            f"{share('fwd_unconverged', 'fwd_solves')}, backward "
            f"{share('bwd_unconverged', 'bwd_solves')}"]


def _accuracy(value: float) -> str:
    """NaN means the split was never scored (`--eval_train_every 0`, or kNN-Per, which
    reports test accuracy only); say so rather than print "nan"."""
    return "not scored" if value != value else f"{value:.4f}"


def summary_lines(s: dict, repeat: int, test: np.ndarray, outdir: str) -> list[str]:
    """The end-of-run summary: the last run's numbers and the final test metric over
    repeats, as the reference prints it (percent, mean ± std)."""
    lines = [
        "",
        f"== {s['algorithm']} on {s['dataset']} with {s['model']} "
        f"({s['rounds']} evaluated rounds, {repeat} run(s)) ==",
        f"final train acc   {_accuracy(s['final_train_acc'])}",
        f"final test acc    {_accuracy(s['final_test_acc'])}",
    ]
    for name, acc in s.get("final_test_acc_tiers", {}).items():
        up = s.get("up_bytes_per_client_tiers", {}).get(name)
        down = s.get("down_bytes_per_client_tiers", {}).get(name)
        macs = s.get("macs_per_image_tiers", {}).get(name)
        iters = s.get("mean_solver_iters_tiers", {}).get(name)
        deq_macs = s.get("mean_train_macs_per_example_tiers", {}).get(name)
        at = [(k[len("final_test_at"):-len("_acc_tiers")], v[name]) for k, v in s.items()
              if k.startswith("final_test_at") and name in v]
        lines.append(f"  {name:14s}  test acc {acc:.4f}"
                     + "".join(f" (at cap {cap}: {a:.4f})" for cap, a in at)
                     + (f", up {up / 1e6:.2f} MB per client" if up is not None else "")
                     + (f", down {down / 1e6:.2f} MB" if down is not None else "")
                     + (f", {macs / 1e6:.1f}M MACs per image" if macs is not None else "")
                     + (f", {iters:.1f} solver iterations" if iters is not None else "")
                     + (f", {deq_macs / 1e6:.0f}M training MACs per example"
                        if deq_macs is not None else ""))
    if "unseen_test_acc" in s:
        lines.append(f"unseen test acc   {_accuracy(s['unseen_test_acc'])} "
                     f"(train {_accuracy(s['unseen_train_acc'])})")
    return lines + [
        f"seconds per round {s['mean_train_seconds']:.2f} training + "
        f"{s['mean_eval_seconds']:.2f} evaluation",
        f"upload per client {s['up_bytes_per_client'] / 1e6:.3f} MB per round "
        f"(mean over rounds)",
        *_solver_lines(s),
        f"final test metric: {100 * test.mean():.2f} ± {100 * test.std():.2f}",
        f"run directory     {outdir}",
    ]


def _print_summary(req: RunRequest, summaries: list[dict], test: np.ndarray) -> None:
    print("\n".join(summary_lines(summaries[-1], req.repeat, test, req.outdir)), flush=True)

