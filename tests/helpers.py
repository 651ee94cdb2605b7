"""Small shared builders for the tests."""

from data.synthetic import make_synthetic
from deq.config import SolverConfig
from models.registry import build_model
from trainers.algorithms.base import HParams
from trainers.algorithms.fedavg import FedAvg
from trainers.algorithms.fedeq import FedEQ, FedEQConfig
from trainers.engine import Engine, RunConfig
from trainers.task import ClassificationTask


def small_engine(algorithm: str = "fedeq", executor: str = "loop", seed: int = 0,
                 rounds: int = 1, frac_unseen: float = 0.0, run_dir=None) -> Engine:
    data = make_synthetic(num_clients=8, seed=3, frac_unseen=frac_unseen, min_samples=20,
                          max_samples=40)
    model = build_model("deq_mlp", num_classes=data.num_classes, input_shape=data.input_shape,
                        solver=SolverConfig())
    task = ClassificationTask(model)
    hp = HParams(lr=0.05, local_epochs=2, personal_epochs=1)
    algo = FedEQ(task, hp, FedEQConfig(rho=0.1)) if algorithm == "fedeq" else FedAvg(task, hp)
    cfg = RunConfig(num_rounds=rounds, seed=seed, clients_per_round=0.5, batch_size=8,
                    executor=executor, vmap_chunk=3, eval_chunk=16, quiet=True)
    return Engine(data, task, algo, cfg, run_dir)


def trainer_engine(trainer: str, executor: str = "loop", rounds: int = 1,
                   frac_unseen: float = 0.0, run_dir=None, options=None,
                   clients_per_round: float = 0.5) -> Engine:
    """`small_engine`'s data and model with any registered trainer, built as main.py
    builds it (trainers.registry.build_algorithm)."""
    from trainers.registry import AlgorithmOptions, build_algorithm

    data = make_synthetic(num_clients=8, seed=3, frac_unseen=frac_unseen, min_samples=20,
                          max_samples=40)
    model = build_model("deq_mlp", num_classes=data.num_classes, input_shape=data.input_shape,
                        solver=SolverConfig())
    task = ClassificationTask(model)
    hp = HParams(lr=0.05, local_epochs=2, personal_epochs=1)
    algo = build_algorithm(trainer, task, hp,
                           options or AlgorithmOptions(num_rounds=rounds))
    cfg = RunConfig(num_rounds=rounds, seed=0, clients_per_round=clients_per_round,
                    batch_size=8, executor=executor, vmap_chunk=3, eval_chunk=16, quiet=True)
    return Engine(data, task, algo, cfg, run_dir)
