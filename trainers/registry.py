"""Trainer names (the reference's and ours) -> algorithm, task family, and construction."""

from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class TrainerEntry:
    algorithm: type
    family: str  # "vision" or "text": which task the data must provide


@dataclass(frozen=True)
class AlgorithmOptions:
    """Per-algorithm settings (spec 4.1); each algorithm reads only its own."""

    fedeq: FedEQConfig = field(default_factory=FedEQConfig)
    ditto_lambda: float = 0.3
    ditto_reference_start: bool = False
    finetune_frac: float = 0.3
    num_rounds: int = 400            # Finetune switches at finetune_frac * num_rounds
    knn_lam: float = 0.5
    knn_neighbors: int = 10


# One implementation per algorithm; the suffixes only say which task family the reference
# ran it on (`_resnet`: vision, `_seq`: text). `fedeq_vision` is the reference's default
# trainer name (which it then rejects).
_ALGORITHMS: dict[str, type] = {
    "fedavg": FedAvg, "fedeq": FedEQ, "finetune": Finetune, "local": Local, "ditto": Ditto,
    "fedrep": FedRep, "fedper": FedPer, "knnper": KNNPer,
}
_ALIASES = {"fedeq_vision": ("fedeq", "vision")}
for _algo in _ALGORITHMS:
    _ALIASES[_algo] = (_algo, "vision")
    _ALIASES[f"{_algo}_resnet"] = (_algo, "vision")
    _ALIASES[f"{_algo}_seq"] = (_algo, "text")
TRAINERS = tuple(_ALIASES)


def resolve_trainer(name: str) -> TrainerEntry:
    if name not in _ALIASES:
        raise ValueError(f"unknown trainer {name!r}; allowed: {', '.join(TRAINERS)}")
    algo, family = _ALIASES[name]
    return TrainerEntry(_ALGORITHMS[algo], family)


def build_algorithm(trainer: str, task: Any, hp: HParams,
                    options: AlgorithmOptions = AlgorithmOptions()) -> Algorithm:
    """The algorithm behind a trainer name, with the settings in which the reference's
    vision and text trainers differ (FedPer's weighting) taken from the family."""
    entry = resolve_trainer(trainer)
    cls = entry.algorithm
    if cls is FedEQ:
        return FedEQ(task, hp, options.fedeq)
    if cls is Finetune:
        return Finetune(task, hp, options.finetune_frac * options.num_rounds)
    if cls is Ditto:
        return Ditto(task, hp, options.ditto_lambda, options.ditto_reference_start)
    if cls is KNNPer:
        return KNNPer(task, hp, options.knn_lam, options.knn_neighbors)
    if cls is FedPer:
        return FedPer(task, hp, weighted=entry.family == "vision")
    return cls(task, hp)
