"""Solver settings for the equilibrium layer, with the reference's values as defaults."""

from dataclasses import dataclass

FWD_SOLVERS = ("anderson", "fpi", "broyden")
BWD_SOLVERS = ("normal_cg", "gmres", "broyden", "jacobian_free", "unrolled")
# Gradients that do not solve the implicit system (deq/fixed_point.py): for few-iteration
# tiers, whose iterate is not a fixed point. "unrolled" takes bwd_maxiter steps.
APPROXIMATE_BWD = ("jacobian_free", "unrolled")
ANDERSON_IMPLS = ("batched", "jaxopt")
BROYDEN_IMPLS = ("jaxopt", "batched")

# Per-solver (maxiter, tol) of the reference (spec 5.1): Anderson 20 / 1e-3 absolute,
# fixed-point iteration 20 / 1e-2, Broyden 50 / 1e-3.
_FWD_DEFAULTS = {"anderson": (20, 1e-3), "fpi": (20, 1e-2), "broyden": (50, 1e-3)}


@dataclass(frozen=True)
class SolverConfig:
    """How a fixed point is found and differentiated.

    `fwd_maxiter` / `fwd_tol` left as None take the reference's value for the chosen
    forward solver. `fast_conv` swaps the 3x3 convolutions inside the equilibrium block
    for ones whose gradient is a forward convolution (same numbers, much faster on CPU);
    the model registry also hands it to the explicit ResNets, whose convolutions become
    patch products where XLA:CPU's are slow (models/conv2d.py).
    `anderson_impl` "batched" runs jaxopt's Anderson arithmetic for the whole batch in
    one loop (deq/anderson.py); "jaxopt" vmaps jaxopt's own solver over the examples as
    the reference does. Both give the same iterates.

    The DEQ-Transformer's solver (spec 5.5) is `fwd_solver="broyden"` with
    `broyden_impl="batched"` (deq/broyden.py: the whole batch in one limited-memory
    Broyden, best iterate returned, stopping when the batch's ||g|| <= tol * sqrt(size))
    and `bwd_solver="broyden"` (the same solver on the backward linear system, with
    `bwd_tol` read the same way). `final_step` returns f(z*) instead of z*, as that model
    does; `eval_resolve` reproduces its quirk of solving a second time, from there,
    whenever the forward pass is not being differentiated (evaluation).
    """

    fwd_solver: str = "anderson"
    bwd_solver: str = "normal_cg"
    fwd_maxiter: int | None = None
    fwd_tol: float | None = None
    anderson_history: int = 5
    anderson_ridge: float = 1e-4
    bwd_maxiter: int = 50
    bwd_tol: float = 1e-3
    fast_conv: bool = True
    anderson_impl: str = "batched"
    broyden_impl: str = "jaxopt"
    final_step: bool = False
    eval_resolve: bool = False

    def __post_init__(self) -> None:
        if self.fwd_solver not in FWD_SOLVERS:
            raise ValueError(f"fwd_solver {self.fwd_solver!r} unknown; allowed: {FWD_SOLVERS}")
        if self.anderson_impl not in ANDERSON_IMPLS:
            raise ValueError(f"anderson_impl {self.anderson_impl!r} unknown; allowed: "
                             f"{ANDERSON_IMPLS}")
        if self.broyden_impl not in BROYDEN_IMPLS:
            raise ValueError(f"broyden_impl {self.broyden_impl!r} unknown; allowed: "
                             f"{BROYDEN_IMPLS}")
        if self.bwd_solver not in BWD_SOLVERS:
            raise ValueError(f"bwd_solver {self.bwd_solver!r} unknown; allowed: {BWD_SOLVERS}")

    @property
    def maxiter(self) -> int:
        return self.fwd_maxiter or _FWD_DEFAULTS[self.fwd_solver][0]

    @property
    def tol(self) -> float:
        return self.fwd_tol if self.fwd_tol is not None else _FWD_DEFAULTS[self.fwd_solver][1]
