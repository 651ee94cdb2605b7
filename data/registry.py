"""Dataset names the command line accepts, and the one entry point that loads them.

Every loader is wrapped to the same signature so that the runner can treat datasets
uniformly; adding a dataset is one entry in ``_LOADERS``.
"""

from __future__ import annotations

from collections.abc import Callable

from data.errors import DataError
from data.federated import FederatedData
from data.leaf import FEMNIST_HOW_TO_GET, load_femnist
from data.synthetic import make_synthetic

# (data_dir, num_clients, frac_unseen, seed) -> FederatedData
Loader = Callable[[str | None, int, float, int], FederatedData]


def _require_dir(data_dir: str | None, dataset: str, how_to_get: str) -> str:
    """Real datasets are never fetched at run time, so a missing --data_dir is an error."""
    if not data_dir:
        raise DataError(
            "<--data_dir not given>",
            f"--data_dir pointing at a folder that contains {dataset}/",
            how_to_get,
        )
    return data_dir


def _synthetic(data_dir: str | None, num_clients: int, frac_unseen: float,
               seed: int) -> FederatedData:
    # Generated in memory: data_dir is not needed. The data are the dataset, so they do not
    # follow the run seed: repeats (seed + 1000 k) differ in training, not in their data.
    del seed
    return make_synthetic(num_clients=num_clients, seed=0, frac_unseen=frac_unseen)


def _femnist(data_dir: str | None, num_clients: int, frac_unseen: float,
             seed: int) -> FederatedData:
    # The writers are natural clients taken in a fixed order, so seed plays no part.
    root = _require_dir(data_dir, "femnist", FEMNIST_HOW_TO_GET)
    return load_femnist(root, num_clients=num_clients, frac_unseen=frac_unseen)


_LOADERS: dict[str, Loader] = {
    "synthetic": _synthetic,
    "femnist": _femnist,
}

DATASETS: tuple[str, ...] = tuple(_LOADERS)


def load_dataset(name: str, data_dir: str | None, num_clients: int, frac_unseen: float,
                 seed: int) -> FederatedData:
    """Load dataset ``name``; ``num_clients`` counts seen and unseen clients together.

    The unseen clients are the last ``int(frac_unseen * num_clients)`` of them, as in the
    reference (section 2.1).
    """
    loader = _LOADERS.get(name)
    if loader is None:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return loader(data_dir, num_clients, frac_unseen, seed)
