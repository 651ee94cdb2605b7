"""From validated settings to finished run directories (one per repeat)."""


import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from data.augment import make_augmentation
from data.inco import INCO_DATASETS, inco_augmentation, inco_stats
from data.registry import dataset_partitions, load_dataset
from deq.config import SolverConfig
from models.registry import build_model, submodel_family
from models.vit import VIT_SPLITS, load_vit_weights
from trainers.algorithms.base import HParams
from trainers.algorithms.fedeq import FedEQConfig
from trainers.engine import Engine, RunConfig
from trainers.names import SUBMODEL_TRAINERS
from trainers.registry import AlgorithmOptions, TextOptions, build_algorithm, resolve_trainer
from trainers.server_transforms import InCoConfig
from trainers.submodel_setup import build_submodel_federation, submodel_lines
from trainers.task import make_task
from utils.rundir import RunDir

_DEFAULT_CLIENTS = {"synthetic": 30, "femnist": 100, "cifar10": 100, "cifar100": 100,
                    "shakespeare": 200}
_DEFAULT_ROUNDS = {"synthetic": 30}
_TEXT_DATASETS = frozenset({"shakespeare"})
# Flags that may differ when a run is resumed: none of them changes a trained number
# (a larger --num_rounds extends a finished run).
_RESUMABLE_CHANGES = frozenset({"outdir", "quiet", "num_rounds", "checkpoint_every", "repeat",
                                "rescore_unchanged",
                                "repeat_mode"})


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
    inco: InCoConfig = InCoConfig()
    augment: str = "none"
    model_kwargs: dict = field(default_factory=dict)  # ViT patch and image size
    vit_weights: str | None = None
    repeat_mode: str = "in_process"
    argv: tuple[str, ...] = ()  # the command line, rerun per repeat in "subprocess" mode

    @staticmethod
    def from_flags(f: Any, default_model, default_outdir) -> "RunRequest":
        """Checks every flag before any work, with a message that says what is allowed."""
        entry = resolve_trainer(f.trainer)  # raises with the allowed names
        dataset = f.dataset
        _check(entry.family != "text" or dataset in _TEXT_DATASETS,
               f"--trainer {f.trainer} is a text trainer and {dataset} is not a text dataset; "
               f"use the trainer without the _seq suffix (e.g. "
               f"{f.trainer.removesuffix('_seq')}) for {dataset}")
        # A vision trainer would run on text without the reference's text settings.
        _check(entry.family == "text" or dataset not in _TEXT_DATASETS,
               f"--trainer {f.trainer} is a vision trainer and {dataset} is a text dataset; "
               f"use {entry.algorithm.name}_seq")
        num_clients = f.num_clients or _DEFAULT_CLIENTS.get(dataset, 100)
        rounds = f.num_rounds if f.num_rounds is not None else _DEFAULT_ROUNDS.get(dataset, 400)
        model = f.model or default_model(dataset, f.trainer)
        _check(0 < f.clients_per_round <= 1, f"--clients_per_round must be in (0, 1], got "
               f"{f.clients_per_round}")
        _check(0 <= f.frac_unseen < 1, f"--frac_unseen must be in [0, 1), got {f.frac_unseen}")
        _check(int(f.frac_unseen * num_clients) < num_clients,
               "--frac_unseen leaves no seen client")
        _check(rounds >= 0, f"--num_rounds must be >= 0, got {rounds}")
        _check(f.eval_every >= 1, f"--eval_every must be >= 1, got {f.eval_every}")
        _check(f.eval_train_every >= 0, "--eval_train_every must be >= 0 (0: never score the "
               f"train split), got {f.eval_train_every}")
        _check(f.batch_size == -1 or f.batch_size >= 1, "--batch_size must be >= 1 or -1")
        _check(f.inner_epochs >= 1, "--inner_epochs must be >= 1")
        _check(f.personalized_epochs >= 0, "--personalized_epochs must be >= 0")
        _check(f.repeat >= 1, "--repeat must be >= 1")
        _check(f.checkpoint_every >= 0, "--checkpoint_every must be >= 0 (0: only the last)")
        _check(f.learning_rate > 0, "--learning_rate must be > 0")
        _check(f.labels_per_client >= 1, "--labels_per_client must be >= 1")
        _check(f.rho > 0, "--rho must be > 0")
        ditto_lambda = getattr(f, "lambda")
        _check(ditto_lambda >= 0, f"--lambda (Ditto) must be >= 0, got {ditto_lambda}")
        _check(0 <= f.finetune_frac <= 1,
               f"--finetune_frac must be in [0, 1], got {f.finetune_frac}")
        _check(f.knn_neighbors >= 1, f"--knn_neighbors must be >= 1, got {f.knn_neighbors}")
        _check(0 <= f.knn_lam <= 1, f"--knn_lam must be in [0, 1], got {f.knn_lam}")
        submodels = _submodels(f, model, f.trainer)
        partition = f.partition or ("hetero-fixed" if submodels
                                    else dataset_partitions(dataset)[0])
        vit = (submodels[-1] if submodels else model) in VIT_SPLITS
        optimizer = f.optimizer or ("adam" if submodels and not vit else "sgd")
        momentum = f.momentum if f.momentum is not None else (0.9 if vit else 0.0)
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
        _check(f.alpha > 0, "--alpha must be > 0")
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
                          executor=f.executor or "", eval_chunk=f.eval_chunk, quiet=f.quiet,
                          checkpoint_every=f.checkpoint_every, upload_dtype=f.upload_dtype,
                          rescore_unchanged=f.rescore_unchanged,
                          reference_losses=f.reference_losses,
                          global_eval_drop_last=f.global_eval_drop_last),
            hp=HParams(lr=f.learning_rate, local_epochs=f.inner_epochs,
                       personal_epochs=f.personalized_epochs,
                       weighted=not f.unweighted_updates, optimizer=optimizer,
                       momentum=momentum, weight_decay=weight_decay),
            solver=SolverConfig(fwd_solver=f.fwd_solver, bwd_solver=f.bwd_solver,
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
            submodels=submodels,
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
    family = submodel_family(names[-1])
    for name in names:
        _check(family is not None and name in family,
               f"--submodels {','.join(names)}: {name} is not a sub-model of {names[-1]}; "
               f"allowed: {', '.join(family or ('resnet10..resnet26', 'vit_s8..vit_s12'))}")
    _check(list(names) == sorted(names, key=family.index),
           f"--submodels must go from the smallest model to the server model; got "
           f"{','.join(names)}")
    return names


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _augmentation(req: RunRequest) -> Any:
    if req.augment == "none":
        return None
    mean, std = inco_stats(req.dataset) if req.dataset in INCO_DATASETS else ((0.0,), (1.0,))
    return make_augmentation(req.augment, mean, std)


def build_engine(req: RunRequest, seed: int, run_dir: RunDir | None) -> Engine:
    data = load_dataset(req.dataset, req.data_dir, req.num_clients, req.frac_unseen, seed,
                        **req.data_kwargs)
    if run_dir is not None and data.partition is not None:
        run_dir.write_partition(data.partition)  # the clients this seed drew, kept with the run
    text = req.options.text
    augment = _augmentation(req)

    def task_for(name: str):
        model = build_model(name, num_classes=data.num_classes,
                            input_shape=data.input_shape, solver=req.solver,
                            dropout_at_eval=text.eval_dropout, **req.model_kwargs)
        return make_task(data.task, model, req.l2_reg, text.acc_ignores_padding, augment)

    if req.submodels:
        tasks = [task_for(name) for name in req.submodels]
        task = tasks[-1]
        algorithm = build_submodel_federation(
            req.trainer, req.submodels, tasks, req.hp, req.options, req.inco,
            data.num_clients, jnp.asarray(data.train[0].x[:2]))
        print(submodel_lines(algorithm, data.input_shape), flush=True)
    else:
        task = task_for(req.model)
        algorithm = build_algorithm(req.trainer, task, req.hp, req.options)
    settings = {k: v for k, v in req.flags.items() if k not in _RESUMABLE_CHANGES}
    engine = Engine(data, task, algorithm, replace(req.run, seed=seed), run_dir,
                    settings={**settings, "seed": seed})
    if req.vit_weights:
        path = req.vit_weights
        engine.params_hook = lambda params: load_vit_weights(path, params)
    return engine


class RepeatFailed(RuntimeError):
    """A repeat run in its own process exited with an error."""


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
                           f"command to continue")
    return json.loads((out / "summary.json").read_text())


def run_repeats(req: RunRequest) -> list[dict]:
    """Runs the repeats one after another (seed + 1000 k, as the reference), in this
    process or each in its own (`repeat_mode`); with one repeat the run directory is
    `outdir` itself."""
    root = RunDir(req.outdir)
    root.write_flags(req.flags)
    summaries = []
    for k in range(req.repeat):
        seed = req.run.seed + 1000 * k
        if req.repeat > 1 and req.repeat_mode == "subprocess":
            summaries.append(_run_in_subprocess(req, k, seed, Path(req.outdir) / f"run{k}"))
            continue
        run_dir = root if req.repeat == 1 else RunDir(Path(req.outdir) / f"run{k}")
        if req.repeat > 1:
            run_dir.write_flags({**req.flags, "seed": seed})
        summary = build_engine(req, seed, run_dir).run()
        summaries.append(summary)
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
        lines.append(f"  {name:14s}  test acc {acc:.4f}"
                     + (f", up {up / 1e6:.2f} MB per client" if up is not None else ""))
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

