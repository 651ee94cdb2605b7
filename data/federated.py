"""The in-memory form every dataset loader returns, and the seen/unseen client split.

All loaders hand the trainers the same structure so that the engine never needs to know
which dataset it runs on. Arrays stay in NumPy: batching and cohort sampling happen on
the host, and only the batches that are used travel to the accelerator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from utils.input_error import InputError


@dataclass
class ClientSplit:
    """One client's examples for one split (train or test); ``x[i]`` goes with ``y[i]``."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        # A length mismatch would silently misalign examples and labels after shuffling.
        if len(self.x) != len(self.y):
            raise ValueError(
                f"ClientSplit needs as many labels as examples; got {len(self.x)} examples "
                f"and {len(self.y)} labels"
            )

    @property
    def n(self) -> int:
        """Number of examples; the engine's aggregation weights are proportional to it."""
        return int(len(self.y))


@dataclass
class FederatedData:
    """A federated dataset: per-client train/test splits for seen and unseen clients.

    ``train[i]``/``test[i]`` belong to ``client_ids[i]``; ``unseen_train[j]`` and
    ``unseen_test[j]`` to ``unseen_ids[j]``. Unseen clients never take part in training:
    they are only used for the final generalisation evaluation (reference section 2.1).
    """

    name: str
    train: list[ClientSplit]
    test: list[ClientSplit]
    unseen_train: list[ClientSplit]
    unseen_test: list[ClientSplit]
    client_ids: list[str]
    unseen_ids: list[str]
    num_classes: int
    input_shape: tuple[int, ...]
    task: str = "classification"
    # How the clients were cut from a pooled dataset (e.g. the CIFAR label table and
    # per-client indices, data.partition.ShardPartition.to_arrays), for all clients, unseen
    # ones included, so a run can store it and be repeated exactly. None for natural clients.
    partition: dict[str, np.ndarray] | None = None
    # The pooled official test split, for protocols that evaluate one global model on it
    # rather than each client on its own test data (InCo Aggregation, inco spec section 7).
    # None when the dataset has no such split or the protocol does not use it.
    global_test: ClientSplit | None = None

    @property
    def num_clients(self) -> int:
        """Number of seen (training) clients, N in the reference's notation."""
        return len(self.train)

    def train_sizes(self) -> np.ndarray:
        """n_i of each seen client, from which the aggregation weights are built."""
        return np.asarray([c.n for c in self.train], dtype=np.int64)

    def summary(self) -> str:
        """A one-line description for logs, so a run records exactly what it trained on."""
        n_train = sum(c.n for c in self.train)
        n_test = sum(c.n for c in self.test)
        n_unseen = sum(c.n for c in self.unseen_train) + sum(c.n for c in self.unseen_test)
        line = (
            f"{self.name}: {self.num_clients} clients (+{len(self.unseen_ids)} unseen, "
            f"{n_unseen} samples), {n_train} train / {n_test} test samples, "
            f"{self.num_classes} classes, input {tuple(self.input_shape)}"
        )
        if self.global_test is not None:
            line += f", global test {self.global_test.n} samples"
        return line


def check_frac_unseen(frac_unseen: float) -> float:
    """Reject a bad ``frac_unseen`` before a loader spends seconds reading files."""
    try:
        frac = float(frac_unseen)
    except (TypeError, ValueError):
        raise InputError(f"frac_unseen must be a number in [0, 1); got {frac_unseen!r}") from None
    if not 0.0 <= frac < 1.0:  # also rejects NaN
        raise InputError(f"frac_unseen must be in [0, 1); got {frac_unseen!r}")
    return frac


def hold_out_unseen(
    ids: Sequence[str],
    train: Sequence[ClientSplit],
    test: Sequence[ClientSplit],
    frac_unseen: float,
    name: str,
    num_classes: int,
    input_shape: tuple[int, ...],
    task: str = "classification",
) -> FederatedData:
    """Split K clients into seen and unseen ones exactly as the reference does.

    The reference holds out the LAST ``int(frac_unseen * K)`` clients by index (section
    2.1), not a random subset; matching that keeps client identities comparable with its
    results.
    """
    if not (len(ids) == len(train) == len(test)):
        raise ValueError(
            f"ids, train and test must have one entry per client; got {len(ids)}, "
            f"{len(train)} and {len(test)}"
        )
    frac = check_frac_unseen(frac_unseen)
    k = len(ids)
    num_unseen = int(frac * k)
    num_seen = k - num_unseen
    if num_seen < 1:
        raise InputError(
            f"at least one seen client must remain: {k} clients with frac_unseen={frac} "
            f"leaves {num_seen}; frac_unseen must be in [0, 1) and there must be >= 1 client"
        )
    return FederatedData(
        name=name,
        train=list(train[:num_seen]),
        test=list(test[:num_seen]),
        unseen_train=list(train[num_seen:]),
        unseen_test=list(test[num_seen:]),
        client_ids=[str(i) for i in ids[:num_seen]],
        unseen_ids=[str(i) for i in ids[num_seen:]],
        num_classes=int(num_classes),
        input_shape=tuple(int(d) for d in input_shape),
        task=task,
    )
