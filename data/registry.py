"""Dataset names the command line accepts, and the one entry point that loads them.

Every loader is wrapped to the same signature so that the runner can treat datasets
uniformly; adding a dataset is one entry in ``_LOADERS``. ``partition`` picks how a pooled
dataset is cut into clients: ``shards`` is FeDEQ's labels-per-client procedure (CIFAR-10/100,
``data.partition``); the InCo Aggregation partitions (``data.inco_partition``) serve
CIFAR-10, Fashion-MNIST, SVHN and CINIC-10, and the last three have no other.
"""

from __future__ import annotations

from typing import Protocol

from data.cifar import load_cifar
from data.dac import DAC_PARTITIONS, load_dac_cifar
from data.errors import DataError
from data.federated import FederatedData
from data.inco import INCO_DATASETS, load_inco_data
from data.inco_partition import INCO_PARTITIONS
from data.leaf import FEMNIST_HOW_TO_GET, load_femnist
from data.shakespeare import SHAKESPEARE_HOW_TO_GET, load_shakespeare
from data.synthetic import make_synthetic

PARTITIONS: tuple[str, ...] = ("shards", *INCO_PARTITIONS, *DAC_PARTITIONS)


class Loader(Protocol):
    """(data_dir, num_clients, frac_unseen, seed, *, labels_per_client, source, partition,
    alpha, partition_file) -> data.

    Loaders that have no use for a keyword (natural clients, a single source) ignore it;
    ``load_dataset`` has already refused partitions a dataset does not support.
    """

    def __call__(self, data_dir: str | None, num_clients: int, frac_unseen: float, seed: int,
                 *, labels_per_client: int = 5, source: str = "pickle",
                 partition: str = "shards", alpha: float = 0.5,
                 partition_file: str | None = None) -> FederatedData: ...


def _require_dir(data_dir: str | None, dataset: str, how_to_get: str) -> str:
    """A real dataset needs a folder to be read from (or downloaded into, for CIFAR), so a
    missing --data_dir is an error rather than a guess at a default location."""
    if not data_dir:
        raise DataError(
            "<--data_dir not given>",
            f"--data_dir pointing at a folder that contains {dataset}/",
            how_to_get,
        )
    return data_dir


def _synthetic(data_dir: str | None, num_clients: int, frac_unseen: float,
               seed: int, **_ignored: object) -> FederatedData:
    # Generated in memory: data_dir is not needed. The data are the dataset, so they do not
    # follow the run seed: repeats (seed + 1000 k) differ in training, not in their data.
    del seed
    return make_synthetic(num_clients=num_clients, seed=0, frac_unseen=frac_unseen)


def _femnist(data_dir: str | None, num_clients: int, frac_unseen: float,
             seed: int, **_ignored: object) -> FederatedData:
    # The writers are natural clients taken in a fixed order, so seed plays no part.
    root = _require_dir(data_dir, "femnist", FEMNIST_HOW_TO_GET)
    return load_femnist(root, num_clients=num_clients, frac_unseen=frac_unseen)


def _inco(name: str) -> Loader:
    def load(data_dir: str | None, num_clients: int, frac_unseen: float, seed: int, *,
             partition: str = "hetero-fixed", alpha: float = 0.5,
             partition_file: str | None = None, source: str = "pickle",
             **_ignored: object) -> FederatedData:
        # The fixed partitions index the official file order, which tfds does not keep.
        if source != "pickle":
            raise ValueError(f"--partition {partition} reads the official files; "
                             f"--data_source {source} is only supported with shards")
        where = "ROOT/cinic10/{train,test}/" if name == "cinic10" else f"ROOT/{name}/"
        root = _require_dir(data_dir, name, f"--data_dir ROOT; {name} is then read from "
                            f"{where}" + ("" if name == "cinic10" else " (downloaded if missing)"))
        return load_inco_data(name, root, num_clients, partition, alpha, partition_file, seed,
                              frac_unseen=frac_unseen)

    return load


