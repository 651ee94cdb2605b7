"""CIFAR-10 as DAC's federated part splits it (dac_spec 4.1, 4.3).

Two splits, as the logged runs (`fl/res.logs`) used them, not as the released code has
them (docs/DEVIATIONS.md, "DAC"):

* ``dac-iid``: a seeded permutation of the 50,000 training images cut into K disjoint
  clients of 50,000 // K images (the released code fixes 3,125 per client and fails for
  K > 16);
* ``dac-shards``: the training indices sorted by label (stable), cut into 250 shards of
  200, two distinct random shards per client: 400 images of at most 2 classes (the
  released code's 50 x 1,000 shards give 2,000 per client and fail for K > 25).

Images are normalised with mean = std = 0.5 and never augmented. DAC scores only the
global model on the 10,000 test images (``FederatedData.global_test``); each client's
``test`` is its own training split (no copy), as for InCo. DAC is unseeded; here both
splits draw from ``np.random.RandomState(seed)``.
"""

from __future__ import annotations

import os

import numpy as np

from data.cifar import CIFAR_INPUT_SHAPE, read_cifar_pickles
from data.federated import ClientSplit, FederatedData, hold_out_unseen
from data.inco_partition import partition_arrays

DAC_PARTITIONS = ("dac-iid", "dac-shards")
SHARDS, SHARD_SIZE, SHARDS_PER_CLIENT = 250, 200, 2


def dac_partition(labels: np.ndarray, num_clients: int, partition: str, seed: int
                  ) -> list[np.ndarray]:
    """Per-client training indices of a DAC split (module docstring)."""
    rs = np.random.RandomState(seed)
    n = len(labels)
    if partition == "dac-iid":
        if num_clients > n:
            raise ValueError(f"--partition dac-iid: {num_clients} clients for {n} images")
        per = n // num_clients
        perm = rs.permutation(n)
        return [np.sort(perm[k * per:(k + 1) * per]) for k in range(num_clients)]
    if partition == "dac-shards":
        shards = min(SHARDS, n // SHARD_SIZE)
        if num_clients * SHARDS_PER_CLIENT > shards:
            raise ValueError(f"--partition dac-shards has {shards} shards of {SHARD_SIZE}, "
                             f"{SHARDS_PER_CLIENT} per client: at most "
                             f"{shards // SHARDS_PER_CLIENT} clients, got {num_clients}")
        order = np.argsort(labels, kind="stable")
        picks = rs.choice(shards, num_clients * SHARDS_PER_CLIENT, replace=False)
        return [np.concatenate([order[s * SHARD_SIZE:(s + 1) * SHARD_SIZE]
                                for s in picks[SHARDS_PER_CLIENT * k:SHARDS_PER_CLIENT * (k + 1)]])
                for k in range(num_clients)]
    raise ValueError(f"unknown DAC partition {partition!r}; choose one of "
                     f"{', '.join(DAC_PARTITIONS)}")


def dac_normalise(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 (pixel / 255 - 0.5) / 0.5 (the FL part's transform)."""
    return ((images.astype(np.float32) / np.float32(255.0) - 0.5) / 0.5).astype(np.float32)


def load_dac_cifar(root: str | os.PathLike, num_clients: int, partition: str, seed: int,
                   frac_unseen: float = 0.0, download: bool = True) -> FederatedData:
    x_train, y_train, x_test, y_test = read_cifar_pickles(root, "cifar10", download=download)
    parts = dac_partition(y_train, int(num_clients), partition, int(seed))
    train = [ClientSplit(dac_normalise(x_train[p]), y_train[p].astype(np.int32))
             for p in parts]
    width = max(3, len(str(num_clients - 1)))
    ids = [f"client_{k:0{width}d}" for k in range(int(num_clients))]
    data = hold_out_unseen(ids, train, train, frac_unseen, name="cifar10", num_classes=10,
                           input_shape=CIFAR_INPUT_SHAPE)
    data.partition = partition_arrays(parts, partition, 0.0, seed)
    data.global_test = ClientSplit(dac_normalise(x_test), y_test.astype(np.int32))
    return data
