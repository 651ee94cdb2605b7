"""Plots and the paper-style table from finished (or running) run directories.

    python -m utils.report RUN_DIR [RUN_DIR ...] [--out report/] [--title ...]

A run directory is what main.py writes (`flags.json`, `metrics.jsonl`, ...); one made
with `-r N` holds `run0/ ... run{N-1}/`, whose final accuracies become the table's mean
and standard deviation. Two PNGs are drawn: test accuracy against rounds, and against
the megabytes a client sends and receives (cumulated, averaged over the round's
cohort), which is the axis the paper's communication claim is about. The table
(`table.md`) has one row per algorithm and one column per dataset.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainers.names import algorithm_of
from utils.rundir import atomic_file, atomic_write


@dataclass
class Run:
    """One training run as read back from disk (a repeat of a multi-seed run, or a run)."""

    path: Path
    flags: dict
    rounds: list[dict] = field(default_factory=list)
    unseen: dict | None = None

    @property
    def label(self) -> str:
        return f"{self.flags.get('trainer')} ({self.flags.get('model')})"

    @property
    def evaluated(self) -> list[int]:
        """Positions in `rounds` of the rounds that were evaluated (`--eval_every`)."""
        return [i for i, r in enumerate(self.rounds) if "test_acc" in r]

    @property
    def final_test_acc(self) -> float:
        return self.rounds[self.evaluated[-1]]["test_acc"] if self.evaluated else float("nan")

    def cohort(self) -> int:
        cohort = int(self.flags.get("clients_per_round", 1) * self.flags.get("num_clients", 1))
        return max(cohort, 1)

    def mb_per_client(self) -> np.ndarray:
        """Cumulative MB sent + received per sampled client after each round."""
        per_round = [((r.get("up_bytes") or 0) + (r.get("down_bytes") or 0)) / self.cohort()
                     for r in self.rounds]
        return np.cumsum(per_round) / 1e6

    def upload_mb_per_round(self) -> float:
        """Mean over rounds, as the run's summary: Finetune sends only before its switch."""
        if not self.rounds:
            return float("nan")
        sent = [r.get("up_bytes") or 0 for r in self.rounds]
        return float(np.mean(sent)) / self.cohort() / 1e6


def read_run(path: Path) -> Run:
    flags_file = path / "flags.json"
    if not flags_file.is_file():
        raise FileNotFoundError(f"{path} is not a run directory (no flags.json); pass the "
                                f"folder main.py wrote with -o")
    run = Run(path, json.loads(flags_file.read_text()))
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            record = {k: (float("nan") if v is None else v) for k, v in record.items()}
            if record.get("unseen"):
                run.unseen = record
            else:
                run.rounds.append(record)
    return run


def read_runs(path: Path) -> list[Run]:
    """The repeats of a run directory: `run{k}/` sub-folders if any, else the folder."""
    repeats = sorted((p for p in path.glob("run*") if (p / "flags.json").is_file()),
                     key=lambda p: int(p.name[3:]) if p.name[3:].isdigit() else 0)
    return [read_run(p) for p in repeats] if repeats else [read_run(path)]


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, np.float64)
    return float(arr.mean()), float(arr.std())


def table(groups: list[list[Run]]) -> str:
    """Markdown: rows algorithms, columns datasets; mean +- std (%) of the final test
    accuracy over repeats, with the model, the repeats and MB each client sends per round."""
    cells: dict[str, dict[str, str]] = defaultdict(dict)
    datasets: list[str] = []
    for runs in groups:
        first = runs[0]
        # One row per algorithm whatever the task family (fedavg_resnet, fedavg_seq: fedavg).
        dataset = first.flags.get("dataset", "?")
        algo = algorithm_of(first.flags.get("trainer", "?"))
        if dataset in cells.get(algo, {}):   # a second setting of the same algorithm
            algo = f"{algo} [{first.path.name}]"
        if dataset not in datasets:
            datasets.append(dataset)
        mean, std = _mean_std([r.final_test_acc for r in runs])
        rounds = len(first.rounds)
        cells[algo][dataset] = (f"{100 * mean:.2f} ± {100 * std:.2f} "
                                f"({first.flags.get('model')}, {len(runs)} run(s), "
                                f"{rounds} rounds, {first.upload_mb_per_round():.2f} MB up)")
    lines = ["| algorithm | " + " | ".join(datasets) + " |",
             "|---|" + "---|" * len(datasets)]
    for algo in sorted(cells):
        lines.append(f"| {algo} | " + " | ".join(cells[algo].get(d, "") for d in datasets)
                     + " |")
    return "\n".join(lines) + "\n"


