"""Checkpoint and resume: a SIGKILLed run continues to the same numbers; bad checkpoints
are refused with a message, never silently restarted."""

import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.resume_check import ROOT, command, environment, kill_after_rounds, logged_rounds
from utils import checkpoint
from utils.rundir import RunDir

RUN = ["-c", "10", "-t", "14", "-le", "2", "-pe", "1", "-cr", "0.5", "-q"]


def _command(out: Path, *extra: str) -> list[str]:
    return [*command(RUN, out), *extra]


def _env() -> dict:
    return environment()


def test_killed_run_resumes_to_the_uninterrupted_numbers(tmp_path):
    whole = tmp_path / "whole"
    done = subprocess.run(_command(whole), cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    resumed = tmp_path / "resumed"
    logged = kill_after_rounds(_command(resumed), resumed, 3, timeout=1200)
    assert 3 <= logged < 15, f"the run was not killed mid-way ({logged} rounds logged)"
    again = subprocess.run(_command(resumed), cwd=ROOT, env=_env(), capture_output=True,
                           text=True)
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stdout
    assert logged_rounds(resumed) == logged_rounds(whole)
    assert (resumed / "output.txt").read_text() == (whole / "output.txt").read_text()
    assert not list(resumed.glob(".checkpoint*")), "a temporary checkpoint was left behind"


def test_corrupt_checkpoint_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / checkpoint.FILENAME).write_bytes(b"PK\x03\x04 not really a zip file")
    proc = subprocess.run(_command(out), cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 2
    assert "corrupt" in proc.stderr and "delete" in proc.stderr


def _tiny_state(next_round=3):
    server = {"theta": {"w": jnp.arange(6.0).reshape(2, 3)}, "round": jnp.asarray(3)}
    clients = {"phi": jnp.ones((4, 2))}
    sampler = np.random.RandomState(7).get_state()
    history = [{"round": 0, "test_acc": 0.5, "train_acc": float("nan")}]
    return checkpoint.RunState(next_round, server, clients, sampler,
                               np.array([1, 2], np.uint32), history)


def test_save_load_round_trip_restores_every_piece(tmp_path):
    state = _tiny_state()
    checkpoint.save(tmp_path, state, {"lr": 0.1})
    got = checkpoint.load(tmp_path, state.server, state.clients, {"lr": 0.1})
    assert got.next_round == 3
    np.testing.assert_array_equal(got.server["theta"]["w"], state.server["theta"]["w"])
    np.testing.assert_array_equal(got.clients["phi"], state.clients["phi"])
    rs = np.random.RandomState()
    rs.set_state(got.sampler)
    assert rs.randint(1 << 30) == np.random.RandomState(7).randint(1 << 30)
    assert got.history[0]["test_acc"] == 0.5 and np.isnan(got.history[0]["train_acc"])


def test_other_settings_version_or_shapes_are_refused(tmp_path, monkeypatch):
    state = _tiny_state()
    checkpoint.save(tmp_path, state, {"lr": 0.1})
    with pytest.raises(checkpoint.CheckpointError, match="lr: checkpoint 0.1, now 0.2"):
        checkpoint.load(tmp_path, state.server, state.clients, {"lr": 0.2})
    with pytest.raises(checkpoint.CheckpointError, match="holds 4 clients, the run has 5"):
        checkpoint.load(tmp_path, state.server, {"phi": jnp.ones((5, 2))}, {"lr": 0.1})
    with pytest.raises(checkpoint.CheckpointError, match=r"float32\[3\]"):
        checkpoint.load(tmp_path, state.server, {"phi": jnp.ones((4, 3))}, {"lr": 0.1})
    version = checkpoint.VERSION
    monkeypatch.setattr(checkpoint, "VERSION", version + 1)
    with pytest.raises(checkpoint.CheckpointError, match=f"version {version}"):
        checkpoint.load(tmp_path, state.server, state.clients, {"lr": 0.1})


def test_a_write_killed_mid_way_leaves_nothing_after_the_next_start(tmp_path):
    """A process that dies inside `atomic_file` (os._exit skips all cleanup, as SIGKILL
    does) leaves its temporary file and the old checkpoint intact; the next RunDir on that
    folder removes the temporary and keeps the checkpoint."""
    (tmp_path / "checkpoint.npz").write_bytes(b"old")
    script = ("import os, sys; from pathlib import Path; from utils.rundir import atomic_file\n"
              "with atomic_file(Path(sys.argv[1]) / 'checkpoint.npz', 'wb') as f:\n"
              "    f.write(b'half'); f.flush(); os._exit(9)\n")
    died = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, env=_env())
    assert died.returncode == 9
    assert len(list(tmp_path.glob(".checkpoint.npz.*.tmp"))) == 1
    assert (tmp_path / "checkpoint.npz").read_bytes() == b"old"

    RunDir(tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))
    assert (tmp_path / "checkpoint.npz").read_bytes() == b"old"


def test_only_changed_clients_are_rewritten_and_replaced_files_go(tmp_path):
    """A round changes its cohort only: the other clients keep their files; a kill before
    the header is replaced leaves the old checkpoint whole."""
    state = _tiny_state()
    checkpoint.save(tmp_path, state, {}, changed=np.array([1]))  # first save: every client
    first = sorted(p.name for p in (tmp_path / checkpoint.CLIENT_DIR).iterdir())
    assert len(first) == 4
    clients = {"phi": state.clients["phi"].at[2].set(5.0)}
    later = checkpoint.RunState(4, state.server, clients, state.sampler, state.key,
                                state.history)
    checkpoint.save(tmp_path, later, {}, changed=np.array([2]))
    files = sorted(p.name for p in (tmp_path / checkpoint.CLIENT_DIR).iterdir())
    assert files == sorted([*(f for f in first if not f.startswith("c00002")),
                            "c00002.r00004.npz"])
    got = checkpoint.load(tmp_path, state.server, state.clients, {})
    np.testing.assert_array_equal(got.clients["phi"], clients["phi"])
    assert got.next_round == 4
    # An orphan of a killed save (written, never listed) is removed by the next save.
    (tmp_path / checkpoint.CLIENT_DIR / "c00001.r00009.npz").write_bytes(b"half")
    checkpoint.save(tmp_path, later, {}, changed=np.array([], int))
    assert "c00001.r00009.npz" not in {p.name for p in
                                       (tmp_path / checkpoint.CLIENT_DIR).iterdir()}
    np.testing.assert_array_equal(
        checkpoint.load(tmp_path, state.server, state.clients, {}).clients["phi"],
        clients["phi"])
