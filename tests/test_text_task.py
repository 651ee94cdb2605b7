"""The text task (spec 2.3) and the reference's text-trainer differences (spec 3.1, 3.8):
masked loss, both accuracy conventions, FeDEQ's per-token ADMM terms, FedAvg's sampling
with replacement, and main.py end to end on tiny Shakespeare data."""

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data.synthetic import make_synthetic
from deq.stats import SolverStats
from models.base import ModelOutput
from tests.helpers import (
    TINY_SHAKESPEARE_FLAGS,
    linear_engine,
    trainer_engine,
    write_tiny_shakespeare,
)
from trainers.algorithms.base import HParams
from trainers.algorithms.fedeq import FedEQConfig
from trainers.engine import Engine, RunConfig, _last_draw, _pooled
from trainers.local import ClientData, Schedule
from trainers.registry import AlgorithmOptions, TextOptions, build_algorithm
from trainers.task import TextTask
from utils import checkpoint
from utils.pytree import index, stack
from utils.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent

# Two real sequences and one padded example (mask False) of T = 4 tokens, vocabulary 5.
X = np.array([[3, 1, 0, 0], [2, 4, 4, 1], [1, 1, 1, 1]], np.int32)
Y = np.array([[1, 2, 0, 0], [4, 4, 1, 3], [1, 1, 1, 1]], np.int32)
MASK = np.array([True, True, False])
PRED = np.array([[1, 0, 0, 2], [4, 4, 2, 3], [1, 1, 1, 1]])  # argmax of the logits below
LOGITS = (2.0 * jax.nn.one_hot(PRED, 5) + 0.1 * np.arange(5)).astype(np.float32)


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@dataclass(frozen=True)
class _NoModel:
    name: str = "none"
    is_deq: bool = False


def test_masked_loss_and_both_accuracy_conventions():
    task = TextTask(_NoModel())
    nll = -np.take_along_axis(_log_softmax(np.asarray(LOGITS, np.float64)), Y[..., None],
                              -1)[..., 0]
    tokens = (X > 0) & MASK[:, None]  # from the inputs: (0, 1) and (1, 0..3), 6 tokens
    assert tokens.sum() == 6
    expected_loss = nll[tokens].mean()
    assert float(task.loss(LOGITS, Y, MASK, X)) == pytest.approx(expected_loss, rel=1e-5)

    # Reference: every position of the two real sequences, padding included. The padded
    # positions (0, 2) and (0, 3) predict 0 and 2 for targets 0: one more hit.
    sums = task.eval_sums(LOGITS, Y, MASK, X)
    assert float(sums["correct"]) == 1 + 0 + 1 + 0 + 1 + 1 + 0 + 1
    assert float(sums["count"]) == 8
    assert float(sums["loss"] / sums["loss_count"]) == pytest.approx(expected_loss, rel=1e-5)
    # Non-padding inputs only: hits at (0, 0), (1, 0), (1, 1), (1, 3) of 6 tokens.
    sums = TextTask(_NoModel(), acc_ignores_padding=True).eval_sums(LOGITS, Y, MASK, X)
    assert (float(sums["correct"]), float(sums["count"])) == (4.0, 6.0)
    assert float(sums["loss_count"]) == 6


def test_pooling_equals_the_sequence_weighted_mean_of_client_accuracies():
    """The reference averages client accuracies with weights = sequences (spec 2.3)."""
    task = TextTask(_NoModel())
    rng = np.random.default_rng(0)
    per_client, accs, sizes = [], [], []
    for n in (1, 3, 6):
        x = rng.integers(0, 5, (n, 4)).astype(np.int32)
        y = rng.integers(0, 5, (n, 4)).astype(np.int32)
        logits = rng.normal(size=(n, 4, 5)).astype(np.float32)
        mask = np.ones(n, bool)
        chunks = [task.eval_sums(logits[i:i + 2], y[i:i + 2], mask[i:i + 2], x[i:i + 2])
                  for i in range(0, n, 2)]  # scored in chunks, as the engine does
        per_client.append(jax.tree.map(lambda *s: sum(s), *chunks))
        accs.append((logits.argmax(-1) == y).mean())
        sizes.append(n)
    pooled = _pooled({"test": stack(per_client)})["test_acc"]
    assert pooled == pytest.approx(np.average(accs, weights=sizes), rel=1e-6)


# ------------------------------------------------------------------------ FeDEQ text
class _ConstantLogits:
    """Logits that ignore the parameters: the loss has no gradient, so one SGD step on
    the representation moves it by the ADMM terms alone."""

    @staticmethod
    def apply(params, state, rng, x, is_training, probe=None):
        del params, rng, is_training, probe
        return ModelOutput(jnp.zeros(x.shape + (5,)), jnp.zeros(x.shape), SolverStats.zeros()
                           ), state


