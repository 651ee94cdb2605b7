"""A task = a model plus how its outputs are scored. Algorithms see only this interface,
which is what lets one FeDEQ (or FedAvg...) implementation serve vision and text.

Every task offers `apply`, `loss(logits, y, mask, x)`, `eval_sums(logits, y, mask, x)`
and `l2`; `mask` marks the real examples of a padded batch and `x` is the batch's input
(text tasks take their token mask from it, as the reference does).
"""

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

from models.base import ModelOutput
from models.batch_norm import batch_statistics_over
from models.registry import ModelSpec

PAD_ID = 0


@dataclass(frozen=True)
class _ModelTask:
    model: ModelSpec
    l2_reg: float = 0.0

    def apply(self, params, state, rng, x, is_training: bool, probe=None, budget=None
              ) -> tuple[ModelOutput, dict]:
        """`budget`: a DEQ model's traced solver budget (deq/budget.py); other models
        never receive one."""
        extra = () if budget is None else (budget,)
        return self.model.transformed.apply(params, state, rng, x, is_training, probe,
                                            *extra)

    def l2(self, params) -> jnp.ndarray:
        if not self.l2_reg:
            return jnp.zeros(())
        return 0.5 * self.l2_reg * sum(jnp.sum(x * x) for x in jax.tree.leaves(params))


@dataclass(frozen=True)
class ClassificationTask(_ModelTask):
    """Softmax cross-entropy on integer labels; accuracy pooled over examples.

    `augment(key, x) -> x`: applied to every training batch on device (InCo's crop,
    flip and Cutout, data/augment.py); None for the FeDEQ reference's datasets."""

    augment: Any = None

    def loss(self, logits: jnp.ndarray, y: jnp.ndarray, mask: jnp.ndarray,
             x: jnp.ndarray | None = None) -> jnp.ndarray:
        """Mean cross-entropy over the real (mask = 1) examples of a batch."""
        del x
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        mask = mask.astype(ce.dtype)
        return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    def reference_loss(self, params, state, rng, x: jnp.ndarray, y: jnp.ndarray,
                       mask: jnp.ndarray, sums: dict, budget=None) -> jnp.ndarray:
        """The loss the reference logs for a client (spec 2.3): mean cross-entropy of a
        training-mode forward pass over the client's whole set as one batch, so every
        BatchNorm uses that set's statistics (padding excluded). Model state updates are
        dropped, as the reference drops them."""
        del sums
        with batch_statistics_over(mask):
            out, _ = self.apply(params, state, rng, x, True, None, budget)
        return self.loss(out.logits, y, mask)

    def eval_sums(self, logits: jnp.ndarray, y: jnp.ndarray, mask: jnp.ndarray,
                  x: jnp.ndarray | None = None) -> dict[str, jnp.ndarray]:
        """Sums (not means) so that chunks and clients can be pooled exactly."""
        del x
        mask = mask.astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        return {"correct": jnp.sum(correct * mask), "loss": jnp.sum(ce * mask),
                "count": jnp.sum(mask)}


def token_mask(x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """(B, T): the positions of real examples whose *input* token is not padding.

    The reference builds its loss mask from the inputs, not the targets (spec 2.3), so
    the position after an end-of-snippet token, whose target is padding, is trained on.
    """
    return (x != PAD_ID) & mask.astype(bool)[:, None]


@dataclass(frozen=True)
class TextTask(_ModelTask):
    """Next-token prediction on (B, T) token ids (spec 2.3).

    Loss: NLL averaged over the batch's tokens under `token_mask`. Accuracy: by default
    as the reference computes it, over every position of every real sequence, padding
    included; since every sequence has T positions, pooling those positions over
    clients is exactly the reference's mean of client accuracies weighted by their
    number of sequences. `acc_ignores_padding` counts only the `token_mask` positions,
    pooled over tokens (a client-level mean would need per-client division).
    """

    acc_ignores_padding: bool = False

    def loss(self, logits: jnp.ndarray, y: jnp.ndarray, mask: jnp.ndarray,
             x: jnp.ndarray) -> jnp.ndarray:
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        tokens = token_mask(x, mask).astype(nll.dtype)
        return jnp.sum(nll * tokens) / jnp.maximum(jnp.sum(tokens), 1.0)

    def reference_loss(self, params, state, rng, x: jnp.ndarray, y: jnp.ndarray,
                       mask: jnp.ndarray, sums: dict, budget=None) -> jnp.ndarray:
        """The client's mean token NLL (the text models have no BatchNorm, and their
        dropout is on at evaluation as in the reference, so the evaluation pass's sums
        already hold it)."""
        del params, state, rng, x, y, mask, budget
        return sums["loss"] / jnp.maximum(sums["loss_count"], 1.0)

    def eval_sums(self, logits: jnp.ndarray, y: jnp.ndarray, mask: jnp.ndarray,
                  x: jnp.ndarray) -> dict[str, jnp.ndarray]:
        """`count` is what accuracy divides by; the loss has its own `loss_count` (its
        tokens), since the two are counted over different positions by default."""
        tokens = token_mask(x, mask).astype(jnp.float32)
        scored = tokens if self.acc_ignores_padding else jnp.broadcast_to(
            mask.astype(jnp.float32)[:, None], y.shape)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        return {"correct": jnp.sum(correct * scored), "count": jnp.sum(scored),
                "loss": jnp.sum(nll * tokens), "loss_count": jnp.sum(tokens)}


def make_task(kind: str, model: ModelSpec, l2_reg: float = 0.0,
              acc_ignores_padding: bool = False, augment: Any = None
              ) -> ClassificationTask | TextTask:
    """The task for a dataset's `FederatedData.task` ("classification" or "text")."""
    if kind == "text":
        return TextTask(model, l2_reg, acc_ignores_padding)
    if kind == "classification":
        return ClassificationTask(model, l2_reg, augment=augment)
    raise ValueError(f"unknown task {kind!r}; expected 'classification' or 'text'")
