"""The vision baselines (spec 3.2-3.7) against hand computations on a toy objective, and
each trainer end to end through main.py."""

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deq.stats import SolverStats
from models.base import ModelOutput
from tests.helpers import trainer_engine
from trainers.algorithms.base import HParams
from trainers.algorithms.ditto import Ditto
from trainers.algorithms.fedper import FedPer
from trainers.algorithms.fedrep import FedRep
from trainers.algorithms.finetune import Finetune
from trainers.algorithms.knnper import KNNPer, knn_probabilities
from trainers.algorithms.local import Local
from trainers.engine import _pooled
from trainers.local import ClientData, Schedule
from trainers.registry import AlgorithmOptions, build_algorithm
from utils import checkpoint
from utils.pytree import stack
from utils.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
LR = 0.1


@dataclass(frozen=True)
class _Model:
    name: str = "toy"
    is_deq: bool = False


@dataclass(frozen=True)
class QuadTask:
    """Per-example loss 0.5 sum over leaves ||leaf - x_i||^2, so every leaf moves on its
    own: one SGD step on a batch with mean m maps w to w - lr (w - m). The model state
    counts training-mode forward passes, standing in for BatchNorm statistics."""

    model: _Model = _Model()

    def apply(self, params, state, rng, x, is_training, probe=None):
        per_example = 0.5 * sum(jnp.sum((leaf[None] - x) ** 2, -1)
                                for leaf in jax.tree.leaves(params))
        if is_training:
            state = {"bn": {"steps": state["bn"]["steps"] + 1.0}}
        return ModelOutput(per_example[:, None], x, SolverStats.zeros()), state

    def loss(self, logits, y, mask, x=None):
        m = mask.astype(jnp.float32)
        return jnp.sum(logits[:, 0] * m) / jnp.maximum(jnp.sum(m), 1.0)

    def l2(self, params):
        return 0.0


X = np.array([[1.0, 2.0], [3.0, -2.0], [-1.0, 4.0], [5.0, 0.0]], np.float32)
DATA = ClientData(jnp.asarray(X), jnp.zeros((4,), jnp.int32))
KEY = jax.random.PRNGKey(0)


def schedule(streams: list[list[int]], epochs: int, steps: int) -> Schedule:
    """Every step of stream s is one batch of the examples `streams[s]`."""
    idx = np.array([[[rows] * steps] * epochs for rows in streams], np.int32)
    return Schedule(jnp.asarray(idx), jnp.ones(idx.shape, bool))


def after(w0, m, steps: int, lr: float = LR):
    """w after `steps` SGD steps on batches with mean m: m + (1 - lr)^steps (w0 - m)."""
    return m + (1 - lr) ** steps * (np.asarray(w0) - m)


def model(body, head):
    return {"body": {"w": jnp.asarray(body, jnp.float32)},
            "player_logits": {"w": jnp.asarray(head, jnp.float32)}}


def bn(steps: float):
    return {"bn": {"steps": jnp.asarray(steps, jnp.float32)}}


B0, H0 = np.array([0.5, -1.0]), np.array([2.0, 2.0])
MEAN = X.mean(0)


