"""Trainer names, without importing any algorithm (so `utils.report` stays free of JAX).

One implementation per algorithm; the reference's trainer names only add which task family
it ran on (`_resnet`: vision, `_seq`: text). `fedeq_vision` is the reference's default
trainer name (which it then rejects); `fedeq_text` is the design's name for `fedeq_seq`.
"""

ALGORITHM_NAMES = ("fedavg", "fedeq", "finetune", "local", "ditto", "fedrep", "fedper",
                   "knnper", "fedprox", "scaffold", "fednova", "moon")

TRAINER_ALIASES: dict[str, tuple[str, str]] = {
    "fedeq_vision": ("fedeq", "vision"), "fedeq_text": ("fedeq", "text")}
for _algo in ALGORITHM_NAMES:
    TRAINER_ALIASES[_algo] = (_algo, "vision")
    TRAINER_ALIASES[f"{_algo}_resnet"] = (_algo, "vision")
    TRAINER_ALIASES[f"{_algo}_seq"] = (_algo, "text")
# InCo's methods (inco_spec 9): a FedAvg-family algorithm on sub-models of one server
# model, averaged over owners (Hetero*) and then mixed across layers (InCo*).
SUBMODEL_TRAINERS: dict[str, tuple[str, bool]] = {}
for _algo, _suffix in (("fedavg", "avg"), ("fedprox", "prox"), ("scaffold", "scaffold"),
                       ("fednova", "nova"), ("moon", "moon")):
    SUBMODEL_TRAINERS[f"hetero{_suffix}"] = (_algo, False)
    SUBMODEL_TRAINERS[f"inco{_suffix}"] = (_algo, True)
    for _name in (f"hetero{_suffix}", f"inco{_suffix}"):
        TRAINER_ALIASES[_name] = (_algo, "vision")
TRAINERS = tuple(TRAINER_ALIASES)


def algorithm_of(trainer: str) -> str:
    """The algorithm a trainer name runs (`fedavg_seq` -> `fedavg`); unknown names as given."""
    return TRAINER_ALIASES.get(trainer, (trainer, ""))[0]
