"""The round loop: sample a cohort, run its clients, aggregate, evaluate, log.

The engine owns everything an algorithm must not: client sampling and the JAX key chain
(both follow the reference, spec 2.1), batching into padded schedules, the executors,
evaluation of every seen client, byte counting from the pytrees exchanged, timing, and
the run directory.
"""

import functools
import resource
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from data.federated import ClientSplit, FederatedData
from trainers.aggregation import OWNED, split_owned
from trainers.algorithms.base import Algorithm, key_words, map_chunks
from trainers.executors import Executor, default_executor
from trainers.local import PHASE_STATS, ClientData, Schedule
from utils import checkpoint
from utils.pytree import all_finite, cast_floats, index, split_head, tree_bytes, tree_size
from utils.rundir import RunDir


class NonFiniteError(RuntimeError):
    """Training produced NaN or inf; the message names the round, client and quantity."""


@dataclass(frozen=True)
class RunConfig:
    """Engine settings. `num_rounds` + 1 rounds are run, as in the reference."""

    num_rounds: int = 150
    seed: int = 100
    clients_per_round: float = 0.1
    batch_size: int = 10
    eval_every: int = 1
    eval_train_every: int = 1
    executor: str = ""
    device_executor: str = ""   # --executor sharded: what runs each device's clients
    vmap_chunk: int = 10
    eval_chunk: int = 16  # small clients: padding to 32 cost 10% more on FEMNIST
    sample_with_replacement: bool = False
    quiet: bool = False
    checkpoint_every: int = 1   # rounds between checkpoints (0: never; the last is always)
    upload_dtype: str = "float32"  # uploads travel in this precision (counted at its size)
    # Score again clients whose evaluated model did not change since they were last
    # scored (off: their sums are reused, which gives the same numbers).
    rescore_unchanged: bool = False
    # The reference's logged loss (training-mode BatchNorm over each client's whole set)
    # for losses.txt; one more forward pass per scored split.
    reference_losses: bool = True
    # Sub-model federations (InCo) score each tier on the pooled test set in batches of
    # this size, dropping the last partial batch as InCo's loader does.
    global_eval_batch: int = 512
    global_eval_drop_last: bool = True


