"""Every runner script starts and completes a round on tiny data the test writes."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
FEMNIST_RUNNERS = sorted((ROOT / "runners" / "femnist").glob("run_*.sh"))


def _tiny_femnist(root: Path, writers: int = 4, train: int = 12, test: int = 4) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        users = {f"f{i:04d}": {"x": rng.integers(0, 256, (n, 784)).__truediv__(255).tolist(),
                               "y": rng.integers(0, 62, n).tolist()} for i in range(writers)}
        blob = {"users": list(users), "num_samples": [n] * writers, "user_data": users}
        (root / "femnist" / split).mkdir(parents=True, exist_ok=True)
        (root / "femnist" / split / f"{split}.json").write_text(json.dumps(blob))


@pytest.mark.parametrize("script", FEMNIST_RUNNERS, ids=lambda p: p.name)
def test_femnist_runner_completes_a_round(tmp_path, script):
    _tiny_femnist(tmp_path / "data")
    out = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        ["bash", str(script), "--data_dir", str(tmp_path / "data"), "-c", "4", "-t", "0",
         "-le", "1", "-pe", "1", "-cr", "0.5", "-q", "-o", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len((out / "output.txt").read_text().splitlines()) == 1
    flags = json.loads((out / "flags.json").read_text())
    assert flags["dataset"] == "femnist" and flags["num_rounds"] == 0  # extra flags win
    assert flags["seed"] == 100 and flags["batch_size"] == 10