def rounds_table(run: Run) -> str:
    """Markdown: one row per logged round (accuracy, seconds, solver statistics, MB)."""
    def cell(record: dict, key: str, fmt: str) -> str:
        value = record.get(key)
        return "—" if value is None or value != value else format(value, fmt)

    def missed(record: dict, kind: str) -> str:
        if f"{kind}_solves" not in record:
            return "—"
        return f"{record[f'{kind}_unconverged']}/{record[f'{kind}_solves']}"

    lines = ["| round | test acc | train acc | train s | eval s | fwd iters | bwd iters | "
             "bwd residual | fwd / bwd solves missing tol | up MB | down MB |",
             "|---" * 11 + "|"]
    for r in run.rounds:
        lines.append("| " + " | ".join([
            str(r["round"]), cell(r, "test_acc", ".4f"), cell(r, "train_acc", ".4f"),
            cell(r, "train_seconds", ".0f"), cell(r, "eval_seconds", ".0f"),
            cell(r, "solver_iters", ".1f"), cell(r, "bwd_iters", ".1f"),
            cell(r, "bwd_residual", ".1e"), f"{missed(r, 'fwd')} · {missed(r, 'bwd')}",
            format((r.get("up_bytes") or 0) / 1e6, ".1f"),
            format((r.get("down_bytes") or 0) / 1e6, ".1f")]) + " |")
    return "\n".join(lines) + "\n"