def _pad_clients(splits: list[ClientSplit], multiple: int) -> tuple[np.ndarray, ...]:
    """Stacks clients' examples into (clients, n_pad, ...) with an example mask."""
    n_max = max(s.n for s in splits)
    n_pad = -(-n_max // multiple) * multiple
    x = np.zeros((len(splits), n_pad) + splits[0].x.shape[1:], splits[0].x.dtype)
    y = np.zeros((len(splits), n_pad) + splits[0].y.shape[1:], splits[0].y.dtype)
    mask = np.zeros((len(splits), n_pad), bool)
    for i, s in enumerate(splits):
        x[i, :s.n], y[i, :s.n], mask[i, :s.n] = s.x, s.y, True
    return x, y, mask


class Batcher:
    """Per-epoch shuffles seeded like the reference: epoch e of a stream uses
    RandomState(seed0 + e).permutation(n), seed0 a word of the client's key; the last
    incomplete batch is dropped; the batch is min(n_i, B) (B = -1: the whole client)."""

    def __init__(self, sizes: np.ndarray, batch_size: int):
        self.sizes = sizes
        batches = np.where(batch_size == -1, sizes, np.minimum(sizes, batch_size))
        self.batch = batches.astype(int)
        self.steps = (sizes // self.batch).astype(int)
        self.max_batch = int(self.batch.max())
        self.max_steps = int(self.steps.max())

    def schedule(self, client: int, streams: tuple[tuple[int, int], ...],
                 key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
        words = key_words(key)
        epochs = max(e for _, e in streams)
        shape = (len(streams), max(epochs, 1), self.max_steps, self.max_batch)
        idx, mask = np.zeros(shape, np.int32), np.zeros(shape, bool)
        n, b, steps = int(self.sizes[client]), int(self.batch[client]), int(self.steps[client])
        for s, (word, stream_epochs) in enumerate(streams):
            for e in range(stream_epochs):
                perm = np.random.RandomState((words[word] + e) % 2**32).permutation(n)
                idx[s, e, :steps, :b] = perm[:steps * b].reshape(steps, b)
                mask[s, e, :steps, :b] = True
        return idx, mask


class Engine:
    def __init__(self, data: FederatedData, task: Any, algorithm: Algorithm, cfg: RunConfig,
                 run_dir: RunDir | None = None, settings: dict[str, Any] | None = None):
        """`settings`: what shaped the numbers; a checkpoint written under other settings
        is refused on resume."""
        self.data, self.task, self.alg, self.cfg, self.run_dir = data, task, algorithm, cfg, run_dir
        self.settings = {**(settings or {}), **algorithm.resume_settings}
        self.executor = Executor(cfg.executor or default_executor(), cfg.vmap_chunk,
                                 device_executor=cfg.device_executor)
        self.num_clients = len(data.train)
        self.cohort_size = (self.num_clients if algorithm.full_participation
                            else int((cfg.clients_per_round * self.num_clients) // 1))
        if self.cohort_size < 1:
            raise ValueError(f"clients_per_round={cfg.clients_per_round} samples no client "
                             f"out of {self.num_clients}; use a fraction in (0, 1]")
        self.sizes = np.array([s.n for s in data.train])
        self.batcher = Batcher(self.sizes, cfg.batch_size)
        x, y, m = _pad_clients(data.train, cfg.eval_chunk)
        self.train = (jnp.asarray(x), jnp.asarray(y), jnp.asarray(m))
        self._global_eval = hasattr(algorithm, "server_models") and data.global_test is not None
        # Scored on the pooled test set only (InCo): no per-client test arrays are kept.
        self.test = None if self._global_eval else tuple(
            jnp.asarray(a) for a in _pad_clients(data.test, cfg.eval_chunk))
        self._client_fn = lambda server, c: algorithm.client_update(server, *c)
        self.params_hook = None
        self._eval_fns = {True: self._make_eval_fn(True), False: self._make_eval_fn(False)}
        self._adapt_fn, self._unseen_score_fn = self._make_unseen_fns()
        self._server_update = jax.jit(algorithm.server_update)
        # Uploads cast to the wire precision and back on the server (float32: untouched).
        wire = jnp.dtype(cfg.upload_dtype)
        self._to_wire = ((lambda t: t) if wire == jnp.float32
                         else jax.jit(lambda t: cast_floats(t, wire)))
        self._from_wire = ((lambda sent, like: sent) if wire == jnp.float32 else jax.jit(
            lambda sent, like: jax.tree.map(lambda s, o: s.astype(o.dtype), sent, like)))
        # The old tree is donated: per-client state can be as large as the model times the
        # clients (SCAFFOLD's variates, MOON's previous models), and is never read again.
        self._scatter = jax.jit(
            lambda tree, rows, new: jax.tree.map(lambda a, b: a.at[rows].set(b), tree, new),
            donate_argnums=0)
        # Sub-model federations run each tier's clients with that tier's function and
        # are scored per tier on the pooled test set (InCo).
        self._tiered = hasattr(algorithm, "tier_client_fn")
        self._tier_seconds: dict[str, float] = {}  # per tier, when tiers train apart
        if self._global_eval:
            self._global_test = _global_batches(data.global_test, cfg.global_eval_batch,
                                                cfg.global_eval_drop_last)
            self._global_scorers: dict[int, Any] = {}

    # ----------------------------------------------------------------- evaluation
    def _score(self, params, state, x, y, mask, rng, budget=None):
        """Sums of correct / loss / count over one client's padded examples, in chunks
        (a DEQ's forward iterations too, summed over examples); `budget`: the client's
        solver budget (FeDEQ tiers)."""
        def one_chunk(cx, cy, cm):
            budgeted = () if budget is None else (None, budget)
            out, _ = self.task.apply(params, state, rng, cx, False, *budgeted)
            sums = self.task.eval_sums(out.logits, cy, cm, cx)
            if self.task.model.is_deq:
                sums["solver_iters"] = out.solver_stats.fwd_iters * jnp.sum(
                    cm.astype(jnp.float32))
            return sums

        sums = map_chunks(one_chunk, (x, y), mask, self.cfg.eval_chunk)
        return jax.tree.map(lambda s: jnp.sum(s, 0), sums)

    def _budgets(self, client) -> dict[str, Any]:
        """The solver budgets a client is scored at, by split-name suffix (FeDEQ tiers:
        its tier's and the test-time cap's); one unbudgeted pass otherwise."""
        hook = getattr(self.alg, "eval_budgets", None)
        return {"": None} if hook is None else hook(client)

    def _score_splits(self, params, state, splits, rng, with_train: bool = True,
                      budgets: dict[str, Any] | None = None):
        """Sums for a client's test split and, unless skipped, its train split (or
        whatever the algorithm's own `score_client` reports), once per budget."""
        xtr, ytr, mtr, xte, yte, mte = splits
        own = self.alg.score_client(params, state, (xtr, ytr, mtr), (xte, yte, mte), rng,
                                    self.cfg.eval_chunk)
        if own is not None:
            return own
        budgets = budgets or {"": None}
        budget = budgets[""]
        sums = {}
        for suffix, b in budgets.items():
            sums["test" + suffix] = self._score(params, state, xte, yte, mte, rng, b)
        if with_train:
            sums["train"] = self._score(params, state, xtr, ytr, mtr, rng, budget)
        if self.cfg.reference_losses:
            # Weighted by the client's training examples n_i, as the reference weights
            # every client average (spec 2.1, 2.3).
            n_train = jnp.sum(mtr.astype(jnp.float32))
            for split, (x, y, m) in (("test", (xte, yte, mte)), ("train", (xtr, ytr, mtr))):
                if split in sums:
                    mean = self._on_own_length(
                        lambda x, y, m, split=split: self.task.reference_loss(
                            params, state, rng, x, y, m, sums[split],
                            *(() if budget is None else (budget,))), x, y, m)
                    sums[split] = {**sums[split], "ref_loss": mean * n_train,
                                   "ref_weight": n_train}
        return sums

    def _on_own_length(self, fn, x, y, mask):
        """`fn(x[:L], y[:L], mask[:L])` for the shortest L of a few fixed lengths (the
        eval chunk times powers of two, and the padded length) that holds all of the
        client's examples: a whole-set forward pass then costs at most twice the client's
        size, not the largest client's, with one compiled program per length."""
        n_pad, lengths, length = x.shape[0], [], self.cfg.eval_chunk
        while length < n_pad:
            lengths.append(length)
            length *= 2
        lengths.append(n_pad)
        if len(lengths) == 1:
            return fn(x, y, mask)
        which = jnp.searchsorted(jnp.asarray(lengths), jnp.sum(mask.astype(jnp.int32)))
        branches = [lambda ops, n=n: fn(ops[0][:n], ops[1][:n], ops[2][:n]) for n in lengths]
        return jax.lax.switch(which, branches, (x, y, mask))

    def _make_eval_fn(self, with_train: bool):
        def eval_client(shared, c):
            server, rng = shared
            params, state = self.alg.eval_params(server, c[0])
            return self._score_splits(params, state, c[1:], rng, with_train,
                                      self._budgets(c[0]))
        return eval_client

    def _make_unseen_fns(self):
        def adapt(shared, c):
            server, init_params, init_state = shared
            data, schedule, key = c
            return self.alg.adapt_unseen(server, init_params, init_state, data, schedule, key)

        def score(rng, c):
            (params, state), *splits = c
            return self._score_splits(params, state, splits, rng, budgets=self._budgets(None))
        return adapt, score

    def evaluate(self, server, clients, rng, with_train: bool = True) -> dict[str, float]:
        """Pooled accuracy and loss over every seen client; the train split is skipped
        (reported as NaN) when `with_train` is False, since it costs ~9x the test split.

        Only clients whose evaluated model changed since they were last scored (see
        `_mark_changed`) are scored; the others' per-client sums are reused, so the
        pooled numbers are those of scoring everyone. `rescored` counts the scored ones.
        """
        per_client = (clients,) + self.train + self.test
        fn = self._eval_fns[with_train]
        if self._eval_rng is None or not np.array_equal(self._eval_rng, rng):
            self._fresh, self._eval_rng = {}, np.asarray(rng)
        splits = self._splits_scored(fn, server, rng, per_client)
        stale = np.zeros(self.num_clients, bool)
        for split in splits:
            stale |= ~self._fresh.get(split, np.zeros(self.num_clients, bool))
        if self.cfg.rescore_unchanged:
            stale[:] = True
        rows = np.flatnonzero(stale)
        if rows.size:
            chosen = per_client if rows.size == self.num_clients else index(
                per_client, jnp.asarray(rows))
            sums = self.executor(fn, (server, rng), chosen)
            for split, new in sums.items():
                old = self._scores.get(split)
                self._scores[split] = new if rows.size == self.num_clients else (
                    self._scatter(old, jnp.asarray(rows), new))
                self._fresh.setdefault(split, np.zeros(self.num_clients, bool))[rows] = True
        self.rescored = int(rows.size)
        pooled = _pooled({split: self._scores[split] for split in splits})
        tier_of = getattr(self.alg, "tier_of", None)
        if tier_of is not None:   # per tier, over the tier's clients (FeDEQ tiers)
            for k, name in enumerate(self.alg.tier_names):
                rows = jnp.asarray(np.flatnonzero(tier_of == k))
                if rows.size:
                    part = _pooled({split: index(self._scores[split], rows)
                                    for split in splits})
                    for metric, value in part.items():
                        pooled.setdefault(f"{metric}_tiers", {})[name] = value
        return pooled

    def _splits_scored(self, fn, server, rng, per_client) -> tuple[str, ...]:
        """The splits `fn` reports (kNN-Per scores no train split); traced once per
        evaluation function, not every round."""
        if id(fn) not in self._split_names:
            shapes = jax.eval_shape(fn, (server, rng), index(per_client, 0))
            self._split_names[id(fn)] = tuple(shapes)
        return self._split_names[id(fn)]

    def _eval_reads_server(self, server, clients) -> list[bool]:
        """Per server leaf, whether `eval_params` reads it, from its jaxpr: FeDEQ and
        Ditto score clients with their own models, FedAvg with the server's."""
        one = index(clients, 0)
        closed = jax.make_jaxpr(lambda srv: self.alg.eval_params(srv, one))(server)
        used = {id(v) for eqn in closed.jaxpr.eqns for v in eqn.invars}
        used |= {id(v) for v in closed.jaxpr.outvars}
        return [id(v) in used for v in closed.jaxpr.invars]

    def _mark_changed(self, cohort: np.ndarray, old_server, new_server) -> None:
        """After a round: the cohort's models changed, and everyone's if a server leaf
        that evaluation reads changed (compared entry by entry, so an unchanged server,
        as in Finetune after its switch, invalidates nothing)."""
        changed = any(read and not bool(jnp.array_equal(a, b)) for read, a, b in zip(
            self._reads_server, jax.tree.leaves(old_server), jax.tree.leaves(new_server),
            strict=True))
        for fresh in self._fresh.values():
            if changed:
                fresh[:] = False
            else:
                fresh[np.asarray(cohort)] = False

    def evaluate_global(self, server, rng) -> dict[str, Any]:
        """Every tier's sub-model of the server on the pooled test set (inco_spec 7): the
        reported accuracy and loss are the means over tiers; per tier in `*_tiers`."""
        acc, loss, seconds = {}, {}, {}
        x, y = self._global_test
        for k, (name, task, params, state) in enumerate(self.alg.server_models(server)):
            start = time.perf_counter()
            if k not in self._global_scorers:
                self._global_scorers[k] = jax.jit(functools.partial(_score_batches, task))
            correct, total, count = (float(v) for v in
                                     self._global_scorers[k](params, state, rng, x, y))
            acc[name], loss[name] = correct / max(count, 1.0), total / max(count, 1.0)
            seconds[name] = time.perf_counter() - start
        return {"test_acc": float(np.mean(list(acc.values()))),
                "test_loss": float(np.mean(list(loss.values()))),
                "train_acc": float("nan"), "train_loss": float("nan"),
                "test_acc_tiers": acc, "test_loss_tiers": loss, "eval_seconds_tiers": seconds}

    # ----------------------------------------------------------------- training
    def _train_cohort(self, server, inputs, cohort: np.ndarray):
        """The cohort's client updates in cohort order; a sub-model federation runs each
        tier's clients together with that tier's (separately compiled) function."""
        if not self._tiered:
            return self.executor(self._client_fn, server, inputs, trains=True)
        tiers = self.alg.tier_of[np.asarray(cohort)]
        parts, order, self._tier_seconds = [], [], {}
        for k in np.unique(tiers):
            start = time.perf_counter()
            rows = np.flatnonzero(tiers == k)
            parts.append(jax.block_until_ready(self.executor(
                self.alg.tier_client_fn(int(k)), server, index(inputs, jnp.asarray(rows)),
                trains=True)))
            order.append(rows)
            self._tier_seconds[self.alg.tier_names[k]] = time.perf_counter() - start
        merged = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
        return index(merged, jnp.asarray(np.argsort(np.concatenate(order))))

    def _bytes(self, cohort, sent, stats, down_tree, server) -> dict[str, Any]:
        """Bytes up and down this round. Sub-model uploads count only their owned entries
        (their ownership masks say which); downloads the tier's cut of the broadcast."""
        sent_flags = (np.asarray(stats["uploaded"]) > 0 if "uploaded" in stats
                      else np.ones(len(cohort), bool))
        downloaded = np.asarray(stats["downloaded"]) > 0
        if OWNED not in sent:
            return {"up_bytes": int(sent_flags.sum()) * tree_bytes(index(sent, 0)),
                    "down_bytes": int(downloaded.sum()) * tree_bytes(down_tree)}
        per_client = np.asarray(_owned_bytes(sent))
        tiers = self.alg.tier_of[np.asarray(cohort)]
        down_per_tier = self.alg.tier_download_bytes(server)
        names = self.alg.tier_names
        up_tiers = {names[k]: int(per_client[tiers == k][0]) for k in np.unique(tiers)}
        return {"up_bytes": int(per_client[sent_flags].sum()),
                "down_bytes": int(sum(down_per_tier[t] for t in tiers[downloaded])),
                "up_bytes_tiers": up_tiers,
                "down_bytes_tiers": {names[k]: int(down_per_tier[k]) for k in np.unique(tiers)},
                "cohort_tiers": [names[t] for t in tiers],
                "train_seconds_tiers": dict(self._tier_seconds),
                **self._tier_macs(np.unique(tiers))}

    def _tier_macs(self, tiers: np.ndarray) -> dict[str, Any]:
        """Per tier in the cohort, forward MACs per image and a training step's MACs
        (forward + backward counted as 3 forward passes, the usual estimate, times the
        batch), where the algorithm knows its tiers' costs (MobileNet tiers)."""
        costs = getattr(self.alg, "tier_costs", None)
        if not costs:
            return {}
        names = self.alg.tier_names
        return {"macs_per_image_tiers": {names[k]: costs[k]["macs_per_image"] for k in tiers},
                "train_macs_per_step_tiers": {
                    names[k]: 3 * costs[k]["macs_per_image"] * self.cfg.batch_size
                    for k in tiers}}

    def _tier_phases(self, cohort: np.ndarray, phase: jnp.ndarray) -> dict[str, Any]:
        """Per tier in the cohort, its clients' solver figures (and MACs, where the
        algorithm counts them from the iterations used: FeDEQ tiers)."""
        counter = getattr(self.alg, "tier_macs", None)
        if counter is None or not self.task.model.is_deq:
            return {}
        tiers = self.alg.tier_of[np.asarray(cohort)]
        out: dict[str, dict[str, float]] = {}
        for k in np.unique(tiers):
            name = self.alg.tier_names[k]
            means = _phase_means(phase[jnp.asarray(np.flatnonzero(tiers == k))], True)
            means.update(counter(int(k), means))
            for key in ("solver_iters", "solver_rel_residual", "bwd_iters", "bwd_residual",
                        "local_loss", "macs_per_example", "train_macs_per_example"):
                if key in means:
                    out.setdefault(f"{key}_tiers", {})[name] = means[key]
        return out

    def _cohort(self, rs: np.random.RandomState) -> np.ndarray:
        if self.alg.full_participation:  # the reference draws nothing then (spec 3.3)
            return np.arange(self.num_clients)
        return rs.choice(self.num_clients, self.cohort_size,
                         replace=self.cfg.sample_with_replacement
                         or self.alg.samples_with_replacement)

    def _client_inputs(self, batcher: "Batcher", cohort, key: jax.Array):
        """Schedules and keys for the clients in order; each client folds its index into
        the key chain, which carries on from one client to the next (spec 2.1)."""
        idx, mask, keys = [], [], []
        for t in cohort:
            key = jax.random.fold_in(key, int(t))
            i, m = batcher.schedule(int(t), self.alg.streams, key)
            idx.append(i)
            mask.append(m)
            keys.append(key)
        schedule = Schedule(jnp.asarray(np.stack(idx)), jnp.asarray(np.stack(mask)))
        return schedule, jnp.stack(keys), key

    def run(self) -> dict[str, Any]:
        cfg, alg = self.cfg, self.alg
        rs = np.random.RandomState(12 + cfg.seed)
        if self.data.unseen_train:
            rs.choice(self.num_clients, len(self.data.unseen_train))  # the reference's draw
        key = jax.random.PRNGKey(cfg.seed)
        example = jnp.asarray(self.data.train[0].x[:2])
        init_params, init_state = self.task.model.init(jax.random.PRNGKey(cfg.seed), example)
        if self.params_hook is not None:   # e.g. pretrained ViT weights (--vit_weights)
            init_params = self.params_hook(init_params)
        server, clients = alg.init(init_params, init_state, self.num_clients)
        self._announce(init_params, init_state)
        self._reads_server = self._eval_reads_server(server, clients)
        self._scores, self._fresh, self._eval_rng, self._split_names = {}, {}, None, {}
        if alg.extra_initial_draw:
            # Without replacement, for vision and text alike (spec 3.8): numpy's legacy
            # choice draws a permutation then, m bounded integers otherwise, so the
            # two leave the stream at different places and every later cohort differs.
            rs.choice(self.num_clients, self.cohort_size, replace=False)
        eval_rng = jax.random.PRNGKey(cfg.seed + 1)

        history: list[dict[str, Any]] = []
        start = 0
        unsaved: set[int] = set()  # clients changed since the last checkpoint
        if self.run_dir and checkpoint.exists(self.run_dir.path):
            saved = checkpoint.load(self.run_dir.path, server, clients, self.settings)
            start, server, clients, history = (saved.next_round, saved.server, saved.clients,
                                               saved.history)
            rs.set_state(saved.sampler)
            key = jnp.asarray(saved.key)
            self.run_dir.rewrite_rounds(history)
            print(f"resuming from {self.run_dir.path / checkpoint.FILENAME}: "
                  f"{start} of {cfg.num_rounds + 1} rounds done", flush=True)
        bar = tqdm(range(start, cfg.num_rounds + 1), desc=f"{alg.name} {self.data.name}",
                   initial=start, total=cfg.num_rounds + 1,
                   disable=cfg.quiet, dynamic_ncols=True)
        for r in bar:
            t0, cpu0 = time.perf_counter(), time.process_time()
            key = jax.random.fold_in(key, r)
            cohort = self._cohort(rs)
            schedule, keys, key = self._client_inputs(self.batcher, cohort, key)
            rows = jnp.asarray(cohort)
            data = ClientData(self.train[0][rows], self.train[1][rows])
            cohort_clients = index(clients, rows)
            new_clients, uploads, stats = self._train_cohort(
                server, (cohort_clients, data, schedule, keys), cohort)
            self._check_finite(r, cohort, stats, uploads)
            if len(set(cohort.tolist())) < len(cohort):
                # Drawn with replacement: as in the reference (spec 3.1), a client drawn
                # twice keeps, and uploads for both draws, the result of its last draw.
                last = jnp.asarray(_last_draw(cohort))
                new_clients, uploads = index(new_clients, last), index(uploads, last)
            sent = self._to_wire(uploads)
            down_tree = alg.broadcast(server)
            weights = alg.aggregation_weights(jnp.asarray(self.sizes[cohort]))
            old_server = server
            server = self._server_update(server, self._from_wire(sent, uploads), weights)
            clients = self._scatter(clients, rows, new_clients)
            self._mark_changed(cohort, old_server, server)
            unsaved.update(int(c) for c in cohort)
            jax.block_until_ready((server, clients))
            t1 = time.perf_counter()

            record = {"round": r, "cohort": [int(c) for c in cohort],
                      "train_seconds": t1 - t0,
                      **self._bytes(cohort, sent, stats, down_tree, old_server)}
            record.update(_phase_means(stats["phase"], self.task.model.is_deq))
            record.update(self._tier_phases(cohort, stats["phase"]))
            # Every round is logged (bytes, seconds, solver counts); accuracy and
            # evaluation fields only in the rounds that were evaluated.
            postfix = {}
            if (r % cfg.eval_every == 0 or r == cfg.num_rounds) and self._global_eval:
                record.update(self.evaluate_global(server, eval_rng))
                record["eval_seconds"] = time.perf_counter() - t1
                postfix = {"test_acc": f"{record['test_acc']:.4f}"}
            elif r % cfg.eval_every == 0 or r == cfg.num_rounds:
                train_every = cfg.eval_train_every  # 0: never (accuracy logged as NaN)
                with_train = bool(train_every) and (r % train_every == 0
                                                    or r == cfg.num_rounds)
                record.update(self.evaluate(server, clients, eval_rng, with_train))
                record["eval_seconds"] = time.perf_counter() - t1
                record["clients_scored"] = self.rescored
                postfix = {"test_acc": f"{record['test_acc']:.4f}",
                           "train_acc": f"{record['train_acc']:.4f}"}
            record["seconds"] = time.perf_counter() - t0
            # CPU seconds of every thread (XLA's included): / seconds = cores kept busy.
            record["cpu_seconds"] = time.process_time() - cpu0
            record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            history.append(record)
            if self.run_dir:
                self.run_dir.log_round(record)
            if "fwd_solves" in record:  # solves that missed tolerance, never hidden
                postfix["unconverged"] = (f"fwd {record['fwd_unconverged']}/"
                                          f"{record['fwd_solves']} bwd "
                                          f"{record['bwd_unconverged']}/{record['bwd_solves']}")
            bar.set_postfix(postfix)
            every = cfg.checkpoint_every
            if self.run_dir and self.run_dir.writer and (
                    (every and (r + 1) % every == 0) or r == cfg.num_rounds):
                checkpoint.save(self.run_dir.path, checkpoint.RunState(
                    r + 1, server, clients, rs.get_state(), np.asarray(key), history),
                    self.settings, changed=np.asarray(sorted(unsaved), int))
                unsaved.clear()

        unseen = self._unseen(server, init_params, init_state, key, eval_rng)
        # for callers that compare or reuse the trained model
        self.final_server, self.final_clients, self.history = server, clients, history
        return self._summary(history, unseen)

    def _unseen(self, server, init_params, init_state, key, eval_rng) -> dict | None:
        if not self.data.unseen_train:
            return None
        if not self.alg.evaluates_unseen:
            print(f"{self.alg.name} has no unseen-client evaluation (as in the reference); "
                  "unseen.txt is not written", flush=True)
            return None
        sizes = np.array([s.n for s in self.data.unseen_train])
        schedule, keys, _ = self._client_inputs(Batcher(sizes, self.cfg.batch_size),
                                                range(len(sizes)), key)
        multiple = self.cfg.eval_chunk
        xtr, ytr, mtr = (jnp.asarray(a) for a in _pad_clients(self.data.unseen_train, multiple))
        xte, yte, mte = (jnp.asarray(a) for a in _pad_clients(self.data.unseen_test, multiple))
        adapted = self.executor(self._adapt_fn, (server, init_params, init_state),
                                (ClientData(xtr, ytr), schedule, keys), trains=True)
        sums = self.executor(self._unseen_score_fn, eval_rng,
                             (adapted, xtr, ytr, mtr, xte, yte, mte))
        result = _pooled(sums)
        if self.run_dir:
            self.run_dir.write_unseen(result["train_acc"], result["test_acc"],
                                      {"unseen": True, **result})
        return result

    # ----------------------------------------------------------------- reporting
    def _check_finite(self, r: int, cohort: np.ndarray, stats, uploads) -> None:
        finite = jax.vmap(all_finite)(uploads) & jnp.isfinite(stats["phase"][:, 1])
        bad = np.flatnonzero(~np.asarray(finite))
        if bad.size:
            i = int(bad[0])
            what = ("training loss" if not np.isfinite(np.asarray(stats["phase"][i, 1]))
                    else "uploaded parameters")
            raise NonFiniteError(f"round {r}: client {int(cohort[i])} produced a non-finite "
                                 f"{what}; lower the learning rate (-lr) or check the data")

    def _announce(self, params, state) -> None:
        shared, head = split_head(params)
        lines = [
            f"model {self.task.model.name}: {tree_size(params):,} params "
            f"({tree_bytes(params) / 1e6:.2f} MB), shared {tree_size(shared):,} "
            f"({tree_bytes(shared) / 1e6:.2f} MB), head {tree_size(head):,} "
            f"({tree_bytes(head) / 1e6:.3f} MB), model state {tree_size(state):,}",
            f"data: {self.data.summary()}",
            f"algorithm {self.alg.name}: {self.cohort_size} of {self.num_clients} clients per "
            f"round, {self.cfg.num_rounds + 1} rounds, executor {self.executor.describe()}",
        ]
        print("\n".join(lines), flush=True)  # -q silences per-round output only
        self.model_info = {"params": tree_size(params), "shared": tree_size(shared),
                           "head": tree_size(head), "params_bytes": tree_bytes(params),
                           "shared_bytes": tree_bytes(shared), "head_bytes": tree_bytes(head)}

    def _summary(self, history, unseen) -> dict[str, Any]:
        last = history[-1]  # the last round is always evaluated
        steady = history[1:] or history  # round 0 compiles
        evaluated = [h for h in steady if "eval_seconds" in h] or [last]
        summary = {
            "algorithm": self.alg.name, "dataset": self.data.name,
            "model": self.task.model.name,
            "rounds": sum("test_acc" in h for h in history),
            "final_train_acc": last["train_acc"], "final_test_acc": last["test_acc"],
            "mean_train_seconds": float(np.mean([h["train_seconds"] for h in steady])),
            "mean_eval_seconds": float(np.mean([h["eval_seconds"] for h in evaluated])),
            # Mean over rounds: Finetune stops sending after its switch, so the last
            # round alone would say it sends nothing.
            "up_bytes_per_client": float(np.mean([h["up_bytes"] for h in history]))
            / max(self.cohort_size, 1),
            **self.model_info,
        }
        if "test_acc_tiers" in last:  # sub-model federations: per tier
            summary["final_test_acc_tiers"] = last["test_acc_tiers"]
            tiered = [h for h in history if "up_bytes_tiers" in h]
            names = {n for h in tiered for n in h["up_bytes_tiers"]}
            summary["up_bytes_per_client_tiers"] = {
                n: float(np.mean([h["up_bytes_tiers"][n] for h in tiered
                                  if n in h["up_bytes_tiers"]])) for n in sorted(names)}
            summary["down_bytes_per_client_tiers"] = {
                n: float(np.mean([h["down_bytes_tiers"][n] for h in tiered
                                  if n in h["down_bytes_tiers"]])) for n in sorted(names)}
            if getattr(self.alg, "tier_costs", None):
                summary["macs_per_image_tiers"] = {
                    n: c["macs_per_image"] for n, c in zip(self.alg.tier_names,
                                                           self.alg.tier_costs, strict=True)}
                summary["params_tiers"] = {
                    n: c["params"] for n, c in zip(self.alg.tier_names, self.alg.tier_costs,
                                                   strict=True)}
        summary.update(deq_tier_summary(history))
        if "fwd_solves" in last:  # training solves over all rounds
            for key in ("fwd_solves", "fwd_unconverged", "bwd_solves", "bwd_unconverged"):
                summary[key] = int(sum(h[key] for h in history))
        if unseen:
            summary["unseen_train_acc"] = unseen["train_acc"]
            summary["unseen_test_acc"] = unseen["test_acc"]
        if self.run_dir:
            self.run_dir.write_summary(summary)
        return summary


def deq_tier_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """FeDEQ tiers: the last round's accuracy at the test-time cap, and per tier the mean
    over rounds of its iterations, residual and MACs per example."""
    last, out = history[-1], {}
    for key in last:
        if key.startswith("test_at") and key.endswith("_acc_tiers"):
            out[f"final_{key}"] = last[key]
    for key in ("solver_iters_tiers", "solver_rel_residual_tiers", "macs_per_example_tiers",
                "train_macs_per_example_tiers", "test_solver_iters_tiers"):
        rows = [h[key] for h in history if key in h]
        names = sorted({n for r in rows for n in r})
        if names:
            out[f"mean_{key}"] = {n: float(np.mean([r[n] for r in rows if n in r]))
                                  for n in names}
    return out


def _owned_bytes(sent: dict) -> np.ndarray:
    """Per client, the bytes of the entries its ownership masks mark as owned (owned
    entries counted per leaf, then added as integers: a float32 total of a 70 MB model
    would round)."""
    rest, masks = split_owned(sent)
    entries = jax.tree.map(
        lambda leaf, m: jnp.sum(jnp.broadcast_to(
            m.reshape(m.shape + (1,) * (leaf.ndim - m.ndim)) if m.ndim < leaf.ndim else m,
            leaf.shape).reshape(leaf.shape[0], -1), axis=1), rest, masks)
    return sum(np.rint(np.asarray(n, np.float64)).astype(np.int64) * leaf.dtype.itemsize
               for n, leaf in zip(jax.tree.leaves(entries), jax.tree.leaves(rest),
                                  strict=True))


def _global_batches(split: ClientSplit, batch: int, drop_last: bool):
    """The pooled test set as (batches, batch, ...); InCo's loader drops the last partial
    batch of 512 (inco_spec 3.4): 9,728 of CIFAR-10's 10,000 images are scored."""
    n = split.n
    usable = (n // batch) * batch if drop_last else n
    if usable == 0:
        raise ValueError(f"the pooled test set has {n} examples, fewer than one batch of "
                         f"{batch}; pass --noglobal_eval_drop_last or a smaller batch")
    x, y = split.x[:usable], split.y[:usable]
    pad = (-usable) % batch
    mask = np.concatenate([np.ones(usable, bool), np.zeros(pad, bool)])
    x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    y = np.concatenate([y, np.zeros((pad,) + y.shape[1:], y.dtype)])
    shape = lambda a: a.reshape((-1, batch) + a.shape[1:])
    return (jnp.asarray(shape(x)), (jnp.asarray(shape(y)), jnp.asarray(shape(mask))))


def _score_batches(task, params, state, rng, x, labels):
    """(correct, summed loss, count) of an evaluation-mode pass over batches."""
    y, mask = labels

    def one(batch):
        bx, by, bm = batch
        out, _ = task.apply(params, state, rng, bx, False)
        sums = task.eval_sums(out.logits, by, bm, bx)
        return sums["correct"], sums["loss"], sums["count"]

    correct, loss, count = jax.lax.map(one, (x, y, mask))
    return jnp.sum(correct), jnp.sum(loss), jnp.sum(count)


def _last_draw(cohort: np.ndarray) -> np.ndarray:
    """For each position of the cohort, the position of that client's last draw."""
    last = {int(c): i for i, c in enumerate(cohort)}
    return np.array([last[int(c)] for c in cohort])


def _pooled(sums: dict) -> dict[str, float]:
    out = {"train_acc": float("nan"), "train_loss": float("nan")}
    for split in sums:
        s = jax.tree.map(lambda v: float(jnp.sum(v)), sums[split])
        out[f"{split}_acc"] = s["correct"] / max(s["count"], 1.0)
        # Text tasks count their loss over other positions than their accuracy.
        out[f"{split}_loss"] = s["loss"] / max(s.get("loss_count", s["count"]), 1.0)
        if "ref_loss" in s:
            out[f"{split}_loss_reference"] = s["ref_loss"] / max(s["ref_weight"], 1.0)
        if "solver_iters" in s:   # forward iterations per scored example
            out[f"{split}_solver_iters"] = s["solver_iters"] / max(s["count"], 1.0)
    return out


def _phase_means(phase: jnp.ndarray, is_deq: bool) -> dict[str, float]:
    total = np.asarray(jnp.sum(phase, 0), np.float64)
    stat = dict(zip(PHASE_STATS, total.tolist(), strict=True))
    steps, bwd_steps = max(stat["steps"], 1.0), max(stat["bwd_steps"], 1.0)
    out = {"local_loss": stat["loss"] / steps}
    if is_deq:
        out.update(solver_iters=stat["fwd_iters"] / steps,
                   solver_residual=stat["fwd_residual"] / steps,
                   solver_rel_residual=stat["fwd_rel_residual"] / steps,
                   bwd_iters=stat["bwd_iters"] / bwd_steps,
                   bwd_residual=stat["bwd_residual"] / bwd_steps,
                   fwd_solves=int(stat["fwd_solves"]),
                   fwd_unconverged=int(stat["fwd_unconverged"]),
                   bwd_solves=int(stat["bwd_solves"]),
                   bwd_unconverged=int(stat["bwd_unconverged"]))
    return out
