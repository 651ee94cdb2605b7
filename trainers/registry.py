"""Trainer names (the reference's and ours) -> algorithm and task family."""

from dataclasses import dataclass

from trainers.algorithms.fedavg import FedAvg
from trainers.algorithms.fedeq import FedEQ


@dataclass(frozen=True)
class TrainerEntry:
    algorithm: type
    family: str  # "vision" or "text": which task the data must provide


# One implementation per algorithm; the suffixes only say which task family the reference
# ran it on. `fedeq_vision` is the reference's default trainer name (which it then rejects).
_ALGORITHMS = {"fedavg": FedAvg, "fedeq": FedEQ}
_ALIASES = {
    "fedavg": ("fedavg", "vision"), "fedavg_resnet": ("fedavg", "vision"),
    "fedeq": ("fedeq", "vision"), "fedeq_vision": ("fedeq", "vision"),
    "fedeq_resnet": ("fedeq", "vision"),
}
TRAINERS = tuple(_ALIASES)


def resolve_trainer(name: str) -> TrainerEntry:
    if name not in _ALIASES:
        raise ValueError(f"unknown trainer {name!r}; allowed: {', '.join(TRAINERS)}")
    algo, family = _ALIASES[name]
    return TrainerEntry(_ALGORITHMS[algo], family)
