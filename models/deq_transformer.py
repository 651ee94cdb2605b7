"""DEQ-Transformer for Shakespeare, as the reference builds it (spec 5.5).

The shared representation is the token and positional embeddings plus one 4-layer
re-injecting block f(z; x) (models/transformer.py), solved for z* = f(z*; x). The
personal head is a 1-layer block named `player` that re-injects the *token* embeddings
only (no positions, a reference quirk kept because it shaped the published model) and the
`player_logits` linear. The embedding output is z*.

The solve follows the reference, whatever `-fs`/`-bs` say: 20 steps of batched Broyden
from z0 = 0 with the best iterate kept, one differentiable application of f to it, and
20 Broyden steps on the backward linear system; when the forward pass is not
differentiated (evaluation) the reference solves a second time from f(z*), and so does
this model by default (`DEQ_TRANSFORMER_SOLVER.eval_resolve`).

Within one forward pass every application of f uses the same RNG key, so all solver
iterations share one set of dropout masks, as in the reference; that keeps f a fixed map
whose equilibrium exists.
"""

from collections.abc import Callable

import haiku as hk
import jax
import jax.numpy as jnp

from deq.budget import SolverBudget
from deq.budget import caps_only as _caps_only
from deq.config import SolverConfig
from deq.fixed_point import fixed_point
from models.base import HEAD_MARKER, ModelOutput
from models.transformer import (
    D_MODEL,
    VOCAB_SIZE,
    attention_mask,
    dropout_rate,
    embed_tokens,
    ut_stack,
)

DEQ_TRANSFORMER_SOLVER = SolverConfig(
    fwd_solver="broyden", broyden_impl="batched", fwd_maxiter=20, fwd_tol=1e-6,
    bwd_solver="broyden", bwd_maxiter=20, bwd_tol=2e-10, final_step=True, eval_resolve=True)
"""The reference's hard-coded solver (spec 5.5); its tolerances are relative to
sqrt(batch size), so in practice all 20 steps run."""

BLOCK_LAYERS = 4
BLOCK_NAME = "DEQTransformer_Block"


def deq_transformer(vocab_size: int = VOCAB_SIZE, solver: SolverConfig = DEQ_TRANSFORMER_SOLVER,
                    d_model: int = D_MODEL, block_layers: int = BLOCK_LAYERS,
                    dropout_at_eval: bool = True) -> Callable:
    """Forward function of the DEQ-Transformer: tokens (B, T) int -> logits (B, T, vocab)."""

    def block_fn(z: jnp.ndarray, u: tuple[jnp.ndarray, jnp.ndarray], rate: float
                 ) -> jnp.ndarray:
        x, mask = u
        return ut_stack(z, x, mask, num_layers=block_layers, dropout_rate=rate,
                        rng=hk.maybe_next_rng_key() if rate > 0 else None)

    block = hk.transform(block_fn)

    def forward(tokens: jnp.ndarray, is_training: bool, probe: jnp.ndarray | None = None,
                budget: SolverBudget | None = None) -> ModelOutput:
        tok, x = embed_tokens(tokens, vocab_size, d_model)
        mask = attention_mask(tokens)
        rate = dropout_rate(is_training, dropout_at_eval)
        z0 = jnp.zeros_like(x)
        # The block's parameters are initialised from the run's RNG (unlike the DEQ-ResNet
        # block); at apply time the key passed here is unused.
        init_key = hk.next_rng_key() if hk.running_init() else jax.random.PRNGKey(0)
        block_params = hk.lift(block.init, name=BLOCK_NAME)(init_key, z0, (x, mask), rate)
        rng = hk.maybe_next_rng_key() if rate > 0 else None
        params = {"block": block_params, "rng": rng}

        def f(p: dict, z: jnp.ndarray, u: tuple[jnp.ndarray, jnp.ndarray]) -> jnp.ndarray:
            return block.apply(p["block"], p["rng"], z, u, rate)

        z, stats = fixed_point(f, params, (x, mask), z0, probe, solver,
                                _caps_only(budget))
        with hk.name_scope(HEAD_MARKER):
            h = ut_stack(z, tok, mask, num_layers=1, dropout_rate=rate,
                         rng=hk.maybe_next_rng_key() if rate > 0 else None)
        logits = hk.Linear(vocab_size, name=f"{HEAD_MARKER}_logits")(h)
        return ModelOutput(logits, z, stats)

    return forward