# ----------------------------------------------------------------------- FedRep, FedPer
def test_fedrep_trains_head_then_body_and_server_takes_uniform_mean():
    alg = FedRep(QuadTask(), HParams(lr=LR, local_epochs=2, personal_epochs=1))
    server = {"body": {"body": {"w": jnp.asarray(B0, jnp.float32)}}, "state": bn(0.0)}
    client = {"head": {"player_logits": {"w": jnp.asarray(H0, jnp.float32)}}}
    new, upload, stats = alg.client_update(server, client, DATA,
                                           schedule([[0, 1, 2, 3]], 2, 2), KEY)
    # Head: P epochs x 2 steps with the body frozen; body: E epochs x 2 steps, head frozen.
    np.testing.assert_allclose(new["head"]["player_logits"]["w"], after(H0, MEAN, 2), rtol=1e-6)
    np.testing.assert_allclose(upload["body"]["body"]["w"], after(B0, MEAN, 4), rtol=1e-6)
    assert float(upload["state"]["bn"]["steps"]) == 6.0
    assert float(stats["downloaded"]) == 1.0 and "player_logits" not in upload["body"]

    uploads = {"body": {"body": {"w": jnp.array([[1.0, 2.0], [4.0, 8.0]])}},
               "state": {"bn": {"steps": jnp.array([2.0, 6.0])}}}
    weights = alg.aggregation_weights(jnp.array([30, 10]))
    avg = alg.server_update(server, uploads, weights)
    np.testing.assert_allclose(avg["body"]["body"]["w"], [2.5, 5.0])  # uniform, not 3:1
    assert float(avg["state"]["bn"]["steps"]) == 4.0

    params, state = alg.eval_params(avg, new)
    np.testing.assert_allclose(params["body"]["w"], [2.5, 5.0])
    np.testing.assert_allclose(params["player_logits"]["w"], new["head"]["player_logits"]["w"])
    assert float(state["bn"]["steps"]) == 4.0


def test_fedper_trains_body_and_head_jointly_and_weights_by_samples():
    alg = FedPer(QuadTask(), HParams(lr=LR, local_epochs=2, personal_epochs=1))
    server = {"body": {"body": {"w": jnp.asarray(B0, jnp.float32)}}, "state": bn(0.0)}
    client = {"head": {"player_logits": {"w": jnp.asarray(H0, jnp.float32)}}}
    new, upload, _ = alg.client_update(server, client, DATA,
                                       schedule([[0, 1, 2, 3]], 2, 2), KEY)
    # The head trains in both phases (2 + 4 steps), the body in the joint one (4 steps).
    np.testing.assert_allclose(new["head"]["player_logits"]["w"], after(H0, MEAN, 6), rtol=1e-6)
    np.testing.assert_allclose(upload["body"]["body"]["w"], after(B0, MEAN, 4), rtol=1e-6)

    uploads = {"body": {"body": {"w": jnp.array([[1.0, 2.0], [4.0, 8.0]])}},
               "state": {"bn": {"steps": jnp.array([2.0, 6.0])}}}
    avg = alg.server_update(server, uploads, alg.aggregation_weights(jnp.array([30, 10])))
    np.testing.assert_allclose(avg["body"]["body"]["w"], [1.75, 3.5])
    # Text FedPer and --unweighted_updates average uniformly.
    for other in (build_algorithm("fedper_seq", QuadTask(), HParams()),
                  FedPer(QuadTask(), HParams(weighted=False))):
        np.testing.assert_array_equal(other.aggregation_weights(jnp.array([30, 10])), [1, 1])
    assert isinstance(build_algorithm("fedper_resnet", QuadTask(), HParams()), FedPer)


@pytest.mark.parametrize("cls", [FedRep, FedPer])
def test_unseen_clients_train_the_initial_head_on_the_final_body(cls):
    alg = cls(QuadTask(), HParams(lr=LR, local_epochs=3, personal_epochs=2))
    server = {"body": {"body": {"w": jnp.asarray(B0, jnp.float32)}}, "state": bn(7.0)}
    init = model([9.0, 9.0], H0)
    params, state = alg.adapt_unseen(server, init, bn(0.0), DATA,
                                     schedule([[0, 1, 2, 3]], 3, 1), KEY)
    np.testing.assert_allclose(params["body"]["w"], B0)
    np.testing.assert_allclose(params["player_logits"]["w"], after(H0, MEAN, 2), rtol=1e-6)
    assert float(state["bn"]["steps"]) == 9.0  # the server's state, then P steps


