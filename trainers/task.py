"""A task = a model plus how its outputs are scored. Algorithms see only this interface,
which is what lets one FeDEQ (or FedAvg...) implementation serve vision and text."""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from models.base import ModelOutput
from models.registry import ModelSpec


@dataclass(frozen=True)
class ClassificationTask:
    """Softmax cross-entropy on integer labels; accuracy pooled over examples."""

    model: ModelSpec
    l2_reg: float = 0.0

    def apply(self, params, state, rng, x, is_training: bool, probe=None
              ) -> tuple[ModelOutput, dict]:
        return self.model.transformed.apply(params, state, rng, x, is_training, probe)

    def loss(self, logits: jnp.ndarray, y: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
        """Mean cross-entropy over the real (mask = 1) examples of a batch."""
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        mask = mask.astype(ce.dtype)
        return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    def eval_sums(self, logits: jnp.ndarray, y: jnp.ndarray, mask: jnp.ndarray
                  ) -> dict[str, jnp.ndarray]:
        """Sums (not means) so that chunks and clients can be pooled exactly."""
        mask = mask.astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        return {"correct": jnp.sum(correct * mask), "loss": jnp.sum(ce * mask),
                "count": jnp.sum(mask)}

    def l2(self, params) -> jnp.ndarray:
        if not self.l2_reg:
            return jnp.zeros(())
        return 0.5 * self.l2_reg * sum(jnp.sum(x * x) for x in jax.tree.leaves(params))
