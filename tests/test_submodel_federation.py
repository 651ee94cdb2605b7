"""InCo's federation on the shared engine: cut/paste, the average over owners, the
client algorithms' reductions to FedAvg, and a short tiered run (tiny models)."""

import json

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data.federated import ClientSplit, FederatedData
from models.registry import ModelSpec
from models.stage_resnet import stage_resnet
from trainers.aggregation import OWNED, owner_mean
from trainers.algorithms.base import HParams
from trainers.algorithms.submodel_federation import inco_groups
from trainers.engine import Engine, RunConfig
from trainers.local import ClientData
from trainers.registry import AlgorithmOptions
from trainers.server_transforms import InCoConfig
from trainers.submodel_setup import build_submodel_federation
from trainers.submodels import ModuleView, module_names
from trainers.task import ClassificationTask
from utils.pytree import weighted_mean

WIDTHS = (4, 8, 8, 8)
LAYOUTS = {"resnet10": (1, 1, 1, 1), "resnet14": (1, 1, 2, 2), "resnet26": (3, 3, 3, 3)}


def _task(name: str) -> ClassificationTask:
    spec = ModelSpec(name, hk.transform_with_state(stage_resnet(3, LAYOUTS[name], WIDTHS)),
                     False)
    return ClassificationTask(spec)


def _data(num_clients: int = 6, seed: int = 0) -> FederatedData:
    rs = np.random.RandomState(seed)
    def split(n):
        return ClientSplit(rs.randn(n, 8, 8, 3).astype(np.float32),
                           rs.randint(0, 3, n).astype(np.int32))
    train = [split(int(n)) for n in rs.randint(10, 17, num_clients)]
    return FederatedData("toy", train, train, [], [], [str(i) for i in range(num_clients)],
                         [], 3, (8, 8, 3), global_test=split(24))


def _views():
    x = jnp.zeros((2, 8, 8, 3))
    shapes = {n: jax.eval_shape(_task(n).model.init, jax.random.PRNGKey(0), x)
              for n in LAYOUTS}
    universe = module_names(*shapes["resnet26"])
    return {n: ModuleView(module_names(*s), universe) for n, s in shapes.items()}


def _random_like(shapes, seed):
    rs = np.random.RandomState(seed)
    return jax.tree.map(lambda s: jnp.asarray(rs.randn(*s.shape), s.dtype), shapes)


def test_cut_then_paste_is_identity_on_owned_and_keeps_the_rest():
    views = _views()
    x = jnp.zeros((2, 8, 8, 3))
    # Random values of the models' shapes (a real init compiles for seconds).
    params, state = _random_like(jax.eval_shape(_task("resnet26").model.init,
                                                jax.random.PRNGKey(0), x), 0)
    small = _random_like(jax.eval_shape(_task("resnet10").model.init,
                                        jax.random.PRNGKey(0), x)[0], 1)
    view = views["resnet10"]
    cut = view.cut({"params": params, "state": state})
    assert set(cut["params"]) == set(small)
    for k in small:                      # same names, same shapes
        for leaf in small[k]:
            assert cut["params"][k][leaf].shape == small[k][leaf].shape
    changed = jax.tree.map(lambda a: a + 1.0, cut["params"])
    pasted = view.paste(params, changed)
    for k in params:
        for leaf in params[k]:
            want = changed[k][leaf] if k in small else params[k][leaf]
            np.testing.assert_array_equal(pasted[k][leaf], want)
    again = view.paste(params, view.cut(params))
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_owner_mean_with_full_ownership_equals_the_plain_mean_and_skips_unowned():
    rs = np.random.RandomState(0)
    stacked = {"a": {"w": jnp.asarray(rs.randn(3, 2, 2), jnp.float32)},
               "b": {"w": jnp.asarray(rs.randn(3, 4), jnp.float32)}}
    weights = jnp.asarray([1.0, 2.0, 5.0])
    ones = {"a": {"w": jnp.ones(3)}, "b": {"w": jnp.ones(3)}}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 owner_mean(stacked, weights, ones), weighted_mean(stacked, weights))
    partial = {"a": {"w": jnp.asarray([1.0, 0.0, 1.0])}, "b": {"w": jnp.zeros(3)}}
    got = owner_mean(stacked, jnp.ones(3), partial)
    np.testing.assert_allclose(got["a"]["w"], (stacked["a"]["w"][0] + stacked["a"]["w"][2]) / 2,
                               rtol=1e-6)
    np.testing.assert_array_equal(got["b"]["w"], 0.0)    # no owner: the update is zero
    # channel masks broadcast along trailing axes
    chan = {"a": {"w": jnp.asarray([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])},
            "b": {"w": jnp.ones(3)}}
    got = owner_mean(stacked, jnp.ones(3), chan)
    np.testing.assert_allclose(got["a"]["w"][:, 1], stacked["a"]["w"][1, :, 1], rtol=1e-6)