def plot(groups: list[list[Run]], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, xlabel, x_of in (
            ("accuracy_vs_rounds.png", "round",
             lambda r: np.array([rec["round"] for rec in r.rounds])),
            ("accuracy_vs_megabytes.png", "MB sent + received per client (cumulative)",
             lambda r: r.mb_per_client())):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
        for runs in groups:
            first = runs[0]
            if not first.evaluated:
                continue
            # Repeats share the x axis; draw their mean test accuracy.
            n = min(len(r.evaluated) for r in runs)
            acc = np.mean([[r.rounds[i]["test_acc"] for i in r.evaluated[:n]] for r in runs],
                          axis=0)
            ax.plot(x_of(first)[first.evaluated[:n]], 100 * acc, marker="o" if n < 30 else None,
                    markersize=3,
                    label=f"{first.label} · {first.flags.get('dataset')} · {first.path.name}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / name
        with atomic_file(path, "wb") as f:
            fig.savefig(f, format="png")
        plt.close(fig)
        written.append(path)
    return written


# The paper's Table 2 rows, in its order (inco_spec 9.1).
TABLE2_METHODS = ("heteroavg", "heteroprox", "heteroscaffold", "heteronova", "heteromoon",
                  "incoavg", "incoprox", "incoscaffold", "inconova", "incomoon")
TABLE2_NAMES = dict(zip(TABLE2_METHODS, (
    "HeteroAvg", "HeteroProx", "HeteroScaffold", "HeteroNova", "HeteroMOON", "InCoAvg",
    "InCoProx", "InCoScaffold", "InCoNova", "InCoMOON"), strict=True))


def _tiered(groups: list[list[Run]]) -> list[list[Run]]:
    """InCo's runs (MobileNet channel tiers, DAC's, are not Table 2's)."""
    return [runs for runs in groups if runs[0].flags.get("trainer") in TABLE2_METHODS
            and not runs[0].flags.get("budgets") and not runs[0].flags.get("width_multipliers")]


def table2(groups: list[list[Run]]) -> str:
    """Markdown in the layout of InCo's Table 2: one row per method, one column per
    dataset and alpha; mean +- std (%) over repeats of the final mean-over-groups test
    accuracy, with the rounds run."""
    cells: dict[str, dict[str, str]] = defaultdict(dict)
    columns: list[str] = []
    for runs in _tiered(groups):
        flags = runs[0].flags
        column = f"{flags.get('dataset')} {flags.get('alpha')} ({flags.get('model')})"
        if column not in columns:
            columns.append(column)
        mean, std = _mean_std([r.final_test_acc for r in runs])
        cells[flags["trainer"]][column] = (f"{100 * mean:.1f} ± {100 * std:.1f} "
                                           f"({len(runs[0].rounds)} rounds)")
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for method in TABLE2_METHODS:
        if method in cells:
            lines.append(f"| {TABLE2_NAMES[method]} | "
                         + " | ".join(cells[method].get(c, "") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _tier_mean(run: Run, key: str, name: str) -> float:
    values = [r[key][name] for r in run.rounds if name in r.get(key, {})]
    return float(np.mean(values)) if values else float("nan")


def tiers_table(groups: list[list[Run]]) -> str:
    """Markdown: one row per tier of every run that has tiers (InCo's groups, DAC's
    budgets, width multipliers): final test accuracy, mean MB up and down per client of
    the tier per round it was sampled, forward MACs per image where logged."""
    lines = ["| run | tier | final test acc (%) | up MB / client | down MB / client | "
             "MACs / image |", "|---|---|---|---|---|---|"]
    for runs in groups:
        run = runs[0]
        if not run.evaluated or "test_acc_tiers" not in run.rounds[run.evaluated[-1]]:
            continue
        final = run.rounds[run.evaluated[-1]]["test_acc_tiers"]
        for name, acc in final.items():
            macs = _tier_mean(run, "macs_per_image_tiers", name)
            lines.append(f"| {run.path.name} | {name} | {100 * acc:.2f} | "
                         f"{_tier_mean(run, 'up_bytes_tiers', name) / 1e6:.2f} | "
                         f"{_tier_mean(run, 'down_bytes_tiers', name) / 1e6:.2f} | "
                         + ("" if math.isnan(macs) else f"{macs / 1e6:.2f} M") + " |")
    return "\n".join(lines) + "\n"


def plot_tiers(groups: list[list[Run]], out: Path) -> list[Path]:
    """Per-group test accuracy against rounds (one panel per group), InCo's methods dashed
    beside their Hetero counterparts, and the mean over groups in the last panel."""
    tiered = [runs[0] for runs in _tiered(groups) if runs[0].evaluated]
    if not tiered:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(tiered[0].rounds[tiered[0].evaluated[0]]["test_acc_tiers"])
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(3.2 * (len(names) + 1), 3.2),
                             dpi=110, sharey=True)
    for run in tiered:
        rounds = [run.rounds[i] for i in run.evaluated]
        x = [r["round"] for r in rounds]
        style = "--" if run.flags["trainer"].startswith("inco") else "-"
        label = TABLE2_NAMES[run.flags["trainer"]]
        for ax, name in zip(axes, names, strict=False):
            ax.plot(x, [100 * r["test_acc_tiers"].get(name, np.nan) for r in rounds], style,
                    marker="o", markersize=3, label=label)
            ax.set_title(name)
        axes[-1].plot(x, [100 * r["test_acc"] for r in rounds], style, marker="o",
                      markersize=3, label=label)
    axes[-1].set_title("mean over groups")
    for ax in axes:
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    path = out / "accuracy_per_group.png"
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return [path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--out", type=Path, default=Path("report"),
                        help="folder for the PNGs and table.md (default: report/)")
    parser.add_argument("--title", default="test accuracy")
    args = parser.parse_args(argv)
    try:
        groups = [read_runs(p) for p in args.runs]
    except FileNotFoundError as err:
        parser.error(str(err))
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(groups)
    atomic_write(args.out / "table.md", text)
    paths = plot(groups, args.out, args.title)
    if any("test_acc_tiers" in r for runs in groups for r in runs[0].rounds):
        atomic_write(args.out / "tiers.md", tiers_table(groups))
        paths.append(args.out / "tiers.md")
    if _tiered(groups):
        atomic_write(args.out / "table2.md", table2(groups))
        paths += [args.out / "table2.md", *plot_tiers(groups, args.out)]
    for runs in groups:
        for run in runs:
            name = "rounds_" + "_".join(run.path.parts[-2:] if run.path.name.startswith("run")
                                        else run.path.parts[-1:]) + ".md"
            atomic_write(args.out / name, rounds_table(run))
            paths.append(args.out / name)
    print(text)
    for runs in groups:
        accs = ", ".join("nan" if math.isnan(r.final_test_acc) else f"{r.final_test_acc:.4f}"
                         for r in runs)
        print(f"{runs[0].path}: {len(runs[0].rounds)} rounds, final test acc {accs}")
    print("wrote " + ", ".join(str(p) for p in [args.out / "table.md", *paths]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
