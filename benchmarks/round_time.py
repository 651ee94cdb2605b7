"""Seconds per FeDEQ round on real FEMNIST, against the authors' code as measured beside
this project, and the effect of each of this project's exact speed-ups, in one run.

    python -m benchmarks.round_time --data_dir ROOT [--clients 20 --cohort 0.1 -le 5 -pe 3]

The defaults are issue 12's subset: the first 20 writers, 2 per round, 5 + 3 epochs,
batch 10, lr 0.01, rho 0.01, seed 100, every client's train and test split scored each
round. Each configuration runs round 0 (compilation, and the first scoring of every
client) and `--rounds` more; rounds 1.. are timed. Per configuration it prints each
timed round's training and evaluation seconds, the cores kept busy (process CPU seconds,
every thread included, over wall seconds), the speed-up over the authors' code, and the
test accuracy per round, which must agree between configurations (same cohorts; the
speed-ups are exact). The authors' code is not run here: its figures are the ones issue
12 reports for the same subset on this machine type (quoted below).

Configurations (all this project's code; all with the reference's solvers unless named):
- `loop, rescore all`: one client after another, every client scored every round;
- `loop`: clients whose model did not change since they were last scored are not scored
  again (their sums are reused); `, rescore all` after any executor scores every client
  every round (`--rescore_unchanged`), as before that speed-up;
- `threads` (the CPU default): the cohort's clients and the clients being scored run on
  one thread per core;
- `threads, gmres`: `--bwd_solver gmres`, not the reference's backward solver;
- `threads, jacobian_free`: `--bwd_solver jacobian_free` (one-step gradient, no linear
  solve), not the reference's gradient: for the accuracy-for-speed target, run it with
  `--rounds 19` beside `threads` and read the final accuracy gap;
- `threads, jacobian_free, maxiter 6`: also caps the forward solve at 6 Anderson
  iterations instead of the reference's 20 (any `EXECUTOR[, BWD_SOLVER][, maxiter N]`
  is read the same way; `threads, rescore all` is the CPU default without the reuse).
`--arithmetic` also counts each configuration's training arithmetic per round (its
representation steps: examples x one step's FLOPs at the logged mean iteration counts,
benchmarks/deq_step.py; the head epochs and the evaluation are left out, so it is a lower
bound) and divides it by a dense matmul's rate with every core busy, measured in the same
run: the seconds training could not go below at that rate, against the seconds it took.
`--with_emulation` adds `emulation (ours)`: this project's own stand-in for the authors'
solver set-up (XLA convolution gradient, jaxopt Anderson vmapped per example, loop); it
is this project's code, not the authors', and was measured about 2x slower than the
authors' code (issue 12).
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from benchmarks.deq_step import all_cores_matmul_flops_per_second, step_flops  # noqa: E402
from data.leaf import load_femnist  # noqa: E402
from deq.config import BWD_SOLVERS, SolverConfig  # noqa: E402
from models.registry import build_model  # noqa: E402
from trainers.algorithms.base import HParams  # noqa: E402
from trainers.algorithms.fedeq import FedEQ, FedEQConfig  # noqa: E402
from trainers.engine import Engine, RunConfig  # noqa: E402
from trainers.task import ClassificationTask  # noqa: E402
from utils.rundir import RunDir, atomic_file  # noqa: E402

# The authors' FeDEQ code on this subset and machine type, as issue 12 reports it.
AUTHORS = {"train_1": 105.7, "eval_1": 74.3, "round_1": 180.0, "round_2": 176.9,
           "test_acc": (0.0860, 0.1465, 0.1497), "cores": 1.65}
AUTHORS_ROUND = (AUTHORS["round_1"] + AUTHORS["round_2"]) / 2  # 178.45 s

# The named configuration; `_config` reads every other one as
# "EXECUTOR[, rescore all][, BWD_SOLVER][, maxiter N]" (e.g. "threads, jacobian_free, maxiter 6").
NAMED = {
    "emulation (ours)": (SolverConfig(fast_conv=False, anderson_impl="jaxopt"), "loop", True),
}
EXECUTORS = ("loop", "threads")


def _config(name: str) -> tuple[SolverConfig, str, bool]:
    """(solver, executor, rescore_unchanged) of a configuration name."""
    if name in NAMED:
        return NAMED[name]
    executor, *rest = [part.strip() for part in name.split(",")]
    solver, rescore = {}, False
    for part in rest:
        if part == "rescore all":
            rescore = True
        elif part in BWD_SOLVERS:
            solver["bwd_solver"] = part
        elif part.startswith("maxiter ") and part[8:].isdigit():
            solver["fwd_maxiter"] = int(part[8:])
        else:
            raise SystemExit(f"configuration {name!r}: {part!r} is neither a backward "
                             f"solver ({', '.join(BWD_SOLVERS)}), 'maxiter N' nor "
                             f"'rescore all'")
    if executor not in EXECUTORS:
        raise SystemExit(f"configuration {name!r}: executor {executor!r} is not one of "
                         f"{EXECUTORS} (or use one of: {'; '.join(NAMED)})")
    return SolverConfig(**solver), executor, rescore


def _run(data, solver, executor, rescore, args) -> list[dict]:
    model = build_model("deq_resnet_s", num_classes=data.num_classes,
                        input_shape=data.input_shape, solver=solver)
    task = ClassificationTask(model)
    hp = HParams(lr=0.01, local_epochs=args.le, personal_epochs=args.pe)
    cfg = RunConfig(num_rounds=args.rounds, seed=100, clients_per_round=args.cohort,
                    batch_size=10, executor=executor, quiet=True, checkpoint_every=0,
                    rescore_unchanged=rescore)
    with tempfile.TemporaryDirectory() as tmp:
        Engine(data, task, FedEQ(task, hp, FedEQConfig(rho=0.01)), cfg, RunDir(tmp)).run()
        lines = (Path(tmp) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"round"' in line]


def arithmetic_report(rows: list, configs: dict, subset: bool) -> str:
    """Each configuration's representation-step FLOPs per timed round against a dense
    matmul's rate on all cores (module docstring): a floor under its training seconds."""
    rate = all_cores_matmul_flops_per_second()
    lines = [f"arithmetic (training's representation steps only: a lower bound) against a "
             f"dense 2048^2 float32 matmul on all {os.cpu_count()} cores, "
             f"{rate / 1e9:.1f} GFLOP/s, measured now:"]
    for name, history in rows:
        timed = history[1:]
        m = {k: sum(h[k] for h in timed) / len(timed) for k in
             ("solver_iters", "bwd_iters", "bwd_solves", "train_seconds", "eval_seconds")}
        per_example = step_flops(configs[name][0], 10, m["solver_iters"],
                                 m["bwd_iters"]) / 10
        flops, train, ev = per_example * m["bwd_solves"], m["train_seconds"], m[
            "eval_seconds"]
        line = (f"  {name:18s} {m['bwd_solves']:.0f} examples x {per_example / 1e9:.3f} "
                f"GFLOP = {flops / 1e12:.2f} TFLOP per round [fwd iters "
                f"{m['solver_iters']:.1f}, bwd iters {m['bwd_iters']:.1f}]: >= "
                f"{flops / rate:.1f} s at the matmul's rate; took {train:.1f} s "
                f"({100 * flops / train / rate:.0f}% of the matmul's rate)")
        if subset:
            need = flops / max(60.0 - ev, 1e-9)
            line += (f"; training within 60 s - {ev:.1f} s eval needs {need / 1e9:.1f} "
                     f"GFLOP/s = {100 * need / rate:.0f}% of it")
        lines.append(line)
    return "\n".join(lines)