def test_inco_groups_follow_the_rank_rule():
    groups = inco_groups(100)
    assert [int(g) for g in groups[[0, 19, 20, 39, 40, 79, 80, 99]]] == [0, 0, 1, 1, 2, 3, 4, 4]
    assert np.bincount(groups).tolist() == [20] * 5
    assert inco_groups(7).tolist() == [0, 1, 2, 3, 4, 4, 4]
    assert inco_groups(3).tolist() == [4, 4, 4]


ADAM = HParams(lr=0.01, local_epochs=1, optimizer="adam", weighted=False)


def _engine(trainer, options=None, tiers=("resnet10", "resnet26"), hp=ADAM, rounds=0,
            run_dir=None, executor="loop", **cfg):
    options = options or AlgorithmOptions()
    data = _data()
    tasks = [_task(n) for n in tiers]
    alg = build_submodel_federation(trainer, tiers, tasks, hp, options, InCoConfig(),
                                    data.num_clients, jnp.asarray(data.train[0].x[:2]))
    run = RunConfig(num_rounds=rounds, seed=1, clients_per_round=0.5, batch_size=4,
                    executor=executor, quiet=True, global_eval_batch=8, **cfg)
    return Engine(data, tasks[-1], alg, run, run_dir)


def test_incoavg_round_logs_tiers_bytes_and_the_mean_accuracy(tmp_path):
    from utils.rundir import RunDir
    eng = _engine("incoavg", run_dir=RunDir(tmp_path))
    summary = eng.run()
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    tiers = record["test_acc_tiers"]
    assert set(tiers) == {"resnet10", "resnet26"}
    assert summary["final_test_acc"] == pytest.approx(np.mean(list(tiers.values())))
    # 24 pooled test examples in batches of 8: every accuracy is a multiple of 1/24.
    assert all(abs(a * 24 - round(a * 24)) < 1e-6 for a in tiers.values())
    up, down = record["up_bytes_tiers"], record["down_bytes_tiers"]
    for name in record["cohort_tiers"]:
        assert 0 < up[name] <= down[name] * 1.01
    if len(up) == 2:
        assert up["resnet10"] < up["resnet26"]
    assert record["up_bytes"] == sum(up[t] for t in record["cohort_tiers"])


def test_heteroavg_leaves_unowned_blocks_unchanged_and_averages_owners():
    """A round whose cohort holds no server-tier client must not touch the blocks only
    the server tier owns; block 0 (everyone's) must be the mean of the senders."""
    eng = _engine("heteroavg")
    alg = eng.alg
    x = jnp.asarray(eng.data.train[0].x[:2])
    params, state = eng.task.model.init(jax.random.PRNGKey(0), x)
    server, clients = alg.init(params, state, eng.num_clients)
    cohort = np.asarray([0, 2])            # tier 0 only (clients 0-2 of 6)
    assert set(alg.tier_of[cohort]) == {0}
    schedule, keys, _ = eng._client_inputs(eng.batcher, cohort, jax.random.PRNGKey(3))
    rows = jnp.asarray(cohort)
    inputs = (jax.tree.map(lambda a: a[rows], clients),
              ClientData(eng.train[0][rows], eng.train[1][rows]), schedule, keys)
    _, uploads, _ = eng._train_cohort(server, inputs, cohort)
    new = alg.server_update(server, uploads, jnp.ones(2))
    only_server = "layer1_2/~/conv1"
    np.testing.assert_array_equal(new["params"][only_server]["w"],
                                  server["params"][only_server]["w"])
    np.testing.assert_array_equal(new["state"]["layer1_2/~/bn1"]["mean"],
                                  server["state"]["layer1_2/~/bn1"]["mean"])
    shared = "layer1_0/~/conv1"
    mean = jnp.mean(uploads["params"][shared]["w"], 0)
    np.testing.assert_allclose(new["params"][shared]["w"],
                               server["params"][shared]["w"] + mean, rtol=1e-5, atol=1e-7)
    assert uploads[OWNED]["params"][only_server]["w"].tolist() == [0.0, 0.0]
    # counters stay integers: the truncated mean of the owners' steps is added
    count = new["state"]["layer1_0/~/bn1"]["count"]
    assert count.dtype == server["state"]["layer1_0/~/bn1"]["count"].dtype
