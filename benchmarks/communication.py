"""Bytes each client sends and receives per round, for every algorithm on every dataset.

    python -m benchmarks.communication [--datasets femnist,cifar10,cifar100,shakespeare]
                                       [--upload_dtype float32|bfloat16|float16]

Each cell is measured, not computed from a formula: a one-round run of the engine with
the dataset's real model (the runners' models: ResNet20 / ResNet34 / Transformer-8 for the
baselines, DEQ-ResNet-S / DEQ-ResNet-M / DEQ-Transformer for FeDEQ) on a few random
examples of the dataset's shape, and the `up_bytes` / `down_bytes` the engine counted
from the pytrees that were exchanged, divided by the clients that exchanged them. The
ratio is to FedAvg's upload on the same dataset; the paper claims up to 4x less for
FeDEQ. Accuracy is meaningless here (random data, one round).
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from data.federated import ClientSplit, FederatedData  # noqa: E402
from models.registry import build_model  # noqa: E402
from trainers.algorithms.base import HParams  # noqa: E402
from trainers.engine import Engine, RunConfig  # noqa: E402
from trainers.registry import AlgorithmOptions, build_algorithm  # noqa: E402
from trainers.task import make_task  # noqa: E402
from utils.rundir import RunDir  # noqa: E402

ALGORITHMS = ("fedavg", "finetune", "local", "ditto", "fedrep", "fedper", "knnper", "fedeq")
# dataset -> (input shape, classes, task, explicit model, DEQ model, trainer suffix)
DATASETS = {
    "femnist": ((28, 28, 1), 62, "classification", "resnet20", "deq_resnet_s", "resnet"),
    "cifar10": ((32, 32, 3), 10, "classification", "resnet34", "deq_resnet_m", "resnet"),
    "cifar100": ((32, 32, 3), 100, "classification", "resnet34", "deq_resnet_m", "resnet"),
    "shakespeare": ((80,), 90, "text", "transformer8", "deq_transformer", "seq"),
}
CLIENTS, TRAIN, TEST, BATCH = 4, 4, 2, 4


def random_data(dataset: str) -> FederatedData:
    shape, classes, task, *_ = DATASETS[dataset]
    rng = np.random.default_rng(0)

    def split(n: int) -> ClientSplit:
        if task == "text":
            x = rng.integers(1, classes, (n,) + shape).astype(np.int32)
            return ClientSplit(x, np.roll(x, -1, axis=1))
        return ClientSplit(rng.standard_normal((n,) + shape).astype(np.float32),
                           rng.integers(0, classes, n).astype(np.int32))

    return FederatedData(
        name=dataset, train=[split(TRAIN) for _ in range(CLIENTS)],
        test=[split(TEST) for _ in range(CLIENTS)], unseen_train=[], unseen_test=[],
        client_ids=[str(i) for i in range(CLIENTS)], unseen_ids=[], num_classes=classes,
        input_shape=shape, task=task)


def one_round(algorithm: str, dataset: str, upload_dtype: str) -> dict:
    """Per-client upload and download bytes of one round, as the engine counted them."""
    shape, classes, task_kind, explicit, deq, suffix = DATASETS[dataset]
    model = build_model(deq if algorithm == "fedeq" else explicit, num_classes=classes,
                        input_shape=shape)
    task = make_task(task_kind, model)
    hp = HParams(lr=0.01, local_epochs=1, personal_epochs=1)
    # Finetune switches to local training at round 0.3 x 10: round 0 is its FedAvg phase.
    alg = build_algorithm(f"{algorithm}_{suffix}", task, hp, AlgorithmOptions(num_rounds=10))
    cfg = RunConfig(num_rounds=0, clients_per_round=0.5, batch_size=BATCH, quiet=True,
                    checkpoint_every=0, upload_dtype=upload_dtype)
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(random_data(dataset), task, alg, cfg, RunDir(tmp))
        engine.run()
        record = json.loads((Path(tmp) / "metrics.jsonl").read_text().splitlines()[0])
        clients = engine.cohort_size
    return {"up": record["up_bytes"] / clients, "down": record["down_bytes"] / clients,
            "model": model.name}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--algorithms", default=",".join(ALGORITHMS))
    p.add_argument("--upload_dtype", default="float32",
                   choices=["float32", "bfloat16", "float16"])
    args = p.parse_args()
    print(f"per client per round, uploads as {args.upload_dtype} "
          f"(MB = 1e6 bytes; ratio = FedAvg upload / this upload)", flush=True)
    for dataset in args.datasets.split(","):
        fedavg_up = None
        for algorithm in args.algorithms.split(","):
            t = time.perf_counter()
            r = one_round(algorithm, dataset, args.upload_dtype)
            if algorithm == "fedavg":
                fedavg_up = r["up"]
            ratio = (f"{fedavg_up / r['up']:5.2f}x" if fedavg_up and r["up"]
                     else "  n/a ")
            print(f"{dataset:12s} {algorithm:9s} {r['model']:16s} up {r['up'] / 1e6:8.3f} MB "
                  f"down {r['down'] / 1e6:8.3f} MB  {ratio} less up than FedAvg "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
