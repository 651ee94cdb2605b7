"""kNN-Per (spec 3.7): FedAvg training; each client is scored with the global model mixed
with a k-nearest-neighbour model over its own training set (the datastore).

p = knn_lam * p_kNN + (1 - knn_lam) * softmax(global logits), where each of the k nearest
datastore embeddings (Euclidean) votes for its label with weight exp(-distance), rows
normalised. Only test accuracy is reported, as the unweighted mean over clients; unseen
clients are scored the same way with their own training data as the datastore.

Text: every token position is a datastore entry and a query (its embedding and its
target), padding positions included as in the reference; `skip_padding` leaves out the
positions whose input token is padding, from the datastore and from the accuracy.
"""

import jax
import jax.numpy as jnp
from jax import lax

from trainers.algorithms.base import HParams, map_chunks
from trainers.algorithms.fedavg import FedAvg
from trainers.task import token_mask


def knn_probabilities(queries: jnp.ndarray, keys: jnp.ndarray, key_labels: jnp.ndarray,
                      key_mask: jnp.ndarray, k: int, num_classes: int) -> jnp.ndarray:
    """(queries, num_classes) kNN class probabilities over the real (`key_mask`) keys.

    Votes are exp(-(d - d_min)) rather than the reference's exp(-d): the normalisation
    cancels the common factor, and when every distance is large exp(-d) underflows to 0
    and the reference's row becomes 0/0 = NaN. Fewer than k real keys: only those vote.
    """
    sq = (jnp.sum(queries ** 2, -1)[:, None] + jnp.sum(keys ** 2, -1)[None, :]
          - 2.0 * jnp.matmul(queries, keys.T, precision=lax.Precision.HIGHEST))
    dist = jnp.where(key_mask[None, :], jnp.sqrt(jnp.maximum(sq, 0.0)), jnp.inf)
    neg, idx = lax.top_k(-dist, min(k, keys.shape[0]))
    near = -neg  # ascending: the first column is the nearest
    real = jnp.isfinite(near)
    votes = jnp.where(real, jnp.exp(-(near - jnp.where(real[:, :1], near[:, :1], 0.0))), 0.0)
    hist = jnp.sum(votes[..., None] * jax.nn.one_hot(key_labels[idx], num_classes), axis=1)
    return hist / jnp.maximum(jnp.sum(votes, -1, keepdims=True), jnp.finfo(hist.dtype).tiny)


def _label_mask(mask: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """The example mask broadcast over a label's positions (tokens, for text tasks)."""
    return jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (y.ndim - 1)), y.shape)


class KNNPer(FedAvg):
    name = "knnper"

    def __init__(self, task, hp: HParams, lam: float = 0.5, neighbors: int = 10,
                 skip_padding: bool = False):
        super().__init__(task, hp)
        self.lam = lam
        self.neighbors = neighbors
        self.skip_padding = skip_padding

    @classmethod
    def from_options(cls, task, hp, options, text=None, **kwargs):
        return cls(task, hp, options.knn_lam, options.knn_neighbors,
                   skip_padding=text is not None and text.acc_ignores_padding)

    def _positions(self, x: jnp.ndarray, y: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
        """Which labels of a padded chunk are datastore entries or queries."""
        if self.skip_padding:
            return token_mask(x, mask)
        return _label_mask(mask, y)

    def score_client(self, params, state, train, test, rng, chunk):
        """{"test": this client's accuracy with count 1}: the engine's sum over clients
        is then the reference's unweighted mean. A client without test data counts 0."""
        def forward(x):
            out, _ = self.task.apply(params, state, rng, x, False)
            return out

        xtr, ytr, mtr = (jnp.asarray(a) for a in train)
        keys = map_chunks(lambda x, m: forward(x).embedding, (xtr,), mtr, chunk)
        keys = keys.reshape(-1, keys.shape[-1])
        key_labels = ytr.reshape(-1)
        key_mask = self._positions(xtr, ytr, mtr).reshape(-1)

        def one_chunk(x, y, m):
            out = forward(x)
            logits = out.logits.reshape(-1, out.logits.shape[-1])
            p_knn = knn_probabilities(out.embedding.reshape(-1, keys.shape[-1]), keys,
                                      key_labels, key_mask, self.neighbors, logits.shape[-1])
            p = self.lam * p_knn + (1.0 - self.lam) * jax.nn.softmax(logits)
            real = self._positions(x, y, m).reshape(-1).astype(jnp.float32)
            hits = (jnp.argmax(p, -1) == y.reshape(-1)).astype(jnp.float32)
            return jnp.sum(hits * real), jnp.sum(real)

        correct, count = map_chunks(one_chunk, test[:2], test[2], chunk)
        correct, count = jnp.sum(correct), jnp.sum(count)
        scored = (count > 0).astype(jnp.float32)
        return {"test": {"correct": correct / jnp.maximum(count, 1.0), "count": scored,
                         "loss": jnp.asarray(jnp.nan, jnp.float32)}}