def _cifar(name: str) -> Loader:
    inco = _inco(name)

    def load(data_dir: str | None, num_clients: int, frac_unseen: float, seed: int, *,
             labels_per_client: int = 5, source: str = "pickle", partition: str = "shards",
             alpha: float = 0.5, partition_file: str | None = None) -> FederatedData:
        if partition in DAC_PARTITIONS:
            root = _require_dir(data_dir, name, f"--data_dir ROOT; {name} is then read from "
                                f"(or downloaded to) ROOT/{name}/")
            return load_dac_cifar(root, num_clients, partition, seed, frac_unseen)
        if partition != "shards":
            return inco(data_dir, num_clients, frac_unseen, seed, partition=partition,
                        alpha=alpha, partition_file=partition_file, source=source)
        # The shard partition is drawn from the run seed (spec 6.2); it is returned in
        # FederatedData.partition so that the run directory can keep it.
        root = _require_dir(data_dir, name, f"--data_dir ROOT; {name} is then read from (or "
                            f"downloaded to) ROOT/{name}/")
        return load_cifar(root, name, num_clients=num_clients, frac_unseen=frac_unseen,
                          seed=seed, labels_per_client=labels_per_client, source=source)

    return load


def _shakespeare(data_dir: str | None, num_clients: int, frac_unseen: float,
                 seed: int, **_ignored: object) -> FederatedData:
    # Speaking roles are natural clients taken in a fixed order, so seed plays no part.
    # TFF's h5 files are downloaded into ROOT/shakespeare/ when no copy is there.
    root = _require_dir(data_dir, "shakespeare", SHAKESPEARE_HOW_TO_GET)
    return load_shakespeare(root, num_clients=num_clients, frac_unseen=frac_unseen)


_LOADERS: dict[str, Loader] = {
    "synthetic": _synthetic,
    "femnist": _femnist,
    "cifar10": _cifar("cifar10"),
    "cifar100": _cifar("cifar100"),
    "shakespeare": _shakespeare,
    "fmnist": _inco("fmnist"),
    "svhn": _inco("svhn"),
    "cinic10": _inco("cinic10"),
}

DATASETS: tuple[str, ...] = tuple(_LOADERS)


def dataset_partitions(name: str) -> tuple[str, ...]:
    """The ``partition`` values dataset ``name`` supports (the first is its usual one)."""
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name not in INCO_DATASETS:
        return ("shards",)
    return PARTITIONS if name == "cifar10" else INCO_PARTITIONS  # cifar10 has all


def load_dataset(name: str, data_dir: str | None, num_clients: int, frac_unseen: float,
                 seed: int, *, labels_per_client: int = 5, source: str = "pickle",
                 partition: str = "shards", alpha: float = 0.5,
                 partition_file: str | None = None) -> FederatedData:
    """Load dataset ``name``; ``num_clients`` counts seen and unseen clients together.

    The unseen clients are the last ``int(frac_unseen * num_clients)`` of them, as in the
    reference (section 2.1). ``labels_per_client`` (shard partition) and ``source``
    ("pickle" or "tfds") only matter for CIFAR-10/100; other loaders ignore them.
    ``partition`` (``PARTITIONS``) other than ``shards`` loads InCo's clients
    (``data.inco.load_inco_data``: ``alpha`` for ``hetero``, ``partition_file`` for
    ``hetero-fixed``); fmnist, svhn and cinic10 support only those. The natural-client
    datasets (synthetic, femnist, shakespeare) and cifar100 support only ``shards``.
    """
    loader = _LOADERS.get(name)
    if loader is None:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if partition not in PARTITIONS:
        raise ValueError(f"unknown partition {partition!r}; choose one of {', '.join(PARTITIONS)}")
    supported = dataset_partitions(name)
    if partition not in supported:
        raise ValueError(f"dataset {name} does not support --partition {partition}; it "
                         f"supports {', '.join(supported)}")
    return loader(data_dir, num_clients, frac_unseen, seed,
                  labels_per_client=labels_per_client, source=source, partition=partition,
                  alpha=alpha, partition_file=partition_file)
