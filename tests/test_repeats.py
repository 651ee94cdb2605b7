"""Repeats (-r N): seeds seed + 1000 k, one run directory each, a summary over them; the
same numbers whether the repeats share a process or each gets its own."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ["-c", "10", "-t", "2", "-le", "1", "-pe", "1", "-cr", "0.5", "-fu", "0.2", "-q",
       "-r", "2"]
TIMING = {"seconds", "train_seconds", "eval_seconds", "cpu_seconds", "peak_rss_mb"}


def _rounds(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if k not in TIMING} for x in lines]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_compile_env):
    out = {}
    for mode in ("in_process", "subprocess"):
        root = tmp_path_factory.mktemp(mode)
        done = subprocess.run([sys.executable, str(ROOT / "main.py"), *RUN, "-o", str(root),
                               f"--repeat_mode={mode}"], cwd=ROOT, env=shared_compile_env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        out[mode] = root
    return out


@pytest.mark.parametrize("mode", ["in_process", "subprocess"])
def test_each_repeat_has_its_seed_directory_and_the_summary(runs, mode):
    root = runs[mode]
    finals, unseen = [], []
    for k in range(2):
        flags = json.loads((root / f"run{k}" / "flags.json").read_text())
        assert flags["seed"] == 1000 * k
        one = json.loads((root / f"run{k}" / "summary.json").read_text())
        finals.append(one["final_test_acc"])
        unseen.append(one["unseen_test_acc"])
        assert (root / f"run{k}" / "unseen.txt").is_file()
    summary = json.loads((root / "summary.json").read_text())
    assert summary["final_test_acc_mean"] == pytest.approx(np.mean(finals))
    assert summary["final_test_acc_std"] == pytest.approx(np.std(finals))
    assert summary["unseen_test_acc_mean"] == pytest.approx(np.mean(unseen))
    assert summary["unseen_test_acc_std"] == pytest.approx(np.std(unseen))
    assert len((root / "final_result.txt").read_text().strip().splitlines()) >= 2
    assert _rounds(root / "run0") != _rounds(root / "run1"), "the seeds did not differ"


def test_separate_processes_give_the_same_numbers(runs):
    for k in range(2):
        assert (_rounds(runs["subprocess"] / f"run{k}")
                == _rounds(runs["in_process"] / f"run{k}"))
