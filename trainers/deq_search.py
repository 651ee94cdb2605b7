"""DAC's gate search on the equilibrium block's hidden width, under MACs budgets that
count the solver's expected iterations; writes a tier table `--tiers` reads.

    python -m trainers.deq_search --dataset femnist --data_dir data --num_clients 100 \
        --macs_budgets 40e6,150e6 --epochs 10 --out runs/deq_search

The DEQ-ResNet gets one gate per hidden channel (after the first normalisation,
models/deq_resnet.py), trained on the pooled training sets of the clients with DAC's
loss (cross-entropy + rho (entropy of softmax(gate) + 0.1 bound), trainers/dac/gates.py)
and DAC's optimiser and schedule. After every epoch a snapshot: the channels whose
|gate| >= threshold (at least `floor`), the forward iterations the solver takes with
only those channels (measured on the test examples), and MACs per example = stem +
expected iterations x block at that width + head (models/deq_cost.py). Each budget
takes the first snapshot under it (DAC's rule) and becomes a tier: its width rate and
the search's cap. Training a tier keeps the same number of channels per normalisation
group (models/deq_resnet.hidden_channels), not the searched indices (docs/DEVIATIONS.md).
"""

import json
from pathlib import Path
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from data.registry import load_dataset
from deq.budget import SolverBudget
from deq.config import SolverConfig
from models.deq_cost import deq_resnet_cost
from models.deq_resnet import GROUPS, deq_resnet, hidden_channels
from models.registry import DEQ_RESNET_WIDTHS
from trainers.dac.centralised import TrainSettings, define_training_flags, settings_from_flags
from trainers.dac.centralised import train as train_centralised
from trainers.dac.gates import (
    BOUND_WEIGHT,
    PENALTY_FACTOR,
    THRESHOLD,
    bound_term,
    entropy_term,
    surviving_channels,
)
from utils.input_error import InputError
from utils.rundir import atomic_write

MODEL_OF = {"femnist": "deq_resnet_s", "cifar10": "deq_resnet_m"}


def pooled(dataset: str, data_dir: str, num_clients: int, seed: int, settings: TrainSettings):
    """The clients' train and test splits pooled (seeded subsets if asked)."""
    data = load_dataset(dataset, data_dir, num_clients, 0.0, seed)
    join = lambda splits: (np.concatenate([s.x for s in splits]).astype(np.float32),
                           np.concatenate([s.y for s in splits]).astype(np.int32))
    (xtr, ytr), (xte, yte) = join(data.train), join(data.test)
    rs = np.random.RandomState(seed)
    if settings.train_subset and settings.train_subset < len(ytr):
        keep = np.sort(rs.permutation(len(ytr))[:settings.train_subset])
        xtr, ytr = xtr[keep], ytr[keep]
    if settings.test_subset and settings.test_subset < len(yte):
        keep = np.sort(rs.permutation(len(yte))[:settings.test_subset])
        xte, yte = xte[keep], yte[keep]
    return (xtr, ytr, xte, yte), data.num_classes, tuple(data.input_shape)


def select(snapshots: list[dict[str, Any]], budget: float) -> dict[str, Any]:
    """The first snapshot with MACs under `budget`; an error naming the smallest."""
    for snap in snapshots:
        if snap["macs"] < budget:
            return snap
    small = min(snapshots, key=lambda s: s["macs"])
    raise InputError(f"no snapshot is under {budget:.4g} MACs; the smallest is epoch "
                     f"{small['epoch']} with {small['macs']:.4g} MACs "
                     f"({small['channels']} hidden channels)")


