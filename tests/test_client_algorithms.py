"""FedProx, SCAFFOLD, FedNova and MOON reduce to FedAvg where their definitions say so
(inco issue 7), on a linear model that compiles in a moment."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from data.synthetic import make_synthetic
from deq.stats import SolverStats
from models.base import ModelOutput
from models.registry import ModelSpec
from trainers.algorithms.base import HParams
from trainers.algorithms.moon import contrastive_penalty
from trainers.engine import Engine, RunConfig
from trainers.local import ClientData
from trainers.registry import AlgorithmOptions, build_algorithm
from trainers.task import ClassificationTask


def _task():
    def forward(x, is_training, probe=None):
        del is_training, probe
        h = jax.nn.relu(hk.Linear(6, name="body")(x))
        return ModelOutput(hk.Linear(4, name="out")(h), h, SolverStats.zeros())
    return ClassificationTask(ModelSpec("linear", hk.transform_with_state(forward), False))


DEFAULT_OPTIONS, DEFAULT_HP = AlgorithmOptions(), HParams(lr=0.1, local_epochs=2)


def _one_round(trainer, options=DEFAULT_OPTIONS, hp=DEFAULT_HP, equal_sizes=False, batch=5):
    """The server after one round in which every client trains."""
    sizes = dict(min_samples=20, max_samples=20) if equal_sizes else dict(min_samples=10,
                                                                           max_samples=60)
    data = make_synthetic(num_clients=4, seed=1, frac_unseen=0.0, **sizes)
    task = _task()
    alg = build_algorithm(trainer, task, hp, options)
    eng = Engine(data, task, alg, RunConfig(num_rounds=0, seed=0, clients_per_round=1.0,
                                            batch_size=batch, executor="loop", quiet=True))
    x = jnp.asarray(data.train[0].x[:2])
    params, state = task.model.init(jax.random.PRNGKey(0), x)
    server, clients = alg.init(params, state, eng.num_clients)
    cohort = np.arange(eng.num_clients)
    schedule, keys, _ = eng._client_inputs(eng.batcher, cohort, jax.random.PRNGKey(5))
    inputs = (clients, ClientData(eng.train[0], eng.train[1]), schedule, keys)
    _, uploads, stats = eng._train_cohort(server, inputs, cohort)
    weights = alg.aggregation_weights(jnp.asarray(eng.sizes))
    return alg.server_update(server, uploads, weights), stats


def _close(a, b, tol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol),
                 a["params"], b["params"])


def test_fedprox_with_mu_zero_is_fedavg_and_mu_pulls_towards_the_global_model():
    fedavg, _ = _one_round("fedavg")
    _close(_one_round("fedprox", AlgorithmOptions(prox_mu=0.0))[0], fedavg)
    strong, _ = _one_round("fedprox", AlgorithmOptions(prox_mu=10.0))
    start, _ = _one_round("fedprox", AlgorithmOptions(prox_mu=0.0),
                          HParams(lr=0.0, local_epochs=1))
    moved = lambda s: sum(float(jnp.sum(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(s["params"]), jax.tree.leaves(start["params"]), strict=True))
    assert 0 < moved(strong) < moved(fedavg)


def test_scaffold_with_zero_variates_and_one_step_is_fedavg():
    hp = HParams(lr=0.1, local_epochs=1)
    fedavg, _ = _one_round("fedavg", hp=hp, batch=-1)
    scaffold, stats = _one_round("scaffold", hp=hp, batch=-1)
    assert np.all(np.asarray(stats["phase"])[:, 0] == 1)      # one step per client
    _close(scaffold, fedavg)
    # The server's variate moved: c = (1/N) sum (c_i+ - 0), nonzero after training.
    assert any(float(jnp.abs(v).max()) > 0 for v in jax.tree.leaves(scaffold["control"]))


def test_scaffold_variates_change_later_rounds():
    hp = HParams(lr=0.1, local_epochs=2)
    assert not np.allclose(np.asarray(jax.tree.leaves(_one_round("scaffold", hp=hp)[0]
                                                      ["control"])[0]), 0)


def test_fednova_with_equal_steps_is_fedavg_and_differs_otherwise():
    fedavg, _ = _one_round("fedavg", equal_sizes=True)
    _close(_one_round("fednova", equal_sizes=True)[0], fedavg, 1e-5)
    unequal_avg, _ = _one_round("fedavg")
    unequal_nova, _ = _one_round("fednova")
    assert not np.allclose(jax.tree.leaves(unequal_avg["params"])[0],
                           jax.tree.leaves(unequal_nova["params"])[0])


def test_moon_with_mu_zero_is_fedavg_and_its_term_is_finite_when_all_agree():
    fedavg, _ = _one_round("fedavg")
    _close(_one_round("moon", AlgorithmOptions(moon_mu=0.0))[0], fedavg)
    task = _task()
    x = jnp.zeros((3, 5))                                    # zero features: cos is 0/0
    params, state = task.model.init(jax.random.PRNGKey(0), x)
    out, _ = task.apply(params, state, None, x, True)
    args = (jnp.float32(1.0), jnp.float32(0.5), (params, state), (params, state),
            jax.random.PRNGKey(0))
    value = contrastive_penalty(task)(params, args, x, jnp.ones(3, bool), out)
    assert np.isfinite(float(value))
    x = jnp.asarray(np.random.RandomState(0).randn(3, 5), jnp.float32)
    out, _ = task.apply(params, state, None, x, True)
    value = contrastive_penalty(task)(params, args, x, jnp.ones(3, bool), out)
    np.testing.assert_allclose(float(value), np.log(2.0), rtol=1e-5)   # equal similarities
    # In a client's first round its previous model is the global one, so the term is
    # the constant log 2 (MOON's round 0 is FedAvg's); once they differ it pulls.
    prev = jax.tree.map(lambda a: a + 0.3, params)
    args = (jnp.float32(1.0), jnp.float32(0.5), (params, state), (prev, state),
            jax.random.PRNGKey(0))
    grad = jax.grad(lambda p: contrastive_penalty(task)(
        p, args, x, jnp.ones(3, bool), task.apply(p, state, None, x, True)[0]))(params)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad)) > 1e-4
