"""FeDEQ compute tiers: solver budgets as data, width masks, approximate gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data.federated import ClientSplit, FederatedData
from deq.anderson import batched_anderson
from deq.budget import SolverBudget
from deq.config import SolverConfig
from deq.fixed_point import fixed_point
from models.deq_cost import deq_resnet_cost
from models.deq_resnet import (
    hidden_channels,
    hidden_mask,
    make_resnet_block,
    row_group_norm,
    slice_block,
)
from models.registry import build_model
from tests.helpers import _engine, small_engine
from trainers.algorithms.base import HParams
from trainers.algorithms.deq_tiers import DeqTiers
from trainers.algorithms.fedeq import FedEQ, FedEQConfig, augmented_lagrangian
from trainers.deq_tier_table import SolverTier, assign_tiers, parse_tiers
from trainers.engine import Engine, RunConfig
from trainers.local import _jitted_step
from trainers.task import ClassificationTask
from utils.input_error import InputError


# ------------------------------------------------------------------ the tier table
def test_inline_and_json_tables_parse_and_bad_ones_are_named(tmp_path):
    tiers = parse_tiers("maxiter=4,width=0.25;name=big,maxiter=20,epochs=2")
    assert [t.name for t in tiers] == ["tier0", "big"]
    assert tiers[0].maxiter == 4 and tiers[0].width == 0.25 and tiers[1].epochs == 2
    path = tmp_path / "t.json"
    path.write_text('{"tiers": [{"maxiter": 3, "tol": 0.01}]}')
    assert parse_tiers(str(path))[0].tol == 0.01
    for bad, words in [("maxiter=0", "at least 1"), ("width=2", "(0, 1]"),
                       ("speed=3", "unknown fields"), ("maxiter", "key=value"),
                       ("maxiter=x", "wrong type"), (str(tmp_path / "no.json"), "does not")]:
        with pytest.raises(InputError, match=words.replace("(", r"\(").replace("]", r"\]")):
            parse_tiers(bad)
    resolved = tiers[0].resolved(20, 1e-3, 50, 5)
    assert (resolved.maxiter, resolved.tol, resolved.bwd_maxiter, resolved.epochs) == (
        4, 1e-3, 50, 5)


def test_assignment_groups_and_seeded_random_draw():
    assert assign_tiers(6, 3, "groups", 0).tolist() == [0, 0, 1, 1, 2, 2]
    a, b = assign_tiers(50, 3, "random", 7), assign_tiers(50, 3, "random", 7)
    assert np.array_equal(a, b) and set(a.tolist()) == {0, 1, 2}
    assert not np.array_equal(a, assign_tiers(50, 3, "random", 8))


# ------------------------------------------------------------------ solver budgets
def _contractive(seed=0, dim=12, batch=3, norm=0.8):
    rng = np.random.RandomState(seed)
    a = rng.randn(dim, dim)
    a = norm * a / np.linalg.norm(a, 2)
    return jnp.asarray(a, jnp.float32), jnp.asarray(rng.randn(batch, dim), jnp.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_residual_does_not_increase_with_the_cap_on_a_contractive_block(seed):
    """While fewer iterates than the history are stored, Anderson is the plain
    contraction, whose residual falls at every step. After that its residual is not
    monotone in general (measured: up to 3% above an earlier cap's, seed 0, near the
    ridge's resolution), so from there it must stay within 5% of the best lower cap."""
    a, u = _contractive(seed)
    fun = jax.jit(lambda z, cap: batched_anderson(lambda x: x @ a.T + u, z, 5, 1e-4, cap,
                                                  0.0))
    errors = np.stack([np.asarray(fun(jnp.zeros_like(u), jnp.asarray(cap))[2])
                       for cap in range(1, 31)])
    assert np.all(np.diff(errors[:5], axis=0) < 0)
    best = np.minimum.accumulate(errors, axis=0)
    assert np.all(errors[1:] <= 1.05 * best[:-1])
    assert np.all(errors[-1] < 1e-4 * errors[0])
    # the traced cap runs exactly that many iterations
    assert np.asarray(fun(jnp.zeros_like(u), jnp.asarray(3))[1]).tolist() == [3, 3, 3]


def _linear_block(p, z, u):
    return z @ p["a"].T + u


@pytest.mark.parametrize("solver,k", [("jacobian_free", 1), ("unrolled", 1), ("unrolled", 4)])
def test_one_step_and_unrolled_gradients_match_the_hand_computation(solver, k):
    """f(z) = A z + u, loss c . z*: the gradient w.r.t. u is sum_{j<k} (A^T)^j c, and
    w.r.t. A it is w z*^T with that w."""
    a, u = _contractive(seed=1, batch=2)
    c = jnp.asarray(np.random.RandomState(2).randn(*u.shape), jnp.float32)
    cfg = SolverConfig(bwd_solver=solver, fwd_tol=0.0, fwd_maxiter=200, bwd_maxiter=k)

    def loss(params, uu):
        z, _ = fixed_point(_linear_block, params, uu, jnp.zeros_like(uu), None, cfg)
        return jnp.sum(c * z), z

    (d_params, d_u), z = jax.grad(loss, argnums=(0, 1), has_aux=True)({"a": a}, u)
    w = np.zeros_like(np.asarray(c))
    power = np.asarray(c)
    for _ in range(k):
        w += power
        power = power @ np.asarray(a)       # (A^T)^j c, row by row
    np.testing.assert_allclose(np.asarray(d_u), w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(d_params["a"]), w.T @ np.asarray(z), rtol=1e-4,
                               atol=1e-5)


def test_implicit_gradient_is_the_limit_of_the_unrolled_one():
    a, u = _contractive(seed=3, batch=2, norm=0.5)
    grads = {}
    for solver, k in [("normal_cg", 100), ("unrolled", 60)]:
        cfg = SolverConfig(bwd_solver=solver, fwd_tol=0.0, fwd_maxiter=200, bwd_maxiter=k,
                           bwd_tol=1e-8)
        grads[solver] = jax.grad(lambda uu, cfg=cfg: jnp.sum(fixed_point(
            _linear_block, {"a": a}, uu, jnp.zeros_like(uu), None, cfg)[0]))(u)
    np.testing.assert_allclose(grads["unrolled"], grads["normal_cg"], rtol=1e-3, atol=1e-4)


def _deq_resnet(solver: SolverConfig):
    return build_model("deq_resnet_s", num_classes=5, input_shape=(8, 8, 1), solver=solver)


def test_a_cap_of_one_trains_without_nan_and_uses_one_iteration():
    model = _deq_resnet(SolverConfig(bwd_solver="jacobian_free"))
    x = jnp.asarray(np.random.RandomState(0).rand(4, 8, 8, 1), jnp.float32)
    params, state = model.init(jax.random.PRNGKey(0), x)
    budget = SolverBudget.of(1, 1e-3, 1, hidden_mask(128, 0.25))

    def loss(p):
        out, _ = model.transformed.apply(p, state, None, x, True, None, budget)
        return jnp.mean(out.logits ** 2), out.solver_stats

    grads, stats = jax.grad(loss, has_aux=True)(params)
    assert float(stats.fwd_iters) == 1.0
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


# ------------------------------------------------------------------ width tiers
def _block_inputs(c1=16, c2=32, seed=0):
    rng = np.random.RandomState(seed)
    p = {"conv1": jnp.asarray(rng.randn(3, 3, c1, c2) * 0.1, jnp.float32),
         "conv2": jnp.asarray(rng.randn(3, 3, c2, c1) * 0.1, jnp.float32),
         "gn1": (jnp.asarray(1 + rng.rand(c2), jnp.float32),
                 jnp.asarray(rng.randn(c2), jnp.float32)),
         "gn2": (jnp.ones(c1), jnp.zeros(c1)), "gn3": (jnp.ones(c1), jnp.zeros(c1))}
    z = jnp.asarray(rng.randn(2, 6, 6, c1), jnp.float32)
    u = jnp.asarray(rng.randn(2, 6, 6, c1), jnp.float32)
    return p, z, u


@pytest.mark.parametrize("rate", [0.25, 0.5])
def test_sliced_and_masked_blocks_agree(rate):
    p, z, u = _block_inputs()
    block = make_resnet_block(fast_conv=True)
    keep = hidden_channels(32, rate)
    assert len(keep) == int(32 * rate)
    masked = block({**p, "hidden": jnp.asarray(hidden_mask(32, rate))}, z, u)
    sliced = block(slice_block(p, keep), z, u)
    np.testing.assert_allclose(masked, sliced, rtol=1e-5, atol=1e-5)


def test_a_full_mask_is_the_plain_block_and_group_norm():
    p, z, u = _block_inputs(seed=1)
    block = make_resnet_block(fast_conv=True)
    np.testing.assert_allclose(block({**p, "hidden": jnp.ones(32)}, z, u), block(p, z, u),
                               rtol=1e-5, atol=1e-5)
    x = jnp.asarray(np.random.RandomState(2).randn(2, 4, 5, 16), jnp.float32)
    np.testing.assert_allclose(row_group_norm(x, 1.0, 0.0, channels=jnp.ones(16)),
                               row_group_norm(x, 1.0, 0.0), rtol=1e-5, atol=1e-5)


def test_macs_shrink_with_width_and_iterations():
    full = deq_resnet_cost((28, 28, 1), 64, 128, 62)
    quarter = deq_resnet_cost((28, 28, 1), 64, 32, 62)
    assert full.block == 2 * 14 * 14 * 9 * 64 * 128 == 4 * quarter.block
    assert full.stem == 28 * 28 * 9 * 64 and quarter.stem == full.stem
    assert full.forward(20) - full.forward(4) == 16 * full.block
    assert full.training(4, 10, "normal_cg") > full.training(4, 10, "gmres") > full.forward(4)


# ------------------------------------------------------------------ federations
def _image_data(clients=4, n=12, shape=(8, 8, 1), classes=5, seed=0):
    rng = np.random.RandomState(seed)
    split = lambda m: ClientSplit(rng.rand(m, *shape).astype(np.float32),
                                  rng.randint(0, classes, m).astype(np.int32))
    return FederatedData("tiny-images", [split(n) for _ in range(clients)],
                         [split(6) for _ in range(clients)], [], [],
                         [f"c{i}" for i in range(clients)], [], classes, shape)


def _tier_engine(tiers, data, rounds=1, executor="loop", bwd="normal_cg", eval_maxiter=None):
    solver = SolverConfig(bwd_solver=bwd)
    model = build_model("deq_resnet_s", num_classes=data.num_classes,
                        input_shape=data.input_shape, solver=solver)
    task = ClassificationTask(model)
    hp = HParams(lr=0.05, local_epochs=1, personal_epochs=1)
    base = FedEQ(task, hp, FedEQConfig(rho=0.1))
    resolved = [t.resolved(solver.maxiter, solver.tol, solver.bwd_maxiter, hp.local_epochs,
                           bwd) for t in tiers]
    alg = DeqTiers(base, resolved, assign_tiers(len(data.train), len(tiers), "groups", 0),
                   128, bwd, eval_maxiter,
                   [deq_resnet_cost(data.input_shape, 64, len(hidden_channels(128, t.width)),
                                    data.num_classes) for t in resolved])
    cfg = RunConfig(num_rounds=rounds, seed=0, clients_per_round=0.5, batch_size=6,
                    executor=executor, eval_chunk=6, quiet=True)
    return Engine(data, task, alg, cfg)


def test_never_owned_hidden_channels_keep_their_initial_values():
    data = _image_data()
    engine = _tier_engine([SolverTier(maxiter=3, width=0.5), SolverTier(maxiter=3, width=0.25)],
                          data, rounds=1)
    summary = engine.run()
    x = jnp.asarray(data.train[0].x[:2])
    init, _ = engine.task.model.init(jax.random.PRNGKey(0), x)
    block0, block1 = init["deq_block"], engine.final_server["theta"]["deq_block"]
    never = np.setdiff1d(np.arange(128), hidden_channels(128, 0.5))
    owned = hidden_channels(128, 0.25)
    for leaf, axis in [("conv1_w", 3), ("conv2_w", 2), ("gn1_scale", 0), ("gn1_offset", 0)]:
        a, b = np.asarray(block0[leaf]), np.asarray(block1[leaf])
        np.testing.assert_array_equal(np.take(a, never, axis), np.take(b, never, axis))
        assert not np.allclose(np.take(a, owned, axis), np.take(b, owned, axis))
    assert summary["final_test_acc_tiers"].keys() == {"tier0", "tier1"}
    # every client's duals are zero off its own channels, its theta there the server's
    clients = engine.final_clients["base"]
    for i, k in enumerate(engine.alg.tier_of):
        off = np.setdiff1d(np.arange(128), hidden_channels(128, [0.5, 0.25][k]))
        lam = np.asarray(clients["lam"]["deq_block"]["conv1_w"][i])
        assert np.all(np.take(lam, off, 3) == 0)
    last = engine.history[-1]
    assert last["up_bytes_tiers"]["tier1"] < last["up_bytes_tiers"]["tier0"]
    assert set(last["train_macs_per_example_tiers"]) <= {"tier0", "tier1"}


def test_tiers_at_the_reference_settings_reproduce_the_homogeneous_run():
    homogeneous = small_engine("fedeq", rounds=2).run()

    def tiered(task, hp):
        base = FedEQ(task, hp, FedEQConfig(rho=0.1))
        tiers = [SolverTier(name=f"t{k}").resolved(20, 1e-3, 50, hp.local_epochs)
                 for k in range(3)]
        return DeqTiers(base, tiers, assign_tiers(8, 3, "groups", 0), None, "normal_cg")

    summary = _engine(tiered, "loop", 0, 2, 0.0, None, 0.5).run()
    for key in ("final_test_acc", "final_train_acc"):
        assert summary[key] == pytest.approx(homogeneous[key], abs=1e-6)
    assert set(summary["final_test_acc_tiers"]) == {"t0", "t1", "t2"}


def test_one_program_serves_every_cap_and_the_test_time_cap_is_logged():
    data = _image_data(seed=1)
    engine = _tier_engine([SolverTier(maxiter=2), SolverTier(maxiter=4)], data,
                          eval_maxiter=12, bwd="unrolled")
    engine.run()
    last = engine.history[-1]
    assert set(last["test_at12_acc_tiers"]) == {"tier0", "tier1"}
    for name, cap in (("tier0", 2), ("tier1", 4)):
        assert last["test_solver_iters_tiers"][name] == pytest.approx(cap)
        assert last["test_at12_solver_iters_tiers"][name] > cap
    for name, iters in last["solver_iters_tiers"].items():
        assert iters == pytest.approx({"tier0": 2, "tier1": 4}[name])
        assert np.isfinite(last["solver_rel_residual_tiers"][name])
    # the representation step was compiled once for both caps (caps are arguments)
    step = _jitted_step(engine.task, engine.alg.hp.optimizer_spec, augmented_lagrangian,
                        True, None)
    assert step._cache_size() == 1


# ------------------------------------------------------------------ width search
def test_width_search_writes_snapshots_and_a_tier_table_the_run_reads(tmp_path, monkeypatch):
    from trainers import deq_search
    from trainers.dac.centralised import TrainSettings

    rng = np.random.RandomState(0)
    data = (rng.rand(24, 8, 8, 1).astype(np.float32), rng.randint(0, 5, 24).astype(np.int32),
            rng.rand(8, 8, 8, 1).astype(np.float32), rng.randint(0, 5, 8).astype(np.int32))
    monkeypatch.setattr(deq_search, "pooled", lambda *a: (data, 5, (8, 8, 1)))
    monkeypatch.setitem(deq_search.MODEL_OF, "femnist", "deq_resnet_s")
    # a threshold above every gate: all but the floor are cut, so the budget fits
    result = deq_search.run_search("femnist", "", 1, tmp_path, TrainSettings(
        epochs=1, batch_size=12), [1e12, 5e6], maxiter=3, threshold=10.0, floor=8, quiet=True)
    snap = result["snapshots"][0]
    assert snap["channels"] == 8 and 1 <= snap["expected_iters"] <= 3
    cost = deq_resnet_cost((8, 8, 1), 64, 8, 5)
    assert snap["macs"] == pytest.approx(cost.forward(snap["expected_iters"]))
    tiers = parse_tiers(str(tmp_path / "tiers.json"))
    assert [t.width for t in tiers] == [8 / 128] * 2 and tiers[0].maxiter == 3
    with pytest.raises(InputError, match="smallest is epoch 0"):
        deq_search.select(result["snapshots"], 1.0)


@pytest.mark.parametrize("executor", ["map", "threads"])
def test_tier_budgets_give_the_loop_numbers_under_other_executors(executor):
    def tiered(task, hp):
        base = FedEQ(task, hp, FedEQConfig(rho=0.1))
        tiers = [SolverTier(maxiter=m, epochs=e).resolved(20, 1e-3, 50, hp.local_epochs)
                 for m, e in ((2, 1), (5, 2))]
        return DeqTiers(base, tiers, assign_tiers(8, 2, "groups", 0), None, "normal_cg", 30)

    loop = _engine(tiered, "loop", 0, 1, 0.0, None, 0.5).run()
    other = _engine(tiered, executor, 0, 1, 0.0, None, 0.5).run()
    for key in ("final_test_acc", "final_train_acc"):
        assert other[key] == pytest.approx(loop[key], abs=1e-6)
    assert other["final_test_acc_tiers"] == pytest.approx(loop["final_test_acc_tiers"])


@pytest.mark.slow
def test_text_fedeq_runs_with_iteration_tiers(tmp_path, shared_compile_env):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers import TINY_SHAKESPEARE_FLAGS, write_tiny_shakespeare

    root = Path(__file__).resolve().parent.parent
    write_tiny_shakespeare(tmp_path / "data")
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(root / "main.py"), "--trainer", "fedeq_text", "-d", "shakespeare",
         "--data_dir", str(tmp_path / "data"), *TINY_SHAKESPEARE_FLAGS, "-t", "1",
         "-lr", "0.1", "--tiers", "maxiter=3;maxiter=20", "--eval_maxiter", "20",
         "-o", str(out)], cwd=root, env=shared_compile_env, capture_output=True, text=True,
        timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # Round 0 trains one client of each tier from the same model. Head steps solve twice
    # (eval_resolve), so with -pe 1 -le 1 a cap of c averages 1.5 c. (Later rounds start
    # from an average that includes a 3-step client, where the Broyden may stop early
    # on its divergence guard: only the caps bound them.)
    assert rounds[0]["solver_iters_tiers"] == {"tier0": 4.5, "tier1": 30.0}
    for r in rounds:
        assert r["solver_iters_tiers"].get("tier0", 0) <= 6
        assert r["solver_iters_tiers"].get("tier1", 0) <= 40
    assert set(rounds[-1]["test_at20_acc_tiers"]) == {"tier0", "tier1"}
    assert json.loads((out / "tiers.json").read_text())["tier_of"] == [0, 0, 1, 1]