# ----------------------------------------------------------------------------- Ditto
def test_ditto_personal_step_by_hand_and_persistence():
    lam = 0.5
    alg = Ditto(QuadTask(), HParams(lr=LR, local_epochs=1), lam=lam)
    assert alg.streams == ((0, 1), (1, 1))
    sched = schedule([[0, 1], [2, 3]], 1, 1)  # global phase: x0, x1; personal: x2, x3
    m_glob, m_pers = X[:2].mean(0), X[2:].mean(0)
    theta = np.array([1.0, -1.0, 0.5, 0.0], np.float32)
    v0 = np.array([-2.0, 3.0, 1.0, 1.0], np.float32)
    server = {"params": model(theta[:2], theta[2:]), "state": bn(10.0)}
    client = {"params": model(v0[:2], v0[2:]), "state": bn(3.0)}
    new, upload, stats = alg.client_update(server, client, DATA, sched, KEY)

    def by_leaf(p):
        return np.concatenate([p["body"]["w"], p["player_logits"]["w"]])

    m_g, m_p = np.tile(m_glob, 2), np.tile(m_pers, 2)
    theta1 = theta - LR * (theta - m_g)
    v1 = v0 - LR * ((v0 - m_p) + lam * (v0 - theta))  # from v_t, pulled toward theta
    np.testing.assert_allclose(by_leaf(upload["params"]), theta1 - theta, rtol=1e-6)
    np.testing.assert_allclose(by_leaf(new["params"]), v1, rtol=1e-6)
    # The client's own BN state runs through both phases; its delta goes up.
    assert float(new["state"]["bn"]["steps"]) == 5.0
    assert float(upload["state"]["bn"]["steps"]) == 5.0 - 10.0
    assert float(stats["downloaded"]) == 1.0

    # Next round: the personal model continues from v1 (it persists).
    theta2 = np.array([0.0, 0.0, 1.0, 1.0], np.float32)
    server2 = {"params": model(theta2[:2], theta2[2:]), "state": bn(0.0)}
    newer, _, _ = alg.client_update(server2, new, DATA, sched, KEY)
    v2 = v1 - LR * ((v1 - m_p) + lam * (v1 - theta2))
    np.testing.assert_allclose(by_leaf(newer["params"]), v2, rtol=1e-6)

    # The reference's start point: the personal phase continues from theta'_t.
    ref = Ditto(QuadTask(), HParams(lr=LR, local_epochs=1), lam=lam, reference_start=True)
    new_ref, _, _ = ref.client_update(server, client, DATA, sched, KEY)
    v_ref = theta1 - LR * ((theta1 - m_p) + lam * (theta1 - theta))
    np.testing.assert_allclose(by_leaf(new_ref["params"]), v_ref, rtol=1e-6)

    # Server: the global model plus the sample-weighted mean of the global-phase deltas.
    deltas = {"params": stack([model([1.0, 0.0], [0.0, 0.0]), model([5.0, 4.0], [4.0, 0.0])]),
              "state": {"bn": {"steps": jnp.array([1.0, 5.0])}}}
    avg = alg.server_update(server, deltas, alg.aggregation_weights(jnp.array([30, 10])))
    np.testing.assert_allclose(avg["params"]["body"]["w"], theta[:2] + [2.0, 1.0], rtol=1e-6)
    # Seen clients are scored with their personal model, unseen with the global one.
    params, state = alg.eval_params(server, new)
    np.testing.assert_allclose(by_leaf(params), v1, rtol=1e-6)
    params, state = alg.adapt_unseen(server, None, None, DATA, sched, KEY)
    np.testing.assert_allclose(by_leaf(params), theta)


