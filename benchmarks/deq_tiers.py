"""FeDEQ compute tiers against homogeneous FeDEQ: per-tier accuracy, MACs and seconds.

    python -m benchmarks.deq_tiers --dataset femnist --data_dir data --out runs/deq_tiers
    python -m benchmarks.deq_tiers --report runs/deq_tiers   # table and plot only

Runs main.py once per configuration (same seed and data): three iteration-cap tiers
(4 / 10 / 20), homogeneous FeDEQ at the full cap (20) and at the smallest (4), three
width tiers (1/4, 1/2, 1 of the block's hidden channels), and the cap tiers with the
Jacobian-free gradient; every client is also scored at --eval_maxiter (test-time
compute). Then prints one markdown row per (run, tier) and plots test accuracy against
training MACs per example. The settings are reduced for a CPU (one representation and
one head epoch, 5 rounds); pass --rounds or any main.py flag to change them.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from trainers.engine import deq_tier_summary

CAPS = "name=cap4,maxiter=4;name=cap10,maxiter=10;name=cap20,maxiter=20"
CONFIGS = {
    "caps": ["--tiers", CAPS],
    "cap20": ["--tiers", "name=cap20,maxiter=20"],
    "cap4": ["--tiers", "name=cap4,maxiter=4"],
    "widths": ["--tiers", "name=w25,width=0.25;name=w50,width=0.5;name=w100,width=1"],
    "caps_jf": ["--tiers", CAPS, "--bwd_solver", "jacobian_free"],
}
DATASET_FLAGS = {
    "femnist": ["--dataset", "femnist", "--num_clients", "100", "--clients_per_round", "0.05"],
    "cifar10": ["--dataset", "cifar10", "--num_clients", "20", "--clients_per_round", "0.1"],
}


def run_all(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [*DATASET_FLAGS[args.dataset], "--data_dir", args.data_dir, "--seed", "100",
              "-q", "--eval_train_every", "0", "-le", "1", "-pe", "1",
              "--num_rounds", str(args.rounds), "--eval_maxiter", str(args.eval_maxiter),
              *args.extra]
    for name in args.configs.split(","):
        command = [sys.executable, "main.py", *common, *CONFIGS[name],
                   "--outdir", str(out / f"{args.dataset}_{name}")]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)


def rows(run_dir: Path) -> list[dict]:
    summary = json.loads((run_dir / "summary.json").read_text())
    tiers = json.loads((run_dir / "tiers.json").read_text())
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = {**summary, **deq_tier_summary(history)}   # from the rounds' records
    steady = [h["seconds"] for h in history[1:]] or [history[0]["seconds"]]
    at = next((k for k in summary if k.startswith("final_test_at")), None)
    counts = {}
    for t in tiers["tier_of"]:
        counts[t] = counts.get(t, 0) + 1
    # FeDEQ's heads are personal: a client never sampled is scored with its initial head
    trained = {}
    for c in {c for h in history for c in h["cohort"]}:
        trained[tiers["tier_of"][c]] = trained.get(tiers["tier_of"][c], 0) + 1
    out = []
    for k, tier in enumerate(tiers["tiers"]):
        name = tier["name"]
        out.append({
            "run": run_dir.name, "tier": name, "clients": counts.get(k, 0),
            "trained": trained.get(k, 0),
            "cap": tier["maxiter"], "width": tier["width"],
            "test_acc": summary["final_test_acc_tiers"].get(name, float("nan")),
            "test_acc_at": summary[at].get(name, float("nan")) if at else float("nan"),
            "at": at[len("final_test_at"):-len("_acc_tiers")] if at else "",
            "iters": summary.get("mean_solver_iters_tiers", {}).get(name, float("nan")),
            "rel_residual": summary.get("mean_solver_rel_residual_tiers", {}).get(
                name, float("nan")),
            "fwd_macs": summary.get("mean_macs_per_example_tiers", {}).get(name, float("nan")),
            "train_macs": summary.get("mean_train_macs_per_example_tiers", {}).get(
                name, float("nan")),
            "up_mb": summary.get("up_bytes_per_client_tiers", {}).get(
                name, summary["up_bytes_per_client"]) / 1e6,
            "round_s": sum(steady) / len(steady),
            "run_test_acc": summary["final_test_acc"],
        })
    return out


def report(folder: Path, plot: Path | None) -> str:
    runs = [d for d in sorted(folder.iterdir()) if (d / "tiers.json").exists()]
    unfinished = [d.name for d in runs if not (d / "summary.json").exists()]
    table = [r for d in runs if d.name not in unfinished for r in rows(d)]
    lines = ["| run | tier | clients (trained) | cap | width | test acc | at eval cap | "
             "fwd iters | rel. residual | fwd MACs/ex | train MACs/ex | up MB | "
             "s/round (run) |", "|" + "---|" * 13]
    for r in table:
        lines.append(
            f"| {r['run']} | {r['tier']} | {r['clients']} ({r['trained']}) | {r['cap']} | "
            f"{r['width']:g} | "
            f"{r['test_acc']:.4f} | {r['test_acc_at']:.4f} (cap {r['at']}) | "
            f"{r['iters']:.1f} | {r['rel_residual']:.3g} | {r['fwd_macs'] / 1e6:.0f}M | "
            f"{r['train_macs'] / 1e6:.0f}M | {r['up_mb']:.2f} | {r['round_s']:.1f} |")
    if plot is not None and table:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for run in sorted({r["run"] for r in table}):
            part = [r for r in table if r["run"] == run]
            ax.plot([r["train_macs"] / 1e9 for r in part], [r["test_acc"] for r in part],
                    "o-", label=run)
            for r in part:
                ax.annotate(r["tier"], (r["train_macs"] / 1e9, r["test_acc"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("training GMACs per example (per tier, iterations used)")
        ax.set_ylabel("test accuracy of the tier's clients")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
    if unfinished:
        lines.append(f"\nnot finished (no summary.json), left out: {', '.join(unfinished)}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="femnist", choices=sorted(DATASET_FLAGS))
    p.add_argument("--data_dir", default="data")
    p.add_argument("--out", default="runs/deq_tiers")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--eval_maxiter", type=int, default=40)
    p.add_argument("--extra", nargs="*", default=[],
                   help="more main.py flags (flags this script does not know also pass)")
    p.add_argument("--report", default=None, help="only tabulate the runs in this folder")
    p.add_argument("--plot", default=None, help="write the accuracy-vs-MACs plot here")
    args, passthrough = p.parse_known_args()
    args.extra = [*args.extra, *passthrough]
    folder = Path(args.report or args.out)
    if args.report is None:
        run_all(args)
    print(report(folder, Path(args.plot) if args.plot else None))


if __name__ == "__main__":
    main()
