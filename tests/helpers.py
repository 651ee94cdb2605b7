"""Small shared builders for the tests."""

from data.synthetic import make_synthetic
from deq.config import SolverConfig
from models.registry import build_model
from trainers.algorithms.base import HParams
from trainers.algorithms.fedavg import FedAvg
from trainers.algorithms.fedeq import FedEQ, FedEQConfig
from trainers.engine import Engine, RunConfig
from trainers.task import ClassificationTask


def _engine(make_algorithm, executor: str, seed: int, rounds: int, frac_unseen: float,
            run_dir, clients_per_round: float, upload_dtype: str = "float32",
            solver: SolverConfig | None = None, eval_every: int = 1,
            eval_train_every: int = 1, **cfg_overrides) -> Engine:
    """8 synthetic clients of 20-40 examples, a DEQ-MLP, SGD at lr 0.05 with 2 + 1 epochs;
    `cfg_overrides`: other RunConfig fields."""
    data = make_synthetic(num_clients=8, seed=3, frac_unseen=frac_unseen, min_samples=20,
                          max_samples=40)
    model = build_model("deq_mlp", num_classes=data.num_classes, input_shape=data.input_shape,
                        solver=solver or SolverConfig())
    task = ClassificationTask(model)
    hp = HParams(lr=0.05, local_epochs=2, personal_epochs=1)
    cfg = RunConfig(num_rounds=rounds, seed=seed, clients_per_round=clients_per_round,
                    batch_size=8, executor=executor, vmap_chunk=3, eval_chunk=16, quiet=True,
                    upload_dtype=upload_dtype, eval_every=eval_every,
                    eval_train_every=eval_train_every, **cfg_overrides)
    return Engine(data, task, make_algorithm(task, hp), cfg, run_dir)


def small_engine(algorithm: str = "fedeq", executor: str = "loop", seed: int = 0,
                 rounds: int = 1, frac_unseen: float = 0.0, run_dir=None,
                 upload_dtype: str = "float32", solver: SolverConfig | None = None,
                 eval_every: int = 1, eval_train_every: int = 1, **cfg_overrides) -> Engine:
    """FeDEQ (rho 0.1) or FedAvg on `_engine`'s data and model."""
    def make(task, hp):
        return FedEQ(task, hp, FedEQConfig(rho=0.1)) if algorithm == "fedeq" else FedAvg(task, hp)
    return _engine(make, executor, seed, rounds, frac_unseen, run_dir, 0.5, upload_dtype, solver,
                   eval_every, eval_train_every, **cfg_overrides)


def trainer_engine(trainer: str, executor: str = "loop", rounds: int = 1,
                   frac_unseen: float = 0.0, run_dir=None, options=None,
                   clients_per_round: float = 0.5, **cfg_overrides) -> Engine:
    """`_engine`'s data and model with any registered trainer, built as main.py builds it
    (trainers.registry.build_algorithm)."""
    from trainers.registry import AlgorithmOptions, build_algorithm

    def make(task, hp):
        return build_algorithm(trainer, task, hp, options or AlgorithmOptions(num_rounds=rounds))
    return _engine(make, executor, 0, rounds, frac_unseen, run_dir, clients_per_round,
                   **cfg_overrides)


# main.py flags for a tiny Shakespeare run on `write_tiny_shakespeare`'s data; tests that
# pass the same ones (the runner scripts add lr 0.1) share their compiled programs.
# A client holds 3 + 1 windows: evaluation chunks of 4 keep the DEQ's 40 evaluation solver
# steps from running on 32 mostly padded examples.
TINY_SHAKESPEARE_FLAGS = ("-c", "4", "-le", "1", "-pe", "1", "-cr", "0.5", "-b", "4",
                          "--eval_chunk", "4", "-q")


def write_tiny_shakespeare(root, clients: int = 4) -> None:
    """TFF-layout h5 files under root/shakespeare: per client three one-window train
    snippets and one test snippet. Runs that share these shapes and flags compile the
    same programs (see the `shared_compile_env` fixture)."""
    from pathlib import Path

    from tests.test_shakespeare_data import _snippets, _write_tff

    names = [f"role{i}" for i in range(clients)]
    _write_tff(Path(root) / "shakespeare", {c: _snippets(c, 3) for c in names},
               {c: _snippets(c, 1) for c in names})


def linear_engine(trainer: str, data, cfg: RunConfig, run_dir, hp: HParams,
                  width: int = 8) -> Engine:
    """`trainer` with a two-layer linear model (body, `player_logits` head), which
    compiles in a moment: for tests of the cohort logic, which does not care what the
    model is."""
    import haiku as hk

    from deq.stats import SolverStats
    from models.base import ModelOutput
    from models.registry import ModelSpec
    from trainers.registry import build_algorithm

    def forward(x, is_training, probe=None):
        del is_training, probe
        h = hk.Linear(width, name="body")(x)
        return ModelOutput(hk.Linear(data.num_classes, name="player_logits")(h), h,
                           SolverStats.zeros())

    task = ClassificationTask(ModelSpec("linear", hk.transform_with_state(forward), False))
    return Engine(data, task, build_algorithm(trainer, task, hp), cfg, run_dir)