def run_search(dataset: str, data_dir: str, num_clients: int, out: Path,
               settings: TrainSettings, budgets: list[float], maxiter: int = 20,
               penalty_factor: float = PENALTY_FACTOR, threshold: float = THRESHOLD,
               floor: int = GROUPS, quiet: bool = False) -> dict[str, Any]:
    if dataset not in MODEL_OF:
        raise InputError(f"--dataset {dataset!r}: the width search runs the DEQ-ResNets, on "
                         f"{', '.join(MODEL_OF)}")
    data, classes, shape = pooled(dataset, data_dir, num_clients, settings.seed, settings)
    c1, c2 = DEQ_RESNET_WIDTHS[MODEL_OF[dataset]]
    solver = SolverConfig(fwd_maxiter=maxiter)
    forward = deq_resnet(c1, c2, classes, solver, gated=True)
    model = hk.transform_with_state(forward)
    x_probe = jnp.asarray(data[2][:500])

    @jax.jit
    def iters_at(params, state, hidden):
        """Mean forward iterations on the probe examples with only `hidden` channels."""
        budget = SolverBudget.of(maxiter, solver.tol, solver.bwd_maxiter)._replace(
            hidden=hidden)
        out, _ = model.apply(params, state, None, x_probe, False, None, budget)
        return out.solver_stats.fwd_iters
    snapshots: list[dict[str, Any]] = []

    def on_epoch(epoch, params, state, record):
        gate = np.asarray(params["deq_block"]["gate"])
        kept = surviving_channels(gate, threshold, floor)
        mask = np.zeros(c2, np.float32)
        mask[kept] = 1.0
        # the kept channels keep their trained gates; the others are cut
        iters = float(iters_at(params, state, jnp.asarray(mask)))
        cost = deq_resnet_cost(shape, c1, len(kept), classes)
        snap = {"epoch": epoch, "channels": int(len(kept)), "width": len(kept) / c2,
                "expected_iters": iters, "macs": cost.forward(iters),
                "test_acc": record["test_acc"], "kept": kept.tolist()}
        snapshots.append(snap)
        atomic_write(out / "snapshots.json", json.dumps(snapshots, indent=1))
        return {k: snap[k] for k in ("channels", "expected_iters", "macs")}

    def penalty(p):
        w = p["deq_block"]["gate"]
        return penalty_factor * (entropy_term(w) + BOUND_WEIGHT * bound_term(w))

    out.mkdir(parents=True, exist_ok=True)
    train_centralised(forward, settings, data, out, penalty=penalty, on_epoch=on_epoch,
                      desc="deq search", quiet=quiet, augment=lambda key, x: x)
    tiers = []
    for budget in budgets:
        snap = select(snapshots, budget)
        rate = len(hidden_channels(c2, snap["width"])) / c2
        tiers.append({"name": f"macs{budget:.3g}", "maxiter": maxiter, "width": rate})
    table = {"tiers": tiers}
    atomic_write(out / "tiers.json", json.dumps(table, indent=1))
    return {"snapshots": snapshots, **table}


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined only when run as a program: the tests import this module beside main.py,
    whose flags (--data_dir, ...) share absl's one registry."""
    define_training_flags("runs/deq_search", epochs=10, lr=0.01, batch_size=256)
    flags.DEFINE_string("dataset", "femnist", f"dataset: {', '.join(MODEL_OF)}")
    flags.DEFINE_integer("num_clients", 100, "clients whose training sets are pooled")
    flags.DEFINE_list("macs_budgets", [], "MACs-per-example budgets, one tier each")
    flags.DEFINE_integer("maxiter", 20, "the forward solver's cap during the search and in "
                         "the tiers it writes")
    flags.DEFINE_float("penalty_factor", PENALTY_FACTOR, "rho: weight of entropy + 0.1 bound")
    flags.DEFINE_float("threshold", THRESHOLD, "a channel is removed when |gate| < this")
    flags.DEFINE_integer("floor", GROUPS, "fewest hidden channels kept")


def main(argv):
    del argv
    try:
        budgets = [float(b) for b in FLAGS.macs_budgets]
    except ValueError:
        raise app.UsageError(f"--macs_budgets takes numbers, got {FLAGS.macs_budgets}") from None
    out = Path(FLAGS.out)
    try:
        result = run_search(FLAGS.dataset, FLAGS.data_dir, FLAGS.num_clients, out,
                            settings_from_flags(FLAGS), budgets, FLAGS.maxiter,
                            FLAGS.penalty_factor, FLAGS.threshold, FLAGS.floor, FLAGS.quiet)
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"\n{'epoch':>5} {'channels':>8} {'iters':>6} {'MACs':>12} {'test acc':>8}")
    for s in result["snapshots"]:
        print(f"{s['epoch']:>5} {s['channels']:>8} {s['expected_iters']:>6.2f} "
              f"{s['macs']:>12,.0f} {s['test_acc']:>8.4f}")
    for t in result["tiers"]:
        print(f"tier {t['name']}: width {t['width']:g}, cap {t['maxiter']}")
    print(f"snapshots: {out / 'snapshots.json'}; tier table: {out / 'tiers.json'} "
          f"(pass it to main.py --tiers)")


if __name__ == "__main__":
    define_flags()
    app.run(main)
