"""Synthetic(alpha, beta): the embedded default dataset, needing no download.

It follows the generator described in the FedProx paper (Li et al., 2020, section 5.1),
which is the standard way to get a federated problem whose heterogeneity is controlled by
two knobs: ``alpha`` makes the clients' labelling models differ, ``beta`` makes their
input distributions differ. Having it built in lets tests, CI and a first run work on a
machine without any data.

Choices of ours, recorded because the paper leaves them open:

* ``N(m, s)`` is read with ``s`` as the standard deviation (the paper's notation does not
  say; the scale of alpha/beta only changes how heterogeneous the clients are).
* Sample counts are ``min_samples + floor(LogNormal(4, 1))`` clipped to
  ``[min_samples, max_samples]``: power-law-like sizes, as in the paper, but small enough
  that the default run stays quick.
* Each client's first ``n - round(test_frac * n)`` samples are its train split, the rest
  its test split (all samples of a client are i.i.d., so no shuffle is needed).
"""

from __future__ import annotations

import numpy as np

from data.federated import ClientSplit, FederatedData, check_frac_unseen, hold_out_unseen


def make_synthetic(
    num_clients: int = 30,
    alpha: float = 0.5,
    beta: float = 0.5,
    dim: int = 60,
    num_classes: int = 10,
    seed: int = 0,
    frac_unseen: float = 0.0,
    min_samples: int = 50,
    max_samples: int = 200,
    test_frac: float = 0.2,
) -> FederatedData:
    """Generate Synthetic(alpha, beta) with ``num_clients`` clients, deterministically.

    All clients, unseen ones included, are drawn from one ``np.random.default_rng(seed)``
    stream before the seen/unseen split, so changing ``frac_unseen`` changes which
    clients train, never the data themselves.
    """
    if int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer; got {num_clients!r}")
    if dim < 1 or num_classes < 2:
        raise ValueError(f"need dim >= 1 and num_classes >= 2; got {dim} and {num_classes}")
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta are standard deviations, >= 0; got {alpha}, {beta}")
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"test_frac must be in (0, 1); got {test_frac!r}")
    if not 2 <= min_samples <= max_samples:
        raise ValueError(
            f"need 2 <= min_samples <= max_samples; got {min_samples} and {max_samples}"
        )
    check_frac_unseen(frac_unseen)
    num_clients, dim, num_classes = int(num_clients), int(dim), int(num_classes)

    rng = np.random.default_rng(seed)
    sizes = min_samples + np.floor(rng.lognormal(mean=4.0, sigma=1.0, size=num_clients))
    sizes = np.clip(sizes, min_samples, max_samples).astype(np.int64)

    u = rng.normal(0.0, alpha, size=num_clients)  # per-client mean of the model
    big_b = rng.normal(0.0, beta, size=num_clients)  # per-client mean of the input means
    # Decaying per-coordinate variances make some features far more informative.
    std = np.arange(1, dim + 1, dtype=np.float64) ** (-1.2 / 2)

    train: list[ClientSplit] = []
    test: list[ClientSplit] = []
    for k in range(num_clients):
        w = rng.normal(u[k], 1.0, size=(dim, num_classes))
        b = rng.normal(u[k], 1.0, size=num_classes)
        v = rng.normal(big_b[k], 1.0, size=dim)
        n = int(sizes[k])
        x = v + std * rng.standard_normal(size=(n, dim))
        # argmax(softmax(z)) == argmax(z): the softmax is monotone.
        y = np.argmax(x @ w + b, axis=1)
        x, y = x.astype(np.float32), y.astype(np.int32)
        n_test = min(max(1, round(test_frac * n)), n - 1)
        n_train = n - n_test
        train.append(ClientSplit(x[:n_train], y[:n_train]))
        test.append(ClientSplit(x[n_train:], y[n_train:]))

    width = max(3, len(str(num_clients - 1)))
    ids = [f"client_{k:0{width}d}" for k in range(num_clients)]
    return hold_out_unseen(
        ids, train, test, frac_unseen,
        name="synthetic", num_classes=num_classes, input_shape=(dim,),
    )
