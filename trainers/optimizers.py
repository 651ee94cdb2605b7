"""Client optimisers, chosen by name: the FeDEQ reference trains with plain SGD, InCo's
ResNets with Adam and its ViTs with momentum SGD plus weight decay (inco_spec 4).

Every client builds its optimiser afresh at the start of each phase, so optimiser state
never crosses rounds (InCo: "fresh every round"; FeDEQ's reference: a new optax.sgd per
call). The spec is a frozen dataclass because it keys the compiled training step.
"""

from dataclasses import dataclass

import optax

OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0       # sgd only (PyTorch's heavy ball: v = mu v + g)
    weight_decay: float = 0.0   # added to the gradient before the update, as torch.optim does
    b1: float = 0.9             # adam
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; allowed: {', '.join(OPTIMIZERS)}")

    def build(self) -> optax.GradientTransformation:
        if self.name == "adam":
            core = optax.adam(self.lr, b1=self.b1, b2=self.b2, eps=self.eps)
        else:
            core = optax.sgd(self.lr, momentum=self.momentum or None)
        if self.weight_decay:
            return optax.chain(optax.add_decayed_weights(self.weight_decay), core)
        return core


def as_optimizer(optimizer: "OptimizerSpec | float") -> OptimizerSpec:
    """A bare learning rate means the reference's plain SGD."""
    return optimizer if isinstance(optimizer, OptimizerSpec) else OptimizerSpec(lr=float(optimizer))
