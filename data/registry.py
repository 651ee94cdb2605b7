"""Dataset names the command line accepts, and the one entry point that loads them.

Every loader is wrapped to the same signature so that the runner can treat datasets
uniformly; adding a dataset is one entry in ``_LOADERS``.
"""

from __future__ import annotations

from typing import Protocol

from data.cifar import load_cifar
from data.errors import DataError
from data.federated import FederatedData
from data.leaf import FEMNIST_HOW_TO_GET, load_femnist
from data.shakespeare import SHAKESPEARE_HOW_TO_GET, load_shakespeare
from data.synthetic import make_synthetic


class Loader(Protocol):
    """(data_dir, num_clients, frac_unseen, seed, *, labels_per_client, source) -> data.

    Loaders that have no use for a keyword (natural clients, a single source) ignore it.
    """

    def __call__(self, data_dir: str | None, num_clients: int, frac_unseen: float, seed: int,
                 *, labels_per_client: int = 5, source: str = "pickle") -> FederatedData: ...


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


def _cifar(name: str) -> Loader:
    def load(data_dir: str | None, num_clients: int, frac_unseen: float, seed: int, *,
             labels_per_client: int = 5, source: str = "pickle") -> FederatedData:
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
}

DATASETS: tuple[str, ...] = tuple(_LOADERS)


def load_dataset(name: str, data_dir: str | None, num_clients: int, frac_unseen: float,
                 seed: int, *, labels_per_client: int = 5,
                 source: str = "pickle") -> FederatedData:
    """Load dataset ``name``; ``num_clients`` counts seen and unseen clients together.

    The unseen clients are the last ``int(frac_unseen * num_clients)`` of them, as in the
    reference (section 2.1). ``labels_per_client`` (shard partition) and ``source``
    ("pickle" or "tfds") only matter for CIFAR-10/100; other loaders ignore them.
    """
    loader = _LOADERS.get(name)
    if loader is None:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return loader(data_dir, num_clients, frac_unseen, seed,
                  labels_per_client=labels_per_client, source=source)