@dataclass(frozen=True)
class _ConstantModel:
    name: str = "constant"
    is_deq: bool = False
    transformed = _ConstantLogits()


def _fedeq_client_step(text: TextOptions):
    lr, rho = 0.5, 2.0
    alg = build_algorithm("fedeq_text", TextTask(_ConstantModel()),
                          HParams(lr=lr, local_epochs=1, personal_epochs=0),
                          AlgorithmOptions(fedeq=FedEQConfig(rho=rho), lam_admm=0.001,
                                           text=text))
    theta_srv = np.array([1.0, -2.0, 0.5], np.float32)
    theta_own = np.array([0.3, 0.1, -0.4], np.float32)
    lam0 = np.array([0.4, -0.8, 1.2], np.float32)
    server = {"theta": {"body": {"w": jnp.asarray(theta_srv)}}, "state": {},
              "prev_theta": {}, "prev_state": {}, "round": jnp.asarray(5)}
    client = {"theta": {"body": {"w": jnp.asarray(theta_own)}},
              "phi": {"player_logits": {"w": jnp.ones(2)}},
              "lam": {"body": {"w": jnp.asarray(lam0)}}, "state": {},
              "last_round": jnp.asarray(4)}  # sampled last round: keeps its own theta
    # One batch of three sequences: 3 + 5 input tokens > 0, the third is padding (mask).
    x = jnp.array([[5, 7, 2, 0, 0, 0], [1, 2, 3, 4, 5, 0], [9, 9, 9, 9, 9, 9]], jnp.int32)
    data = ClientData(x, jnp.zeros_like(x))
    sched = Schedule(jnp.array([[[[0, 1, 2]]]], jnp.int32),
                     jnp.array([[[[True, True, False]]]]))
    new, _, _ = alg.client_update(server, client, data, sched, jax.random.PRNGKey(0))
    grad = lam0 + rho * (theta_own - theta_srv)
    return alg, new, theta_own, theta_srv, lam0, grad, lr, rho


def test_text_fedeq_divides_the_admm_terms_by_the_token_count():
    alg, new, theta_own, theta_srv, lam0, grad, lr, rho = _fedeq_client_step(TextOptions())
    assert alg.cfg.admm_scale == "tokens" and alg.cfg.lam_init == 0.001
    theta = theta_own - lr * grad / 8.0  # 8 tokens: the masked sequence does not count
    np.testing.assert_allclose(new["theta"]["body"]["w"], theta, rtol=1e-6)
    np.testing.assert_allclose(new["lam"]["body"]["w"], lam0 + rho * (theta - theta_srv),
                               rtol=1e-6)
    # The duals start at lam_admm; the server mean is uniform.
    _, clients = alg.init({"body": {"w": jnp.zeros(3)}, "player_logits": {"w": jnp.zeros(2)}},
                          {}, 2)
    np.testing.assert_allclose(clients["lam"]["body"]["w"], np.full((2, 3), 0.001))
    np.testing.assert_array_equal(alg.aggregation_weights(jnp.array([30, 10])), [1, 1])

    alg, new, theta_own, _, _, grad, lr, _ = _fedeq_client_step(
        TextOptions(admm_per_token=False, uniform_average=False))
    assert alg.cfg.admm_scale == "none"
    np.testing.assert_allclose(new["theta"]["body"]["w"], theta_own - lr * grad, rtol=1e-6)
    np.testing.assert_array_equal(alg.aggregation_weights(jnp.array([30, 10])), [30, 10])
    # Vision FeDEQ is unchanged: duals at 0 (see --fedeq_lam_init_vision), no scaling.
    vision = build_algorithm("fedeq_resnet", None, HParams(), AlgorithmOptions(lam_admm=0.5))
    assert (vision.cfg.lam_init, vision.cfg.admm_scale) == (0.0, "none")


# -------------------------------------------------------------- sampling with replacement
def _linear_engine(trainer: str, run_dir: RunDir) -> Engine:
    """One round of `trainer` on synthetic data with a two-layer linear model."""
    data = make_synthetic(num_clients=8, seed=3, min_samples=20, max_samples=40)
    cfg = RunConfig(num_rounds=0, seed=0, clients_per_round=0.25, batch_size=8,
                    executor="loop", eval_chunk=16, quiet=True)
    return linear_engine(trainer, data, cfg, run_dir, HParams(lr=0.05, local_epochs=2))


