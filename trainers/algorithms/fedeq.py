"""FeDEQ (spec 3.8): consensus ADMM on the shared representation, personal heads.

A sampled client: downloads theta unless it trained in the previous round (then it keeps
its own theta_i, as the reference does); P epochs on its head with theta_i frozen; E
epochs on theta_i minimising  loss + <lambda_i, theta_i - theta> + rho/2 ||theta_i - theta||^2
with the head frozen; then lambda_i += rho (theta_i - theta). It uploads theta_i (and its
BatchNorm state). The server averages the uploads, weighted by samples in vision and
uniformly in text, as the reference does.

The text reference also differs in two more ways, both constructor options here (set by
trainers/registry.py for the `_seq`/`_text` trainers): its duals start at lam_admm
instead of 0 (`FedEQConfig.lam_init`), and it divides the whole objective, ADMM terms
included, by the batch's token count, which makes the effective rho and lambda about
1000x smaller (`FedEQConfig.admm_scale = "tokens"`, spec 3.8 d).

The reference aggregates at the *start* of the next round; aggregating at the end of the
round gives identical client updates, and `prev_theta` keeps the value the reference
hands to unseen clients (the last round's uploads are never aggregated there).
"""

from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp

from trainers.aggregation import owner_count, owner_mean, split_owned
from trainers.algorithms.base import Algorithm, HParams, as_float, phase_stats
from trainers.task import token_mask
from utils.pytree import (
    merge,
    split_head,
    tree_add,
    tree_sq_norm,
    tree_sub,
    tree_vdot,
    tree_where,
)


def augmented_lagrangian(theta: dict, args, x: jnp.ndarray, mask: jnp.ndarray, out=None
                         ) -> jnp.ndarray:
    """<lambda_i, theta_i - theta> + rho/2 ||theta_i - theta||^2 over every shared leaf."""
    del x, mask, out
    lam, anchor, rho = args
    diff = tree_sub(theta, anchor)
    return tree_vdot(lam, diff) + 0.5 * rho * tree_sq_norm(diff)


def augmented_lagrangian_per_token(theta: dict, args, x: jnp.ndarray, mask: jnp.ndarray,
                                   out=None) -> jnp.ndarray:
    """The ADMM terms divided by the batch's non-padding input tokens: the text reference
    computes [NLL_sum + ADMM terms] / tokens, and NLL_sum / tokens is the task's loss."""
    tokens = jnp.sum(token_mask(x, mask).astype(jnp.float32))
    return augmented_lagrangian(theta, args, x, mask) / jnp.maximum(tokens, 1.0)


ADMM_SCALES = {"none": augmented_lagrangian, "tokens": augmented_lagrangian_per_token}


@dataclass(frozen=True)
class FedEQConfig:
    rho: float = 0.01
    lam_init: float = 0.0        # vision: the reference's duals always start at 0
    admm_scale: str = "none"     # "tokens": divide the ADMM terms by the batch token count
    dual_in_average: bool = False  # textbook ADMM: server averages theta_i + lambda_i / rho

    def __post_init__(self) -> None:
        if self.admm_scale not in ADMM_SCALES:
            raise ValueError(f"admm_scale {self.admm_scale!r} unknown; allowed: "
                             f"{', '.join(ADMM_SCALES)}")


