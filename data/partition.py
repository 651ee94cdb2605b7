"""Labels-per-client shard partition for CIFAR-10/100 (reference spec section 6.2).

The reference's CIFAR files were made offline and cannot be obtained; the sampler its
repository imports (FedRep's ``noniid``) matches their naming, so the clients are rebuilt
with that procedure:

1. the indices of each class, in dataset order, are cut into ``shards_per_class =
   lpc * num_clients / num_classes`` equal shards; the leftover indices of a class that does
   not divide evenly go one each to its first shards;
2. the label table is ``[0..C-1]`` repeated ``shards_per_class`` times, shuffled, and
   reshaped to (num_clients, lpc): row i lists the classes client i draws a shard of. A
   class can appear twice in a row, so a client may hold fewer than lpc distinct labels;
3. for each client and each label of its row, a random remaining shard of that class is
   taken (without replacement) and the shards are concatenated in row order;
4. the test split is built from the test set with the SAME label table, so each client's
   test labels are its train labels.

With 100 clients and lpc 5 every shard holds 100 train / 20 test images, so each client
has 500 / 100, and every image belongs to exactly one client.

Randomness mirrors the reference's two generators so that the procedure reads the same:
the label table is shuffled by ``random.Random(seed)`` (the reference calls Python's
``random.shuffle``) and the shards are drawn by one ``np.random.RandomState(seed)`` with
``choice(n, replace=False)``, first for the train split and then, continuing the same
stream, for the test split. The published files were made with an unknown seed, so no
seed reproduces them; the point is that one seed always gives one partition, and
``to_arrays``/``from_arrays`` let a run store and reload it exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np


@dataclass
class ShardPartition:
    """Which examples of the train and test sets each client holds.

    ``train[i]`` and ``test[i]`` index the full train/test arrays (dataset order) for client
    i; ``label_table[i]`` is the row of classes client i drew its shards from.
    """

    label_table: np.ndarray
    train: list[np.ndarray]
    test: list[np.ndarray]
    seed: int

    @property
    def num_clients(self) -> int:
        return int(self.label_table.shape[0])

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays for an ``.npz`` file: clients hold different counts when classes do
        not split evenly, so indices are stored concatenated with offsets, not ragged."""
        out: dict[str, np.ndarray] = {
            "label_table": np.asarray(self.label_table, dtype=np.int64),
            "seed": np.asarray(self.seed, dtype=np.int64),
        }
        for split, parts in (("train", self.train), ("test", self.test)):
            sizes = np.asarray([len(p) for p in parts], dtype=np.int64)
            out[f"{split}_offsets"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            out[f"{split}_indices"] = (np.concatenate(parts).astype(np.int64) if parts
                                       else np.zeros(0, np.int64))
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ShardPartition:
        """Inverse of ``to_arrays`` (e.g. on ``np.load('partition.npz')``)."""
        def split(name: str) -> list[np.ndarray]:
            idx, off = np.asarray(arrays[f"{name}_indices"]), np.asarray(arrays[f"{name}_offsets"])
            return [idx[off[i]:off[i + 1]].copy() for i in range(len(off) - 1)]

        return cls(label_table=np.asarray(arrays["label_table"], dtype=np.int64),
                   train=split("train"), test=split("test"), seed=int(arrays["seed"]))


def shards_per_class(num_clients: int, labels_per_client: int, num_classes: int) -> int:
    """How many shards each class is cut into; refuses settings the procedure cannot meet.

    The reference computes ``int(lpc * K / C)`` and silently gives rows of the wrong length
    when that division is not exact, so here it must be exact.
    """
    if num_clients < 1 or labels_per_client < 1 or num_classes < 1:
        raise ValueError(
            f"num_clients, labels_per_client and num_classes must be >= 1; got "
            f"{num_clients}, {labels_per_client} and {num_classes}"
        )
    total = num_clients * labels_per_client
    if total % num_classes:
        raise ValueError(
            f"labels_per_client * num_clients ({labels_per_client} * {num_clients} = {total}) "
            f"must be a multiple of the number of classes ({num_classes}) so that every class "
            f"is cut into the same number of shards; e.g. 100 clients with lpc 5 works for "
            f"CIFAR-10 and CIFAR-100"
        )
    return total // num_classes


def _class_shards(labels: np.ndarray, num_classes: int, per_class: int,
                  split: str) -> list[list[np.ndarray]]:
    """Cut each class's indices (dataset order) into ``per_class`` shards, step 1."""
    shards: list[list[np.ndarray]] = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise ValueError(
                f"class {c} has {len(idx)} {split} examples, fewer than the {per_class} "
                f"shards it must be cut into; use fewer clients or fewer labels per client"
            )
        leftover = len(idx) % per_class
        body, extra = idx[:len(idx) - leftover], idx[len(idx) - leftover:]
        parts = list(body.reshape(per_class, -1))
        for i, j in enumerate(extra):
            parts[i] = np.append(parts[i], j)
        shards.append(parts)
    return shards


def _assign(labels: np.ndarray, table: np.ndarray, num_classes: int, per_class: int,
            rng: np.random.RandomState, split: str) -> list[np.ndarray]:
    """Steps 3-4: each client pops one random remaining shard per entry of its row."""
    pool = _class_shards(labels, num_classes, per_class, split)
    out = []
    for row in table:
        taken = []
        for label in row:
            shards = pool[int(label)]
            taken.append(shards.pop(int(rng.choice(len(shards), replace=False))))
        out.append(np.concatenate(taken).astype(np.int64))
    return out


def shard_partition(train_labels: np.ndarray, test_labels: np.ndarray, num_clients: int = 100,
                    labels_per_client: int = 5, seed: int = 0,
                    num_classes: int | None = None) -> ShardPartition:
    """Partition a train and a test set into clients with ``labels_per_client`` shards each.

    ``num_classes`` defaults to ``max(label) + 1`` over both splits. Labels must be integers
    in ``[0, num_classes)``. See the module docstring for the procedure and its randomness.
    """
    train_labels = np.asarray(train_labels).reshape(-1)
    test_labels = np.asarray(test_labels).reshape(-1)
    for name, y in (("train", train_labels), ("test", test_labels)):
        if y.size and y.dtype.kind not in "iu":
            raise ValueError(f"{name} labels must be integers; got dtype {y.dtype}")
    if num_classes is None:
        num_classes = int(max(train_labels.max(initial=-1), test_labels.max(initial=-1))) + 1
    for name, y in (("train", train_labels), ("test", test_labels)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} labels must lie in [0, {num_classes}); "
                             f"got [{y.min()}, {y.max()}]")
    if int(seed) != seed or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32); got {seed!r}")
    seed = int(seed)
    per_class = shards_per_class(num_clients, labels_per_client, num_classes)

    table_list = list(range(num_classes)) * per_class
    random.Random(seed).shuffle(table_list)
    table = np.asarray(table_list, dtype=np.int64).reshape(num_clients, labels_per_client)

    rng = np.random.RandomState(seed)
    train = _assign(train_labels, table, num_classes, per_class, rng, "train")
    test = _assign(test_labels, table, num_classes, per_class, rng, "test")
    return ShardPartition(label_table=table, train=train, test=test, seed=seed)
