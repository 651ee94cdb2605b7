"""Trainer names (the reference's and ours) -> algorithm, task family, and construction."""

from dataclasses import dataclass, field
from typing import Any

from trainers.algorithms.base import Algorithm, HParams
from trainers.algorithms.ditto import Ditto
from trainers.algorithms.fedavg import FedAvg
from trainers.algorithms.fedeq import FedEQ, FedEQConfig
from trainers.algorithms.fednova import FedNova
from trainers.algorithms.fedper import FedPer
from trainers.algorithms.fedprox import FedProx
from trainers.algorithms.fedrep import FedRep
from trainers.algorithms.finetune import Finetune
from trainers.algorithms.knnper import KNNPer
from trainers.algorithms.local import Local
from trainers.algorithms.moon import MOON
from trainers.algorithms.scaffold import Scaffold
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
    prox_mu: float = 0.1             # FedProx (InCo's mu/2 = 0.05; NIID-Bench's 0.001)
    moon_mu: float = 0.001           # MOON (NIID-Bench's shared --mu; InCo gives none)
    moon_temperature: float = 0.5


_ALGORITHMS: dict[str, type] = {
    "fedavg": FedAvg, "fedeq": FedEQ, "finetune": Finetune, "local": Local, "ditto": Ditto,
    "fedrep": FedRep, "fedper": FedPer, "knnper": KNNPer, "fedprox": FedProx,
    "scaffold": Scaffold, "fednova": FedNova, "moon": MOON,
}
assert set(_ALGORITHMS) == set(ALGORITHM_NAMES)


def resolve_trainer(name: str) -> TrainerEntry:
    if name not in TRAINER_ALIASES:
        raise ValueError(f"unknown trainer {name!r}; allowed: {', '.join(TRAINERS)}")
    algo, family = TRAINER_ALIASES[name]
    return TrainerEntry(_ALGORITHMS[algo], family)


def build_algorithm(trainer: str, task: Any, hp: HParams,
                    options: AlgorithmOptions = AlgorithmOptions(), **kwargs: Any) -> Algorithm:
    """The algorithm behind a trainer name, built from its own options; for the text
    trainers with the settings in which the reference's text and vision trainers differ
    (`TextOptions`). `kwargs` reach FedAvg-family constructors (server `transforms`)."""
    entry = resolve_trainer(trainer)
    text = options.text if entry.family == "text" else None
    return entry.algorithm.from_options(task, hp, options, text, **kwargs)
