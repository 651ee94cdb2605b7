"""Seconds per round, split into client training and evaluation, per executor and solver
configuration, on real FEMNIST (or a stated subset that fits the machine).

    python -m benchmarks.round_time --data_dir ROOT [--clients 100 --cohort 0.1 -le 5 -pe 3]

Each configuration runs round 0 (which compiles) and then `--rounds` timed rounds; the
steady-state means are printed side by side, FeDEQ (DEQ-ResNet-S) and FedAvg (ResNet20).
"reference" is the authors' solver set-up: jaxopt Anderson vmapped per example, XLA's own
convolution gradient, a Python loop over clients; "fast" is this project's default (same
solvers, fast convolution gradient, batched Anderson); "gmres" adds `--bwd_solver gmres`.
Every configuration starts from the same initial model and cohort, so round 0's mean
local loss must agree to solver tolerance between them; its largest relative difference
is printed. The last line gives the best FeDEQ seconds per round and its speed-up over the
reference configuration.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from data.leaf import load_femnist  # noqa: E402
from deq.config import SolverConfig  # noqa: E402
from models.registry import build_model  # noqa: E402
from trainers.algorithms.base import HParams  # noqa: E402
from trainers.algorithms.fedavg import FedAvg  # noqa: E402
from trainers.algorithms.fedeq import FedEQ  # noqa: E402
from trainers.engine import Engine, RunConfig  # noqa: E402
from trainers.task import ClassificationTask  # noqa: E402
from utils.rundir import RunDir  # noqa: E402

SOLVERS = {
    "reference": SolverConfig(fast_conv=False, anderson_impl="jaxopt"),
    "fast": SolverConfig(),  # the default: fast conv + batched Anderson, normal-CG
    "gmres": SolverConfig(bwd_solver="gmres"),  # --bwd_solver gmres: not the reference's
}


def _time(data, algo_name, model_name, solver, executor, args):
    model = build_model(model_name, num_classes=data.num_classes,
                        input_shape=data.input_shape, solver=solver)
    task = ClassificationTask(model)
    hp = HParams(lr=0.01, local_epochs=args.le, personal_epochs=args.pe)
    algo = FedEQ(task, hp) if algo_name == "fedeq" else FedAvg(task, hp)
    cfg = RunConfig(num_rounds=args.rounds, seed=100, clients_per_round=args.cohort,
                    batch_size=10, executor=executor, vmap_chunk=args.vmap_chunk, quiet=True,
                    checkpoint_every=0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        summary = Engine(data, task, algo, cfg, RunDir(tmp)).run()
        first = json.loads((Path(tmp) / "metrics.jsonl").read_text().splitlines()[0])
    return {"train": summary["mean_train_seconds"], "eval": summary["mean_eval_seconds"],
            "total_wall": time.perf_counter() - start, "test_acc": summary["final_test_acc"],
            "loss0": first["local_loss"], "acc0": first["test_acc"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--cohort", type=float, default=0.1)
    p.add_argument("-le", type=int, default=5)
    p.add_argument("-pe", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="timed rounds after round 0")
    p.add_argument("--executors", default="loop,map,vmap",
                   help="vmap did not finish a FEMNIST round in 40 min on a 2-core CPU")
    p.add_argument("--vmap_chunk", type=int, default=10)
    p.add_argument("--solvers", default="fast,gmres",
                   help="FeDEQ configurations timed against the reference one: fast (the "
                        "default, faithful normal-CG) and gmres (--bwd_solver gmres)")
    p.add_argument("--skip_fedavg", action="store_true")
    args = p.parse_args()
    data = load_femnist(args.data_dir, num_clients=args.clients)
    print(f"backend {jax.default_backend()}, {os.cpu_count()} cpus; FEMNIST {args.clients} "
          f"writers, {int(args.cohort * args.clients)} per round, -le {args.le} -pe {args.pe}, "
          f"{args.rounds} timed round(s) after round 0", flush=True)
    rows = []
    executors = args.executors.split(",")
    plan = [("fedeq", "deq_resnet_s", "reference", "loop")]
    plan += [("fedeq", "deq_resnet_s", solver, ex)
             for solver in args.solvers.split(",") for ex in executors]
    if not args.skip_fedavg:
        plan += [("fedavg", "resnet20", "fast", ex) for ex in executors]
    for algo, model, solver, executor in plan:
        r = _time(data, algo, model, SOLVERS[solver], executor, args)
        rows.append((algo, model, solver, executor, r))
        print(f"{algo:7s} {model:13s} {solver:9s} {executor:5s} train {r['train']:8.2f} s  "
              f"eval {r['eval']:8.2f} s  round {r['train'] + r['eval']:8.2f} s  "
              f"(round 0: local loss {r['loss0']:.6f}, test acc {r['acc0']:.4f}; final test "
              f"acc {r['test_acc']:.4f})", flush=True)
    ref = rows[0][4]
    fedeq = [r for r in rows[1:] if r[0] == "fedeq"]
    best = min(fedeq, key=lambda r: r[4]["train"] + r[4]["eval"])
    ref_s = ref["train"] + ref["eval"]
    best_s = best[4]["train"] + best[4]["eval"]
    loss_gap = max(abs(r[4]["loss0"] - ref["loss0"]) / abs(ref["loss0"]) for r in fedeq)
    print(f"FeDEQ round 0 mean local loss: largest relative difference to the reference "
          f"configuration {loss_gap:.1e}")
    print(f"best FeDEQ: {best_s:.2f} s/round ({best[2]} solvers, {best[3]} executor), "
          f"{ref_s / best_s:.2f}x faster "
          f"than the reference configuration ({ref_s:.2f} s/round)")



if __name__ == "__main__":
    main()