class FedEQ(Algorithm):
    name = "fedeq"
    extra_initial_draw = True

    def __init__(self, task, hp: HParams, cfg: FedEQConfig = FedEQConfig(),
                 weighted: bool = True):
        """`weighted`: average the representations with weights proportional to n_i
        (still uniform under --unweighted_updates); the text reference averages
        uniformly."""
        super().__init__(task, replace(hp, weighted=hp.weighted and weighted))
        self.cfg = cfg

    @classmethod
    def from_options(cls, task, hp, options, text=None, **kwargs):
        cfg = options.fedeq
        if text is not None:
            cfg = replace(cfg, lam_init=options.lam_admm,
                          admm_scale="tokens" if text.admm_per_token else "none")
        return cls(task, hp, cfg, weighted=not (text is not None and text.uniform_average))

    @property
    def streams(self):
        # Head and representation batches come from the same seed (spec 3.8 step 4a).
        return ((0, max(self.hp.local_epochs, self.hp.personal_epochs)),)

    def init(self, params, state, num_clients):
        theta, phi = split_head(params)
        lam = jax.tree.map(lambda x: jnp.full_like(x, self.cfg.lam_init), theta)
        one = {"theta": theta, "phi": phi, "lam": lam, "state": state,
               "last_round": jnp.asarray(-2, jnp.int32)}
        clients = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape), one)
        server = {"theta": theta, "state": state, "prev_theta": theta, "prev_state": state,
                  "round": jnp.asarray(0, jnp.int32)}
        return server, clients

    def broadcast(self, server):
        return {"theta": server["theta"], "state": server["state"]}

    def client_update(self, server, client, data, schedule, rng):
        hp, cfg = self.hp, self.cfg
        anchor = server["theta"]
        keep_own = client["last_round"] == server["round"] - 1
        theta = tree_where(keep_own, client["theta"], anchor)
        state = tree_where(keep_own, client["state"], server["state"])

        sums = []
        phi = client["phi"]
        if hp.personal_epochs > 0:
            phi, state, s = self.local_sgd(phi, theta, state, data,
                                           schedule.stream(0, hp.personal_epochs), rng)
            sums.append(s)

        lam = client["lam"]
        theta, state, s = self.local_sgd(theta, phi, state, data,
                                         schedule.stream(0, hp.local_epochs), rng,
                                         ADMM_SCALES[cfg.admm_scale], (lam, anchor, cfg.rho))
        sums.append(s)
        lam = tree_add(lam, tree_sub(theta, anchor), cfg.rho)

        sent = tree_add(theta, lam, 1.0 / cfg.rho) if cfg.dual_in_average else theta
        upload = {"theta": sent, "state": state}
        new_client = {"theta": theta, "phi": phi, "lam": lam, "state": state,
                      "last_round": server["round"]}
        return new_client, upload, {"phase": phase_stats(*sums),
                                    "downloaded": as_float(~keep_own)}

    def server_update(self, server, uploads, weights):
        # Over each entry's owners: width tiers own only some hidden channels.
        sent, owned = split_owned(uploads)
        mean = owner_mean(sent, weights, owned)
        if owned is not None:   # entries no sampled client owns keep the server's value
            held = owner_count(owned, 0)
            mean = jax.tree.map(lambda m, n, old: jnp.where(n > 0, m, old), mean, held,
                                {"theta": server["theta"], "state": server["state"]})
        return {"theta": mean["theta"], "state": mean["state"],
                "prev_theta": server["theta"], "prev_state": server["state"],
                "round": server["round"] + 1}

    def confine(self, client, server, ownership):
        """After a narrowed client's update (`ownership(tree)`: its masks): the
        entries it does not own hold the server's value and their duals stay at their
        start, so the consensus terms exist only on owned entries. (The block's masked
        forward pass never reads those entries and the ADMM terms are separable, so
        nothing else a client computes depended on them.)"""
        owned = ownership(client["theta"])
        keep = lambda mine, other, m: jnp.where(m > 0, mine, other)
        theta = jax.tree.map(keep, client["theta"], server["theta"], owned)
        start = jax.tree.map(lambda x: jnp.full_like(x, self.cfg.lam_init), client["lam"])
        lam = jax.tree.map(keep, client["lam"], start, owned)
        return {**client, "theta": theta, "lam": lam}

    def eval_params(self, server, client):
        return merge(client["theta"], client["phi"]), client["state"]

    def adapt_unseen(self, server, init_params, init_state, data, schedule, rng):
        """theta from the start of the last round, the initial head, head-only training."""
        return self.adapt_head(server["prev_theta"], init_params, server["prev_state"], data,
                               schedule, rng)