def test_only_text_fedavg_samples_with_replacement():
    def replaces(trainer, text=None):
        return build_algorithm(trainer, None, HParams(), AlgorithmOptions(
            text=text or TextOptions())).samples_with_replacement

    assert replaces("fedavg_seq")
    assert not replaces("fedavg_seq", TextOptions(sample_with_replacement=False))
    assert not any(replaces(t) for t in ("fedavg", "fedavg_resnet", "knnper_seq",
                                         "ditto_seq", "finetune_seq", "fedeq_seq"))
    rs = np.random.RandomState(0)
    eng = trainer_engine("fedavg_seq")
    draws = [eng._cohort(rs) for _ in range(40)]
    assert all(d.shape == (eng.cohort_size,) == (4,) for d in draws)
    assert all(0 <= d.min() and d.max() < eng.num_clients for d in draws)
    assert any(len(set(d.tolist())) < len(d) for d in draws)
    eng = trainer_engine("fedavg")
    assert all(len(set(eng._cohort(rs).tolist())) == 4 for _ in range(40))
    np.testing.assert_array_equal(_last_draw(np.array([3, 1, 3, 2, 1])), [2, 4, 2, 3, 4])


def test_a_client_drawn_twice_counts_its_last_result_for_both_draws(tmp_path):
    """Spec 3.1: the client trains twice from the global model (with the key chain's next
    key each time); its second result overwrites the first and is averaged twice."""
    eng = _linear_engine("fedavg_seq", RunDir(tmp_path))
    cohort = np.array([3, 3])
    eng._cohort = lambda rs: cohort
    eng.run()

    params, state = eng.task.model.init(jax.random.PRNGKey(0),
                                        jnp.asarray(eng.data.train[0].x[:2]))
    server, clients = eng.alg.init(params, state, eng.num_clients)
    saved = checkpoint.load(tmp_path, server, clients, eng.settings)
    schedule, keys, _ = eng._client_inputs(
        eng.batcher, cohort, jax.random.fold_in(jax.random.PRNGKey(0), 0))
    data = ClientData(eng.train[0][3], eng.train[1][3])
    deltas = [eng.alg.client_update(server, index(clients, 3), data, index(schedule, i),
                                    keys[i])[1]["params"] for i in (0, 1)]
    for got, start, _, last in zip(*(jax.tree.leaves(t) for t in (
            saved.server["params"], server["params"], *deltas)), strict=True):
        np.testing.assert_allclose(got, start + last, rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(a, b) for a, b in zip(*map(jax.tree.leaves, deltas),
                                                     strict=True))


# ----------------------------------------------------------------------------- main.py
@pytest.mark.parametrize("trainer", ["fedeq_text", "fedavg_seq"])
def test_two_round_text_run_writes_every_file(tmp_path, trainer, shared_compile_env):
    # The runner scripts' learning rate and the flags tests/test_runners.py gives them,
    # on the same data: the compiled programs are shared through the cache. Unseen
    # clients only for FedAvg: scoring them compiles the DEQ-Transformer once more.
    write_tiny_shakespeare(tmp_path / "data")
    out = tmp_path / "run"
    unseen = trainer == "fedavg_seq"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--trainer", trainer, "-d", "shakespeare",
         "--data_dir", str(tmp_path / "data"), *TINY_SHAKESPEARE_FLAGS, "-t", "1",
         "-lr", "0.1", *(["-fu", "0.25"] if unseen else []), "-o", str(out)],
        cwd=ROOT, env=shared_compile_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("flags.json", "args.txt", "command.txt", "metrics.jsonl", "output.txt",
                 "losses.txt", "final_result.txt", "summary.json", "checkpoint.npz"):
        assert (out / name).is_file(), name
    assert (out / "unseen.txt").is_file() == unseen
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if "round" in r]
    assert [r["round"] for r in rounds] == [0, 1]
    for r in rounds:
        assert 0.0 <= r["train_acc"] <= 1.0 and 0.0 <= r["test_acc"] <= 1.0
        assert np.isfinite(r["train_loss"]) and r["up_bytes"] > 0
    flags = json.loads((out / "flags.json").read_text())
    assert flags["num_clients"] == 4 and flags["text_eval_dropout"]
    if unseen:
        assert all(0.0 <= v <= 1.0 for v in json.loads((out / "unseen.txt").read_text()))
    summary = json.loads((out / "summary.json").read_text())
    if trainer == "fedeq_text":
        assert summary["model"] == "deq_transformer"
        # The DEQ-Transformer's solver statistics, as the vision DEQ's (20 Broyden steps).
        # Head steps are undifferentiated forward passes, which solve a second time as
        # the reference's do (eval_resolve): 40 steps there, 20 in representation steps,
        # so 30 on average with -pe 1 -le 1 over the same batches.
        assert rounds[0]["solver_iters"] == 30 and rounds[0]["bwd_iters"] == 20
        assert np.isfinite(rounds[0]["solver_residual"])
        assert summary["up_bytes_per_client"] == 4 * summary["shared"]
    else:
        assert summary["model"] == "transformer8" and "solver_iters" not in rounds[0]


def test_vision_trainer_names_are_refused_on_text_data():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--trainer", "fedeq", "-d", "shakespeare",
         "--data_dir", "/nonexistent", "-q", "-o", "/tmp/should_not_matter"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "use fedeq_seq" in proc.stderr, proc.stderr
