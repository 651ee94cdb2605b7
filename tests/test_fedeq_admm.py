"""FeDEQ's ADMM round against a hand computation on a toy objective."""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from deq.stats import SolverStats
from models.base import ModelOutput
from trainers.algorithms.base import HParams
from trainers.algorithms.fedeq import FedEQ, FedEQConfig
from trainers.local import ClientData, Schedule


@dataclass(frozen=True)
class _Model:
    name: str = "toy"
    is_deq: bool = False


@dataclass(frozen=True)
class ToyTask:
    """Loss 0.5 ||theta||^2 + 0.5 ||phi||^2 whatever the batch: gradients are the params."""

    model: _Model = _Model()

    def apply(self, params, state, rng, x, is_training, probe=None):
        value = 0.5 * sum(jnp.sum(v ** 2) for v in jax.tree.leaves(params))
        return ModelOutput(jnp.full((x.shape[0], 1), value), x, SolverStats.zeros()), state

    def loss(self, logits, y, mask, x=None):
        return logits[0, 0]

    def l2(self, params):
        return 0.0


def test_client_round_matches_hand_computation():
    lr, rho, steps_per_epoch, e_body, e_head = 0.1, 0.5, 2, 2, 1
    alg = FedEQ(ToyTask(), HParams(lr=lr, local_epochs=e_body, personal_epochs=e_head),
                FedEQConfig(rho=rho))
    theta_srv = np.array([1.0, -2.0, 0.5], np.float32)
    theta_own = np.array([0.3, 0.1, -0.4], np.float32)
    lam0 = np.array([0.2, -0.1, 0.05], np.float32)
    phi0 = np.array([2.0, -1.0], np.float32)
    server = {"theta": {"body": {"w": jnp.asarray(theta_srv)}}, "state": {},
              "prev_theta": {}, "prev_state": {}, "round": jnp.asarray(4)}
    client = {"theta": {"body": {"w": jnp.asarray(theta_own)}},
              "phi": {"player_logits": {"w": jnp.asarray(phi0)}},
              "lam": {"body": {"w": jnp.asarray(lam0)}}, "state": {},
              "last_round": jnp.asarray(1)}  # not sampled last round: downloads theta
    data = ClientData(jnp.zeros((4, 1)), jnp.zeros((4,), jnp.int32))
    sched = Schedule(jnp.zeros((1, 2, steps_per_epoch, 2), jnp.int32),
                     jnp.ones((1, 2, steps_per_epoch, 2), bool))
    new, upload, stats = alg.client_update(server, client, data, sched, jax.random.PRNGKey(0))

    phi = phi0.copy()
    for _ in range(e_head * steps_per_epoch):
        phi = phi - lr * phi
    theta = theta_srv.copy()  # downloaded
    for _ in range(e_body * steps_per_epoch):
        grad = theta + lam0 + rho * (theta - theta_srv)
        theta = theta - lr * grad
    lam = lam0 + rho * (theta - theta_srv)
    np.testing.assert_allclose(new["phi"]["player_logits"]["w"], phi, rtol=1e-6)
    np.testing.assert_allclose(new["theta"]["body"]["w"], theta, rtol=1e-6)
    np.testing.assert_allclose(new["lam"]["body"]["w"], lam, rtol=1e-6)
    np.testing.assert_allclose(upload["theta"]["body"]["w"], theta, rtol=1e-6)
    assert float(stats["downloaded"]) == 1.0 and int(new["last_round"]) == 4

    # Sampled in the previous round: keeps its own theta (no download), same rules.
    client["last_round"] = jnp.asarray(3)
    new, _, stats = alg.client_update(server, client, data, sched, jax.random.PRNGKey(0))
    theta = theta_own.copy()
    for _ in range(e_body * steps_per_epoch):
        theta = theta - lr * (theta + lam0 + rho * (theta - theta_srv))
    np.testing.assert_allclose(new["theta"]["body"]["w"], theta, rtol=1e-6)
    assert float(stats["downloaded"]) == 0.0


def test_server_averages_uploads_by_samples_and_remembers_previous_theta():
    alg = FedEQ(ToyTask(), HParams(), FedEQConfig())
    server = {"theta": {"b": {"w": jnp.zeros(2)}}, "state": {}, "prev_theta": {},
              "prev_state": {}, "round": jnp.asarray(0)}
    uploads = {"theta": {"b": {"w": jnp.array([[1.0, 2.0], [4.0, 8.0]])}}, "state": {}}
    new = alg.server_update(server, uploads, jnp.array([30.0, 10.0]))
    np.testing.assert_allclose(new["theta"]["b"]["w"], [1.75, 3.5])
    np.testing.assert_allclose(new["prev_theta"]["b"]["w"], [0.0, 0.0])
    assert int(new["round"]) == 1


def test_dual_in_average_flag_sends_theta_plus_scaled_dual():
    lr, rho = 0.1, 0.5
    alg = FedEQ(ToyTask(), HParams(lr=lr, local_epochs=1, personal_epochs=0),
                FedEQConfig(rho=rho, dual_in_average=True))
    server = {"theta": {"b": {"w": jnp.ones(2)}}, "state": {}, "prev_theta": {},
              "prev_state": {}, "round": jnp.asarray(0)}
    client = {"theta": {"b": {"w": jnp.ones(2)}}, "phi": {"player_logits": {"w": jnp.ones(1)}},
              "lam": {"b": {"w": jnp.zeros(2)}}, "state": {}, "last_round": jnp.asarray(-2)}
    data = ClientData(jnp.zeros((2, 1)), jnp.zeros((2,), jnp.int32))
    sched = Schedule(jnp.zeros((1, 1, 1, 2), jnp.int32), jnp.ones((1, 1, 1, 2), bool))
    new, upload, _ = alg.client_update(server, client, data, sched, jax.random.PRNGKey(0))
    expected = new["theta"]["b"]["w"] + new["lam"]["b"]["w"] / rho
    np.testing.assert_allclose(upload["theta"]["b"]["w"], expected, rtol=1e-6)
