"""Trainer names (the reference's and ours) -> algorithm, task family, and construction."""

from dataclasses import dataclass, field, replace
from typing import Any

from trainers.algorithms.base import Algorithm, HParams
from trainers.algorithms.ditto import Ditto
from trainers.algorithms.fedavg import FedAvg
from trainers.algorithms.fedeq import FedEQ, FedEQConfig
from trainers.algorithms.fedper import FedPer
from trainers.algorithms.fedrep import FedRep
from trainers.algorithms.finetune import Finetune
from trainers.algorithms.knnper import KNNPer
from trainers.algorithms.local import Local
from trainers.names import ALGORITHM_NAMES, TRAINER_ALIASES, TRAINERS


@dataclass(frozen=True)
class TrainerEntry:
    algorithm: type
    family: str  # "vision" or "text": which task the data must provide


@dataclass(frozen=True)
class TextOptions:
    """Where the reference's text (`_seq`) trainers differ from its vision ones. The
    defaults are the reference's; each `False` is the behaviour of the vision trainers
    or of the usual definition (docs/DEVIATIONS.md, "Text (Shakespeare)")."""

    sample_with_replacement: bool = True  # FedAvg-seq draws its cohort with replacement
    uniform_average: bool = True          # FeDEQ-seq and FedPer-seq average uniformly
    admm_per_token: bool = True           # FeDEQ-seq divides its ADMM terms by the tokens
    acc_ignores_padding: bool = False     # accuracy (and kNN-Per's datastore) skip padding
    eval_dropout: bool = True             # dropout stays on when evaluating


@dataclass(frozen=True)
class AlgorithmOptions:
    """Per-algorithm settings (spec 4.1); each algorithm reads only its own."""

    fedeq: FedEQConfig = field(default_factory=FedEQConfig)
    lam_admm: float = 0.01           # text FeDEQ's duals start here (vision: fedeq.lam_init)
    text: TextOptions = field(default_factory=TextOptions)
    ditto_lambda: float = 0.3
    ditto_reference_start: bool = False
    finetune_frac: float = 0.3
    num_rounds: int = 400            # Finetune switches at finetune_frac * num_rounds
    knn_lam: float = 0.5
    knn_neighbors: int = 10


_ALGORITHMS: dict[str, type] = {
    "fedavg": FedAvg, "fedeq": FedEQ, "finetune": Finetune, "local": Local, "ditto": Ditto,
    "fedrep": FedRep, "fedper": FedPer, "knnper": KNNPer,
}
assert set(_ALGORITHMS) == set(ALGORITHM_NAMES)


def resolve_trainer(name: str) -> TrainerEntry:
    if name not in TRAINER_ALIASES:
        raise ValueError(f"unknown trainer {name!r}; allowed: {', '.join(TRAINERS)}")
    algo, family = TRAINER_ALIASES[name]
    return TrainerEntry(_ALGORITHMS[algo], family)


def build_algorithm(trainer: str, task: Any, hp: HParams,
                    options: AlgorithmOptions = AlgorithmOptions()) -> Algorithm:
    """The algorithm behind a trainer name, with the settings in which the reference's
    vision and text trainers differ taken from the family (`TextOptions`)."""
    entry = resolve_trainer(trainer)
    cls = entry.algorithm
    text = options.text if entry.family == "text" else None
    uniform = text is not None and text.uniform_average
    if cls is FedEQ:
        cfg = options.fedeq
        if text is not None:
            cfg = replace(cfg, lam_init=options.lam_admm,
                          admm_scale="tokens" if text.admm_per_token else "none")
        return FedEQ(task, hp, cfg, weighted=not uniform)
    if cls is FedAvg:
        return FedAvg(task, hp, with_replacement=text is not None
                      and text.sample_with_replacement)
    if cls is Finetune:
        return Finetune(task, hp, options.finetune_frac * options.num_rounds)
    if cls is Ditto:
        return Ditto(task, hp, options.ditto_lambda, options.ditto_reference_start)
    if cls is KNNPer:
        return KNNPer(task, hp, options.knn_lam, options.knn_neighbors,
                      skip_padding=text is not None and text.acc_ignores_padding)
    if cls is FedPer:
        return FedPer(task, hp, weighted=not uniform)
    return cls(task, hp)