# -------------------------------------------------------------------------- Finetune
def test_finetune_switches_from_fedavg_to_local_training_at_the_right_round():
    alg = build_algorithm("finetune", QuadTask(), HParams(lr=LR, local_epochs=1),
                          AlgorithmOptions(finetune_frac=0.3, num_rounds=150))
    assert alg.global_rounds == 45.0  # the reference's 0.3 * 150
    assert bool(alg.federated({"round": jnp.asarray(44)}))
    assert not bool(alg.federated({"round": jnp.asarray(45)}))

    alg = Finetune(QuadTask(), HParams(lr=LR, local_epochs=1), global_rounds=1.5)
    sched = schedule([[0, 1, 2, 3]], 1, 2)
    w_srv, w_own = np.array([1.0, 1.0]), np.array([-3.0, 0.0])
    server = {"params": model(w_srv, w_srv), "state": bn(0.0), "round": jnp.asarray(1)}
    fresh = {"params": model(w_own, w_own), "state": bn(0.0), "tuned": jnp.asarray(False)}
    weights = jnp.array([1.0])

    # Round 1 < 1.5: FedAvg from the global model; the client keeps no copy.
    new, upload, stats = alg.client_update(server, fresh, DATA, sched, KEY)
    np.testing.assert_allclose(upload["params"]["body"]["w"], after(w_srv, MEAN, 2) - w_srv,
                               rtol=1e-6)
    assert not bool(new["tuned"]) and float(stats["uploaded"]) == 1.0
    server = alg.server_update(server, stack([upload]), weights)
    w_srv = after(w_srv, MEAN, 2)
    np.testing.assert_allclose(server["params"]["body"]["w"], w_srv, rtol=1e-6)
    assert int(server["round"]) == 2
    params, _ = alg.eval_params(server, new)  # untuned clients are the global model
    np.testing.assert_allclose(params["body"]["w"], w_srv, rtol=1e-6)

    # Round 2 >= 1.5: local training from the frozen global model; nothing is sent.
    new, upload, stats = alg.client_update(server, fresh, DATA, sched, KEY)
    np.testing.assert_allclose(new["params"]["body"]["w"], after(w_srv, MEAN, 2), rtol=1e-6)
    assert bool(new["tuned"])
    assert float(stats["uploaded"]) == 0.0 and float(stats["downloaded"]) == 0.0
    frozen = alg.server_update(server, stack([upload]), weights)
    np.testing.assert_allclose(frozen["params"]["body"]["w"], w_srv, rtol=1e-6)
    assert int(frozen["round"]) == 3

    # Round 3: a tuned client continues from its own copy, and is scored with it.
    newer, _, _ = alg.client_update(frozen, new, DATA, sched, KEY)
    np.testing.assert_allclose(newer["params"]["body"]["w"], after(w_srv, MEAN, 4), rtol=1e-6)
    params, _ = alg.eval_params(frozen, newer)
    np.testing.assert_allclose(params["body"]["w"], after(w_srv, MEAN, 4), rtol=1e-6)

    # Traced (map / vmap executors) the round-dependent choice gives the same numbers.
    traced = jax.jit(lambda s, c: alg.client_update(s, c, DATA, sched, KEY))(frozen, new)
    for a, b in zip(jax.tree.leaves(traced), jax.tree.leaves(
            alg.client_update(frozen, new, DATA, sched, KEY)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_finetune_switch_round_guards_resume():
    eng = trainer_engine("finetune", options=AlgorithmOptions(finetune_frac=0.5, num_rounds=4))
    assert eng.settings["finetune_global_rounds"] == 2.0


# ----------------------------------------------------------------------------- Local
def test_local_client_trains_its_own_model_and_sends_nothing():
    alg = Local(QuadTask(), HParams(lr=LR, local_epochs=2))
    server, clients = alg.init(model(B0, H0), bn(0.0), 3)
    client = jax.tree.map(lambda x: x[1], clients)
    client["params"] = model([4.0, 4.0], [0.0, 0.0])
    new, upload, stats = alg.client_update(server, client, DATA,
                                           schedule([[0, 1, 2, 3]], 2, 1), KEY)
    np.testing.assert_allclose(new["params"]["body"]["w"], after([4.0, 4.0], MEAN, 2),
                               rtol=1e-6)
    from utils.pytree import tree_bytes
    assert tree_bytes(upload) == 0 and tree_bytes(alg.broadcast(server)) == 0
    assert float(stats["downloaded"]) == 0.0


def test_local_trains_every_client_every_round(tmp_path):
    rd = RunDir(tmp_path)
    eng = trainer_engine("local", rounds=1, run_dir=rd, clients_per_round=0.25)
    assert eng.cohort_size == eng.num_clients
    rs = np.random.RandomState(0)
    before = rs.get_state()
    np.testing.assert_array_equal(eng._cohort(rs), np.arange(eng.num_clients))
    after_draw = rs.get_state()  # no draw, like the reference
    np.testing.assert_array_equal(after_draw[1], before[1])
    assert after_draw[2] == before[2]
    eng.run()
    hist = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all(h["up_bytes"] == 0 and h["down_bytes"] == 0 for h in hist)

    init_params, init_state = eng.task.model.init(
        jax.random.PRNGKey(0), jnp.asarray(eng.data.train[0].x[:2]))
    server, clients = eng.alg.init(init_params, init_state, eng.num_clients)
    saved = checkpoint.load(tmp_path, server, clients, eng.settings)
    for trained, start in zip(jax.tree.leaves(saved.clients["params"]),
                              jax.tree.leaves(init_params), strict=True):
        moved = np.abs(np.asarray(trained) - np.asarray(start)[None]).reshape(
            eng.num_clients, -1).max(1)
        assert (moved > 0).all()  # every client trained


# ---------------------------------------------------------------------------- kNN-Per
def test_knn_probabilities_on_a_hand_made_datastore():
    keys = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.1, 0.0]])
    labels = jnp.array([0, 1, 1, 2])
    real = jnp.array([True, True, True, False])  # the last key is padding
    q = jnp.array([[0.0, 0.0]])
    p = knn_probabilities(q, keys, labels, real, 2, 3)
    e1 = math.exp(-1.0)
    np.testing.assert_allclose(p, [[1 / (1 + e1), e1 / (1 + e1), 0.0]], rtol=1e-6)
    # k above the number of real keys: all real keys vote, the padding never does.
    p = knn_probabilities(q, keys, labels, real, 10, 3)
    e3 = math.exp(-3.0)
    np.testing.assert_allclose(p, np.array([[1, e1 + e3, 0.0]]) / (1 + e1 + e3), rtol=1e-6)
    # Distances where exp(-d) underflows (the reference's NaN): the nearest key wins.
    far = jnp.array([[1e4, 1e4]])
    assert np.exp(-np.float32(1e4)) == 0.0
    p = knn_probabilities(far, keys, labels, real, 2, 3)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)
    assert int(jnp.argmax(p)) == 1  # (1, 0) is nearer to (1e4, 1e4) than (0, 0)
    # No real key at all: no vote, no NaN.
    p = knn_probabilities(q, keys, labels, jnp.zeros(4, bool), 2, 3)
    np.testing.assert_array_equal(p, np.zeros((1, 3)))


