"""Transformer-8 for Shakespeare next-character prediction, as the reference builds it
(spec 5.4), and the layer stack it shares with the DEQ-Transformer (spec 5.5).

The stack is "universal-transformer style": the input embedding is added to the hidden
state again at the start of every layer (h <- h + x), then pre-LayerNorm causal attention
and a GELU MLP, each followed by dropout and a residual add, and one final LayerNorm.
That re-injection is what makes the same stack usable as an equilibrium map
z -> f(z, x), and Transformer-8 keeps it although it is not a fixed-point model; it is
reproduced because it is the model the published numbers come from.

Dropout: the reference's forward functions never receive `is_training`, so dropout (0.1)
is active in training, evaluation and embedding extraction alike. That is the default
here (`dropout_at_eval=True`); `dropout_at_eval=False` gives the usual behaviour.
Dropout needs an RNG: an `apply` without one (rng=None) runs without dropout.
"""

from collections.abc import Callable

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from deq.stats import SolverStats
from models.base import HEAD_MARKER, ModelOutput

VOCAB_SIZE = 90
D_MODEL = 64
NUM_HEADS = 4
DROPOUT = 0.1
MASK_VALUE = -1e10  # what masked attention logits are set to in the reference
EMBED_INIT = hk.initializers.TruncatedNormal(stddev=0.02)


def attention_mask(tokens: jnp.ndarray) -> jnp.ndarray:
    """(B, 1, T, T): query t may attend to key s iff s <= t and key s is not padding (0).

    A query whose every allowed key is padding (a sequence that starts with padding) ends
    up attending uniformly to all positions, as in the reference; the Shakespeare loader
    never produces such a sequence (padding only fills the end of a window).
    """
    t = tokens.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    return causal[None, None] & (tokens > 0)[:, None, None, :]


class CausalSelfAttention(hk.Module):
    """Multi-head self-attention with an explicit (B, 1, T, T) mask; all four linears
    have biases and share one initialiser, as the reference's attention does."""

    def __init__(self, num_heads: int, w_init: hk.initializers.Initializer,
                 name: str | None = None):
        super().__init__(name=name)
        self.num_heads = num_heads
        self.w_init = w_init

    def __call__(self, h: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
        b, t, d = h.shape
        k_size = d // self.num_heads
        proj = lambda name: hk.Linear(d, w_init=self.w_init, name=name)(h).reshape(
            b, t, self.num_heads, k_size)
        q, k, v = proj("query"), proj("key"), proj("value")
        logits = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(k_size)
        weights = jax.nn.softmax(jnp.where(mask, logits, MASK_VALUE), axis=-1)
        out = jnp.einsum("bhts,bshk->bthk", weights, v).reshape(b, t, d)
        return hk.Linear(d, w_init=self.w_init, name="linear")(out)


class DenseBlock(hk.Module):
    """The 4x-wide GELU MLP of every layer."""

    def __init__(self, w_init: hk.initializers.Initializer, name: str | None = None):
        super().__init__(name=name)
        self.w_init = w_init

    def __call__(self, h: jnp.ndarray) -> jnp.ndarray:
        d = h.shape[-1]
        h = jax.nn.gelu(hk.Linear(4 * d, w_init=self.w_init, name="linear")(h))
        return hk.Linear(d, w_init=self.w_init, name="linear_1")(h)


def _layer_norm(name: str) -> hk.LayerNorm:
    return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, name=name)


def ut_stack(h: jnp.ndarray, x: jnp.ndarray, mask: jnp.ndarray, *, num_layers: int,
             dropout_rate: float, rng: jax.Array | None,
             prefix: Callable[[int], str] = lambda i: "") -> jnp.ndarray:
    """Runs `num_layers` re-injecting layers on h and applies the final LayerNorm.

    Module names are `{prefix(i)}h{i}_ln_1`, `..._attn`, `..._ln_2`, `..._mlp`, and the
    final LN `{prefix(L-1)}h{L-1}_ln_f`; the prefix is how the reference marks the layers
    that belong to the personal head. Initialisation: VarianceScaling(2 / sqrt(L)).
    Dropout is skipped when the rate is 0 or there is no rng.
    """
    w_init = hk.initializers.VarianceScaling(2.0 / np.sqrt(num_layers))
    use_dropout = dropout_rate > 0 and rng is not None
    keys = list(jax.random.split(rng, 2 * num_layers)) if use_dropout else []
    drop = (lambda v: hk.dropout(keys.pop(), dropout_rate, v)) if use_dropout else (
        lambda v: v)
    for i in range(num_layers):
        name = f"{prefix(i)}h{i}"
        h = h + x
        a = CausalSelfAttention(NUM_HEADS, w_init, name=f"{name}_attn")(
            _layer_norm(f"{name}_ln_1")(h), mask)
        h = h + drop(a)
        m = DenseBlock(w_init, name=f"{name}_mlp")(_layer_norm(f"{name}_ln_2")(h))
        h = h + drop(m)
    last = num_layers - 1
    return _layer_norm(f"{prefix(last)}h{last}_ln_f")(h)


def embed_tokens(tokens: jnp.ndarray, vocab_size: int, d_model: int
                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(token embeddings, token + positional embeddings); the positional table has as many
    rows as the sequences it first sees (the reference sizes it from its first batch)."""
    tok = hk.Embed(vocab_size, d_model, w_init=EMBED_INIT, name="embed")(tokens)
    pos = hk.get_parameter("pos_embs", (tokens.shape[1], d_model), jnp.float32,
                           init=EMBED_INIT)
    return tok, tok + pos


def dropout_rate(is_training: bool, dropout_at_eval: bool, rate: float = DROPOUT) -> float:
    return rate if (is_training or dropout_at_eval) else 0.0


def transformer8(vocab_size: int = VOCAB_SIZE, num_layers: int = 8, d_model: int = D_MODEL,
                 dropout_at_eval: bool = True) -> Callable:
    """Forward function of Transformer-8: tokens (B, T) int -> logits (B, T, vocab).

    The head (modules named `player...`) is the last layer, the final LayerNorm and
    `player_logits`; the embedding output is the final LayerNorm's output (B, T, d).
    """
    def head_prefix(i: int) -> str:
        return f"{HEAD_MARKER}_" if i == num_layers - 1 else ""

    def forward(tokens: jnp.ndarray, is_training: bool, probe: jnp.ndarray | None = None
                ) -> ModelOutput:
        del probe  # no equilibrium solve, hence no backward statistics
        _, x = embed_tokens(tokens, vocab_size, d_model)
        rate = dropout_rate(is_training, dropout_at_eval)
        rng = hk.maybe_next_rng_key() if rate > 0 else None
        h = ut_stack(jnp.zeros_like(x), x, attention_mask(tokens), num_layers=num_layers,
                     dropout_rate=rate, rng=rng, prefix=head_prefix)
        logits = hk.Linear(vocab_size, name=f"{HEAD_MARKER}_logits")(h)
        return ModelOutput(logits, h, SolverStats.zeros())

    return forward
