"""main.py end to end as a user runs it: files written, bad flags refused early."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["-c", "8", "-t", "1", "-le", "1", "-pe", "1", "-cr", "0.5", "-q"]


def _main(*args, cwd=ROOT):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_two_round_run_writes_every_file(tmp_path):
    out = tmp_path / "run"
    proc = _main(*SMALL, "-fu", "0.25", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    for name in ("flags.json", "args.txt", "command.txt", "metrics.jsonl", "output.txt",
                 "losses.txt", "unseen.txt", "final_result.txt", "summary.json"):
        assert (out / name).is_file(), name
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [x for x in lines if "round" in x]
    assert [x["round"] for x in rounds] == [0, 1]
    for key in ("train_acc", "test_acc", "train_loss", "test_loss", "up_bytes", "down_bytes",
                "seconds", "solver_iters", "solver_residual"):
        assert key in rounds[0], key
    assert rounds[0]["up_bytes"] > 0 and rounds[0]["down_bytes"] > 0
    assert len((out / "output.txt").read_text().splitlines()) == 2
    assert "final test metric" in proc.stdout and "params" in proc.stdout
    assert json.loads((out / "flags.json").read_text())["num_clients"] == 8


def test_same_command_same_numbers(tmp_path):
    outs = []
    for name in ("a", "b"):
        proc = _main(*SMALL, "-o", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr
        outs.append((tmp_path / name / "output.txt").read_text())
    assert outs[0] == outs[1]


def test_forward_cap_flag_reaches_the_solver(tmp_path):
    """--fwd_maxiter 2: every forward solve (training and scoring) stops by 2 iterations;
    the default cap (20) takes more on this data."""
    iters = {}
    for cap in (None, 2):
        out = tmp_path / str(cap)
        flags = ["--fwd_maxiter", str(cap)] if cap else []
        proc = _main("-c", "4", "-t", "0", "-le", "1", "-pe", "1", "-cr", "0.5", "-q",
                     *flags, "-o", str(out))
        assert proc.returncode == 0, proc.stderr
        row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        iters[cap] = (row["solver_iters"], row["test_solver_iters"])
    assert max(iters[2]) <= 2 < min(iters[None]), iters


@pytest.mark.parametrize("args,needle", [
    (["--trainer", "nope"], "allowed"),
    (["-m", "nope"], "allowed"),
    (["-m", "deq_resnet_s"], "rank"),
    (["-cr", "0"], "(0, 1]"),
    (["-cr", "1.5"], "(0, 1]"),
    (["--eval_train_every", "-1"], "0: never"),
    (["-fu", "1.0"], "[0, 1)"),
    (["-d", "femnist", "--data_dir", "/nonexistent"], "/nonexistent"),
])
def test_bad_flags_fail_before_work_with_a_message(args, needle):
    proc = _main(*SMALL, *args, "-o", "/tmp/should_not_matter")
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr
