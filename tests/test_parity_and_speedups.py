"""Issue 12: the reference's cohorts, the reference's logged losses, and speed-ups that
must not change a number (each checked by running both ways)."""

import json

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from data.synthetic import make_synthetic
from deq.stats import SolverStats
from models.base import ModelOutput
from models.batch_norm import BatchNorm, batch_statistics_over
from models.registry import ModelSpec
from tests.helpers import linear_engine, small_engine, trainer_engine
from trainers.algorithms.base import HParams
from trainers.engine import Engine, RunConfig
from trainers.local import _make_step, reaches_solver
from trainers.registry import build_algorithm
from trainers.task import ClassificationTask
from utils.pytree import split_head
from utils.rundir import RunDir


def _history(path):
    return [json.loads(line) for line in open(path / "metrics.jsonl")
            if "round" in json.loads(line)]


# ------------------------------------------------------------------ cohorts (spec 3.8)
def _reference_cohorts(seed: int, n_total: int, frac_unseen: float, rate: float,
                       rounds: int, extra_draw: bool) -> list[list[int]]:
    """The reference's global-numpy sampling as spec 2.1 and 3.8 describe it."""
    np.random.seed(12 + seed)
    unseen = int(frac_unseen * n_total)
    n = n_total - unseen
    m = int((rate * n) // 1)
    if unseen:
        np.random.choice(n, unseen)          # the base class's unused draw
    if extra_draw:
        np.random.choice(n, replace=False, size=m)  # FeDEQ's draw before the loop
    return [np.random.choice(n, m, replace=False).tolist() for _ in range(rounds)]


def _linear_fedeq(num_clients: int, frac_unseen: float, rounds: int, run_dir,
                  trainer: str = "fedeq") -> Engine:
    data = make_synthetic(num_clients=num_clients, seed=3, frac_unseen=frac_unseen,
                          min_samples=20, max_samples=30)
    cfg = RunConfig(num_rounds=rounds - 1, seed=100, clients_per_round=0.1, batch_size=10,
                    executor="loop", eval_chunk=16, quiet=True)
    return linear_engine(trainer, data, cfg, RunDir(run_dir),
                         HParams(lr=0.05, local_epochs=1, personal_epochs=1), width=4)


def test_fedeq_cohorts_are_the_reference_cohorts(tmp_path):
    """Seed 100, 20 clients, 2 per round: the authors' code trained {17, 7}, {15, 12},
    {17, 12} in rounds 0-2 (spec 3.8); metrics.jsonl names every round's clients."""
    _linear_fedeq(20, 0.0, 3, tmp_path).run()
    cohorts = [h["cohort"] for h in _history(tmp_path)]
    assert [sorted(c) for c in cohorts] == [[7, 17], [12, 15], [12, 17]]
    assert cohorts == _reference_cohorts(100, 20, 0.0, 0.1, 3, extra_draw=True)
    # The draw before the loop with replacement (the old behaviour) gives other cohorts.
    np.random.seed(112)
    np.random.choice(20, 2)
    assert np.random.choice(20, 2, replace=False).tolist() != cohorts[0]


def test_cohorts_with_unseen_clients_and_without_the_extra_draw(tmp_path):
    _linear_fedeq(30, 0.1, 4, tmp_path / "fedeq").run()
    assert [h["cohort"] for h in _history(tmp_path / "fedeq")] == _reference_cohorts(
        100, 30, 0.1, 0.1, 4, extra_draw=True)
    _linear_fedeq(30, 0.1, 4, tmp_path / "fedavg", trainer="fedavg").run()
    assert [h["cohort"] for h in _history(tmp_path / "fedavg")] == _reference_cohorts(
        100, 30, 0.1, 0.1, 4, extra_draw=False)


def test_text_fedeq_draws_like_vision_fedeq():
    """Both FeDEQ trainers are one class: the same extra draw, without replacement."""
    for trainer in ("fedeq_resnet", "fedeq_seq"):
        alg = build_algorithm(trainer, None, HParams())
        assert alg.extra_initial_draw and not alg.samples_with_replacement


# ------------------------------------------------------- evaluation of changed clients
RESCORE_KEYS = ("train_acc", "test_acc", "train_loss", "test_loss", "train_loss_reference",
                "test_loss_reference")


def _compare_rescoring(make, tmp_path):
    runs = {}
    for rescore in (True, False):
        rd = RunDir(tmp_path / str(rescore))
        make(rd, rescore).run()
        runs[rescore] = _history(rd.path)
    for full, cached in zip(runs[True], runs[False], strict=True):
        assert full["cohort"] == cached["cohort"]
        for k in RESCORE_KEYS:  # absent or null (NaN) where a split was not scored
            if full.get(k) is None:
                assert cached.get(k) is None, k
            else:
                assert cached[k] == pytest.approx(full[k], rel=1e-6, abs=1e-7), k
        assert full["clients_scored"] == 8
    return [h["clients_scored"] for h in runs[False]]


@pytest.mark.parametrize("executor", ["loop", "map"])
def test_fedeq_scores_only_the_clients_that_changed(tmp_path, executor):
    scored = _compare_rescoring(
        lambda rd, rescore: small_engine("fedeq", executor, rounds=3, run_dir=rd,
                                         rescore_unchanged=rescore), tmp_path)
    # Round 0 scores everyone; later rounds at most the cohort (4 of 8).
    assert scored[0] == 8 and all(1 <= s <= 4 for s in scored[1:])


def test_fedavg_rescores_everyone_since_its_server_model_changes(tmp_path):
    scored = _compare_rescoring(
        lambda rd, rescore: small_engine("fedavg", rounds=2, run_dir=rd,
                                         rescore_unchanged=rescore), tmp_path)
    assert scored == [8, 8, 8]


def test_finetune_after_its_switch_rescores_only_the_cohort(tmp_path):
    """Before the switch Finetune's clients are scored with the server model, which
    changes every round; after it the server stands still (nothing is aggregated)."""
    from trainers.registry import AlgorithmOptions

    def make(rd, rescore):
        return trainer_engine("finetune", rounds=3, run_dir=rd,
                              options=AlgorithmOptions(num_rounds=3, finetune_frac=0.5),
                              rescore_unchanged=rescore)
    scored = _compare_rescoring(make, tmp_path)
    assert scored[:1] == [8] and scored[1] == 8 and all(s <= 4 for s in scored[2:])


def test_train_split_skipped_then_scored_uses_fresh_sums(tmp_path):
    """A round that skips the train split leaves those sums stale for the cohort; the next
    round that scores it must rescore them."""
    _compare_rescoring(
        lambda rd, rescore: small_engine("fedeq", rounds=3, run_dir=rd, eval_train_every=2,
                                         rescore_unchanged=rescore), tmp_path)


# ------------------------------------------------------------------------ threads
@pytest.mark.parametrize("algorithm", ["fedeq", "fedavg"])
def test_threads_give_the_loop_numbers_exactly(tmp_path, algorithm):
    runs = {}
    for kind in ("loop", "threads"):
        rd = RunDir(tmp_path / kind)
        small_engine(algorithm, kind, rounds=2, run_dir=rd).run()
        runs[kind] = _history(rd.path)
    drop = {"seconds", "train_seconds", "eval_seconds", "cpu_seconds", "peak_rss_mb"}
    for a, b in zip(runs["loop"], runs["threads"], strict=True):
        assert {k: v for k, v in a.items() if k not in drop} == {
            k: v for k, v in b.items() if k not in drop}


# --------------------------------------------------------------- head-only phases
def test_head_phase_runs_no_backward_solve_and_takes_the_same_step():
    """A head-only step used to differentiate the solver probe, which ran the backward
    linear solve for nothing: same update without it, and no backward solve counted."""
    eng = small_engine("fedeq")
    task = eng.task
    x = jnp.asarray(eng.data.train[0].x[:8])
    y = jnp.asarray(eng.data.train[0].y[:8])
    params, state = task.model.init(jax.random.PRNGKey(0), x)
    body, head = split_head(params)
    assert not reaches_solver(head) and reaches_solver(body)
    args = (head, optax.sgd(0.05).init(head), state, body, None, x, y,
            jnp.ones(8, bool), jax.random.PRNGKey(1))
    with_probe = jax.jit(_make_step(task, 0.05, None, True))(*args)
    without = jax.jit(_make_step(task, 0.05, None, False))(*args)
    for a, b in zip(jax.tree.leaves(with_probe[0]), jax.tree.leaves(without[0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert with_probe[3][4] == 1.0 and without[3][4] == 0.0  # backward solves counted


def test_fedeq_round_counts_backward_solves_only_in_representation_steps(tmp_path):
    rd = RunDir(tmp_path)
    small_engine("fedeq", rounds=0, run_dir=rd).run()
    h = _history(tmp_path)[0]
    # 2 representation epochs and 1 head epoch over the same batches: 2/3 of the solves.
    assert h["bwd_solves"] * 3 == h["fwd_solves"] * 2


# ------------------------------------------------------ the reference's logged loss
def _bn_model(masked: bool):
    def forward(x, is_training):
        return (BatchNorm if masked else hk.BatchNorm)(
            True, True, 0.9, eps=1e-5, name="bn")(x, is_training)
    return hk.transform_with_state(forward)


def test_masked_batch_norm_is_the_unpadded_batch_statistics():
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 3, 3, 4)) * 2 + 1
    padded = jnp.concatenate([x, jnp.full((3, 3, 3, 4), 7.0)])
    mask = jnp.arange(8) < 5
    params, state = _bn_model(False).init(jax.random.PRNGKey(0), x, True)
    plain, plain_state = _bn_model(False).apply(params, state, None, x, True)
    with batch_statistics_over(mask):
        ours, ours_state = _bn_model(True).apply(params, state, None, padded, True)
    np.testing.assert_allclose(ours[:5], plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(ours_state), jax.tree.leaves(plain_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Without a mask it is haiku's BatchNorm, bit for bit, in both modes.
    for training in (True, False):
        a, _ = _bn_model(True).apply(params, state, None, padded, training)
        b, _ = _bn_model(False).apply(params, state, None, padded, training)
        np.testing.assert_array_equal(a, b)


def test_losses_txt_holds_the_training_mode_whole_set_loss(tmp_path):
    """Per client: a training-mode forward of its whole train (test) set as one batch;
    pooled with weights n_i (train examples). Recomputed here by hand from the data."""
    data = make_synthetic(num_clients=4, seed=3, min_samples=20, max_samples=40)
    rd = RunDir(tmp_path)

    def forward(x, is_training, probe=None):
        del probe
        h = BatchNorm(True, True, 0.9, eps=1e-5, name="bn")(x, is_training)
        return ModelOutput(
            hk.Linear(data.num_classes, name="player_logits")(jax.nn.relu(
                hk.Linear(16, name="body")(h))), h, SolverStats.zeros())

    task = ClassificationTask(ModelSpec("bn_mlp", hk.transform_with_state(forward), False))
    alg = build_algorithm("fedavg", task, HParams(lr=0.05, local_epochs=1))
    cfg = RunConfig(num_rounds=0, seed=1, clients_per_round=0.5, batch_size=8,
                    executor="loop", eval_chunk=16, quiet=True)
    eng = Engine(data, task, alg, cfg, rd)
    eng.run()
    h = _history(tmp_path)[0]
    saved = np.load(tmp_path / "checkpoint.npz")
    def server_tree(part):
        tree = {}
        for key in saved.files:
            if key.startswith(f"server['{part}']"):
                module, name = key[len(f"server['{part}']"):].strip("[]'").split("']['")
                tree.setdefault(module, {})[name] = jnp.asarray(saved[key])
        return tree

    params, state = server_tree("params"), server_tree("state")
    expected = {}
    for split in ("train", "test"):
        num = den = 0.0
        for c in range(4):
            s = getattr(data, split)[c]
            out, _ = task.apply(params, state, None, jnp.asarray(s.x), True)
            ce = float(task.loss(out.logits, jnp.asarray(s.y), jnp.ones(s.n, bool)))
            num, den = num + data.train[c].n * ce, den + data.train[c].n
        expected[split] = num / den
    assert h["train_loss_reference"] == pytest.approx(expected["train"], rel=1e-4)
    assert h["test_loss_reference"] == pytest.approx(expected["test"], rel=1e-4)
    assert h["train_loss"] != pytest.approx(h["train_loss_reference"], rel=1e-3)
    line = open(tmp_path / "losses.txt").read().strip()
    assert line == (f"[{h['train_loss_reference']:.5f}, {h['test_loss_reference']:.5f}]")