@dataclass(frozen=True)
class EmbedTask:
    """Embedding = the input, logits uniform over 3 classes: predictions are the kNN's."""

    model: _Model = _Model()

    def apply(self, params, state, rng, x, is_training, probe=None):
        return ModelOutput(jnp.zeros((x.shape[0], 3)), x, SolverStats.zeros()), state


def test_knnper_scores_each_client_and_averages_clients_unweighted():
    alg = KNNPer(EmbedTask(), HParams(), lam=0.5, neighbors=1)
    pad = lambda a, n=4: np.concatenate([a, np.zeros((n - len(a),) + a.shape[1:], a.dtype)])
    tr_x = pad(np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], np.float32))
    tr_y = pad(np.array([0, 1, 2], np.int32))
    tr_m = pad(np.array([True, True, True]))
    # Client A: 4 test points, 3 nearest to a key of their label -> 3/4.
    te_x = np.array([[1.0, 0.0], [9.0, 1.0], [0.0, 8.0], [9.0, 0.0]], np.float32)
    a = alg.score_client({}, {}, (tr_x, tr_y, tr_m),
                         (te_x, np.array([0, 1, 2, 0], np.int32), np.ones(4, bool)), KEY, 2)
    # Client B: 1 real test point (and 3 padded ones), right -> 1/1.
    b = alg.score_client({}, {}, (tr_x, tr_y, tr_m),
                         (pad(te_x[:1]), pad(np.array([0], np.int32)), pad(np.array([True]))),
                         KEY, 2)
    assert float(a["test"]["correct"]) == pytest.approx(0.75)
    assert float(b["test"]["correct"]) == pytest.approx(1.0)
    metrics = _pooled(stack([a, b]))
    assert metrics["test_acc"] == pytest.approx((0.75 + 1.0) / 2)  # not 4/5 pooled
    assert math.isnan(metrics["train_acc"])


