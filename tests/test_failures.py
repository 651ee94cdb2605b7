"""A non-finite client update stops the run with the round, client and quantity named,
and the last good checkpoint stays on disk."""

import jax
import jax.numpy as jnp
import pytest

from tests.helpers import small_engine
from trainers.engine import NonFiniteError
from utils import checkpoint
from utils.rundir import RunDir

BAD_ROUND = 2


def _poison(engine, corrupt):
    """Wraps the algorithm's client update so the first client of round BAD_ROUND is
    corrupted by `corrupt(upload, stats)`; the loop executor calls it once per client."""
    original = engine.alg.client_update
    calls = {"n": 0}

    def client_update(server, client, data, schedule, rng):
        new_client, upload, stats = original(server, client, data, schedule, rng)
        if calls["n"] == BAD_ROUND * engine.cohort_size:
            upload, stats = corrupt(upload, stats)
        calls["n"] += 1
        return new_client, upload, stats

    engine.alg.client_update = client_update


@pytest.mark.parametrize("what,corrupt", [
    ("uploaded parameters",
     lambda up, st: (jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan)
                                  if x.size else x, up), st)),
    ("training loss", lambda up, st: (up, {**st, "phase": st["phase"].at[1].set(jnp.inf)})),
])
def test_non_finite_update_names_round_client_quantity(tmp_path, what, corrupt):
    engine = small_engine("fedavg", rounds=4, run_dir=RunDir(tmp_path))
    _poison(engine, corrupt)
    with pytest.raises(NonFiniteError, match=f"round {BAD_ROUND}: client \\d+ .*{what}"):
        engine.run()
    fresh = small_engine("fedavg", rounds=4)
    server, clients = fresh.alg.init(*fresh.task.model.init(jax.random.PRNGKey(0),
                                     jnp.asarray(fresh.data.train[0].x[:2])), 8)
    saved = checkpoint.load(tmp_path, server, clients, {})
    assert saved.next_round == BAD_ROUND
    assert [h["round"] for h in saved.history] == list(range(BAD_ROUND))