# Flags that must agree for accuracies of two runs to be comparable.
_SAME = ("clients", "cohort", "le", "pe", "rounds")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--cohort", type=float, default=0.1)
    p.add_argument("-le", type=int, default=5)
    p.add_argument("-pe", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="timed rounds after round 0")
    p.add_argument("--configs", default="loop, rescore all;loop;threads;threads, gmres",
                   help="';'-separated: 'emulation (ours)' or 'EXECUTOR[, rescore all]"
                   "[, BWD_SOLVER][, maxiter N]' (EXECUTOR loop or threads)")
    p.add_argument("--with_emulation", action="store_true")
    p.add_argument("--arithmetic", action="store_true",
                   help="count each configuration's training FLOPs per round and compare "
                   "them with a dense matmul's rate on all cores (see the module docstring)")
    p.add_argument("--save", help="write every configuration's per-round metrics (with the "
                   "date and these flags) to this JSON file")
    p.add_argument("--baseline", help="a --save file of an earlier run with the same flags: "
                   "its first configuration's accuracies are compared with this run's (not "
                   "its seconds: those come from another run)")
    args = p.parse_args()
    names = args.configs.split(";") + (["emulation (ours)"] if args.with_emulation else [])
    configs = {name: _config(name) for name in names}  # a misspelt one fails before any run
    data = load_femnist(args.data_dir, num_clients=args.clients)
    print(f"backend {jax.default_backend()}, {os.cpu_count()} cpus; FEMNIST {args.clients} "
          f"writers, {int(args.cohort * args.clients)} per round, -le {args.le} -pe {args.pe}"
          f", rounds 1-{args.rounds} timed", flush=True)
    subset = (args.clients, args.cohort, args.le, args.pe) == (20, 0.1, 5, 3)
    if subset:
        print(f"authors' code (issue 12, same subset, same machine type, not run here): "
              f"round 1 {AUTHORS['train_1']} s train + {AUTHORS['eval_1']} s eval = "
              f"{AUTHORS['round_1']} s, round 2 {AUTHORS['round_2']} s (mean "
              f"{AUTHORS_ROUND:.1f} s), ~{AUTHORS['cores']} cores busy, test acc rounds "
              f"0-2 {AUTHORS['test_acc']}", flush=True)
    rows = []
    for name in names:
        history = _run(data, *configs[name], args)
        rows.append((name, history))
        timed = history[1:]
        for h in timed:
            print(f"{name:18s} round {h['round']}: train {h['train_seconds']:7.2f} s  eval "
                  f"{h['eval_seconds']:6.2f} s ({h['clients_scored']:3d} clients scored)  "
                  f"round {h['seconds']:7.2f} s  cores {h['cpu_seconds'] / h['seconds']:.2f}"
                  + (f"  vs authors {AUTHORS_ROUND / h['seconds']:.2f}x" if subset else ""),
                  flush=True)
        mean = sum(h["seconds"] for h in timed) / len(timed)
        print(f"{name:18s} mean round {mean:.2f} s; cohorts "
              f"{[h['cohort'] for h in history]}; test acc "
              f"{[round(h['test_acc'], 4) for h in history]}", flush=True)
    base_name, base = rows[0]
    compared = rows[1:]
    if args.baseline:
        earlier = json.loads(Path(args.baseline).read_text())
        if {k: earlier["flags"][k] for k in _SAME} != {k: vars(args)[k] for k in _SAME}:
            raise SystemExit(f"--baseline {args.baseline} ran other flags: {earlier['flags']}")
        base_name = f"{earlier['rows'][0][0]}' of {earlier['date']} ('{args.baseline}"
        base, compared = earlier["rows"][0][1], rows
    for name, history in compared:
        gap = max(abs(a["test_acc"] - b["test_acc"]) for a, b in zip(base, history,
                                                                     strict=True))
        same = all(a["cohort"] == b["cohort"] for a, b in zip(base, history, strict=True))
        final = history[-1]["test_acc"] - base[-1]["test_acc"]
        print(f"{name}: same cohorts as '{base_name}': {same}; largest test-acc gap "
              f"{gap:.4f}; final test acc {history[-1]['test_acc']:.4f} against "
              f"{base[-1]['test_acc']:.4f} ({100 * final:+.2f} points)")
    print("summary (mean of the timed rounds):")
    for name, history in rows:
        timed = history[1:]
        sec = sum(h["seconds"] for h in timed) / len(timed)
        tr = sum(h["train_seconds"] for h in timed) / len(timed)
        ev = sum(h["eval_seconds"] for h in timed) / len(timed)
        cores = sum(h["cpu_seconds"] for h in timed) / sum(h["seconds"] for h in timed)
        ratio = f"{AUTHORS_ROUND / sec:.2f}x the authors' code" if subset else ""
        print(f"  {name:18s} train {tr:7.2f} + eval {ev:6.2f} = {sec:7.2f} s/round "
              f"(eval {100 * ev / sec:.0f}%), cores {cores:.2f}, "
              f"{rows[0][1][1]['seconds'] / timed[0]['seconds']:.2f}x "
              f"'{rows[0][0]}' (round 1)  {ratio}")
    if args.arithmetic:
        print(arithmetic_report(rows, configs, subset), flush=True)
    if args.save:
        with atomic_file(Path(args.save)) as f:  # never a half-written file
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "flags": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