# --------------------------------------------------------------- engine and executors
NEW_TRAINERS = ("finetune", "local", "ditto", "fedrep", "fedper", "knnper")


@pytest.mark.parametrize("trainer", [t for t in NEW_TRAINERS if t != "fedrep"])
def test_executors_agree(tmp_path, trainer):
    """Traced (vmap) and eager (loop) clients agree. FedRep is left out for time: FedPer
    runs the same code but its second phase."""
    # Finetune switches after round 0 of 3, so both of its phases run traced.
    rounds = 2 if trainer == "finetune" else 1
    options = AlgorithmOptions(finetune_frac=0.5, num_rounds=rounds)
    runs, summaries = {}, {}
    for kind in ("loop", "vmap"):
        rd = RunDir(tmp_path / kind)
        engine = trainer_engine(trainer, kind, rounds=rounds, frac_unseen=0.25, run_dir=rd,
                                options=options)
        summaries[kind] = engine.run()
        runs[kind] = [json.loads(x) for x in open(rd.path / "metrics.jsonl")]
    assert len(runs["loop"]) == len(runs["vmap"])
    for a, b in zip(runs["loop"], runs["vmap"], strict=True):
        for k in ("train_acc", "test_acc", "local_loss", "up_bytes", "down_bytes"):
            if a.get(k) is not None:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (trainer, k)
    if trainer == "finetune":
        assert [r["up_bytes"] > 0 for r in runs["loop"]] == [True, False, False]
        # The summary's upload is the mean over rounds, not the last (silent) round's.
        sent = runs["loop"][0]["up_bytes"] / engine.cohort_size
        assert summaries["loop"]["up_bytes_per_client"] == pytest.approx(sent / 3)


# ----------------------------------------------------------------------- main.py
SMALL = ["-c", "8", "-t", "1", "-le", "1", "-pe", "1", "-cr", "0.5", "-q"]


def _main(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


# Local and FedPer run through main.py in CI via their runner scripts
# (tests/test_runners.py); here, with unseen clients, under -m slow.
@pytest.mark.parametrize("trainer", [
    pytest.param(f"{t}_resnet", marks=pytest.mark.slow if t in ("local", "fedper") else ())
    for t in NEW_TRAINERS])
def test_main_runs_each_trainer(tmp_path, trainer):
    out = tmp_path / "run"
    proc = _main("--trainer", trainer, *SMALL, "-fu", "0.25", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "final_result.txt").is_file()
    has_unseen = not trainer.startswith(("finetune", "local"))
    assert (out / "unseen.txt").is_file() == has_unseen
    if has_unseen:  # real accuracies (Ditto's reference logged weighted counts)
        values = json.loads((out / "unseen.txt").read_text().replace("nan", "null"))
        assert all(v is None or 0.0 <= v <= 1.0 for v in values)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines if "round" in x] == [0, 1]


@pytest.mark.parametrize("args,needle", [
    (["--trainer", "fedrep_seq"], "text trainer"),
    (["--trainer", "knnper", "--knn_lam", "1.5"], "--knn_lam"),
    (["--trainer", "knnper", "--knn_neighbors", "0"], "--knn_neighbors"),
    (["--trainer", "finetune", "--finetune_frac", "-0.1"], "--finetune_frac"),
    (["--trainer", "ditto", "--lambda", "-1"], "--lambda"),
])
def test_bad_baseline_flags_fail_with_a_message(args, needle):
    proc = _main(*SMALL, *args, "-o", "/tmp/should_not_matter")
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr
