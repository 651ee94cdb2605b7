"""Every bad input is one `error: ...` line, exit status 2, no traceback, no run directory.

One row per input of issue 17's table and the inputs added since. Most rows call main.py's
own parser, `main()` and its error handler in this process (a row takes milliseconds);
a few run `python main.py` to check the real entry point: absl's parser, the traceback
switches (--verbosity=1, FEDEQ_TRACEBACK=1), the default run directory, and a repeat run
in its own process.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags

import main as cli
from trainers.run import DATASET_SHAPES

ROOT = Path(__file__).resolve().parent.parent
FLAGS = flags.FLAGS


@pytest.fixture(autouse=True)
def _fresh_flags():
    FLAGS.unparse_flags()
    yield
    FLAGS.unparse_flags()


def _in_process(argv: list[str], capsys) -> tuple[int, str, str]:
    """main.py's parse + main + error handler, as `python main.py ARGV` runs them."""
    with pytest.raises(SystemExit) as stop:
        with cli.reported_input_errors():
            cli.main(cli.parse_flags(["main.py", *argv]))
    out = capsys.readouterr()
    return stop.value.code, out.out, out.err


def _assert_one_error_line(code: int, out: str, err: str, needles: tuple[str, ...],
                           quiet_stdout: bool = True) -> None:
    assert code == 2, (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in out + err
    if quiet_stdout:
        assert out == "", out


def _leaf_json(rows: list[list[float]]) -> str:
    return json.dumps({"users": ["w0"], "num_samples": [len(rows)],
                       "user_data": {"w0": {"x": rows, "y": [1] * len(rows)}}})


def _femnist(root: Path, text: str) -> Path:
    for split in ("train", "test"):
        (root / "femnist" / split).mkdir(parents=True)
        (root / "femnist" / split / "a.json").write_text(text)
    return root


def _cifar_truncated(root: Path) -> Path:
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    raw = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, protocol=2)
    (folder / "data_batch_1").write_bytes(raw[: len(raw) // 2])
    return root


def _shakespeare_not_h5(root: Path) -> Path:
    (root / "shakespeare").mkdir(parents=True)
    for split in ("train", "test"):
        (root / "shakespeare" / f"shakespeare_{split}.h5").write_text("not an HDF5 file\n")
    return root


def _fmnist(root: Path) -> Path:
    """Four valid tiny FMNIST files (8 images per split)."""
    folder = root / "fmnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        for kind, array in (("images", rng.integers(0, 256, (8, 28, 28))),
                            ("labels", np.arange(8) % 10)):
            array = array.astype(np.uint8)
            raw = (bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
                   + array.tobytes())
            (folder / f"{prefix}-{kind}-idx{array.ndim}-ubyte.gz").write_bytes(
                gzip.compress(raw))
    return root


# (flags, words the error line must contain); DATA / PART stand for this test's folders.
ROWS = [
    # The table.
    (["--trainer", "nosuch"], ("unknown trainer 'nosuch'", "allowed: fedeq_vision")),
    (["-cr", "0"], ("--clients_per_round", "(0, 1]")),
    (["-fu", "1.5"], ("--frac_unseen", "[0, 1)")),
    (["-t", "-3"], ("--num_rounds must be >= 0",)),
    (["-b", "0"], ("--batch_size must be >= 1 or -1",)),
    (["-lr", "-1"], ("--learning_rate must be > 0",)),
    (["-d", "femnist", "--data_dir", "EMPTY"], ("empty/femnist/train", "no such folder",
                                                 "How to get the data")),
    (["-d", "femnist", "--data_dir", "LEAF2"], ("rows of 784 numbers", "row 0 of length 2")),
    (["-d", "femnist", "--data_dir", "LEAFCUT"], ("a.json", "invalid JSON")),
    (["-d", "cifar10", "--data_dir", "CIFARCUT"], ("data_batch_1", "unreadable pickle")),
    (["-d", "shakespeare", "--trainer", "fedavg_seq", "--data_dir", "NOTH5"],
     ("shakespeare_train.h5", "h5py cannot open")),
    (["--dataset", "nosuch"], ("--dataset 'nosuch' is not a dataset",
                               "allowed: synthetic, femnist")),
    (["-m", "resnet34", "--dataset", "femnist"],
     ("--model resnet34 does not fit --dataset femnist", "62 classes",
      "models that fit femnist:", "resnet20")),
    # Since: partition files, sub-models, and the other flags.
    (["--trainer", "heteroavg", "-d", "cifar10", "--partition_file", "DATA/none.npy"],
     ("none.npy", "no such file", "How to get the data")),
    (["--trainer", "heteroavg", "-d", "cifar10", "--partition_file", "PART"],
     ("bad.json", "unreadable file")),
    (["--trainer", "heteroavg", "-d", "cifar10", "--submodels", "resnet10,nosuch,resnet26"],
     ("'nosuch' is not a sub-model", "resnet10,resnet14")),
    (["--trainer", "heteroavg", "-d", "cifar10", "--submodels", "resnet26,resnet10"],
     ("smallest model to the server model",)),
    (["-d", "cifar10", "--partition_file", "DATA/p.json", "--partition", "homo"],
     ("only read with --partition hetero-fixed",)),
    (["-d", "femnist", "--partition", "homo"], ("femnist does not support --partition homo",
                                                "it supports shards")),
    (["-d", "cifar10", "-c", "7"], ("--labels_per_client", "multiple of the number of classes")),
    (["-m", "nosuch"], ("--model 'nosuch' is not a model", "allowed: deq_mlp")),
    (["-m", "deq_resnet_s"], ("does not fit --dataset synthetic", "rank", "fit synthetic: "
                              "deq_mlp")),
    (["-d", "shakespeare", "--trainer", "fedavg"], ("vision trainer", "use fedavg_seq")),
    (["-c", "0"], ("--num_clients must be >= 1",)),
    (["--seed", "-1"], ("--seed must be in [0, 2**32)",)),
    (["-m", "vit_s8", "-d", "cifar10", "--vit_patch_size", "5"], ("multiple of --vit_patch",)),
    (["-m", "vit_s8", "-d", "cifar10", "--vit_weights", "DATA/none.npz"],
     ("--vit_weights", "no such file")),
    (["--vit_weights", "DATA/none.npz"], ("--vit_weights is read only for a ViT",)),
    (["--alpha", "0"], ("--alpha must be a number > 0",)),
    (["--executor", "nosuch"], ("--executor=nosuch", "value should be one of")),
    (["-c", "many"], ("--num_clients=many", "invalid literal")),
    (["--nosuchflag"], ("Unknown command line flag 'nosuchflag'",)),
    (["positional"], ("unexpected arguments: positional",)),
    (["--tiers", "maxiter=0"], ("--tiers: tier 1 maxiter must be at least 1",)),
    (["--tiers", "maxiter=4;speed=2"], ("tier 2 has unknown fields", "allowed: name")),
    (["--tiers", "width=0.5"], ("deq_mlp's block has no width tiers",)),
    (["--tiers", "maxiter=4", "-m", "resnet20", "-d", "femnist"],
     ("--tiers needs a DEQ model",)),
    (["--tiers", "maxiter=4", "--anderson_impl", "jaxopt"], ("batched Anderson",)),
    (["--tiers", "DATA/none.json"], ("--tiers file", "does not exist")),
    (["--eval_maxiter", "30"], ("--eval_maxiter is read only with --tiers",)),
    (["--num_processes", "2"], ("needs --coordinator HOST:PORT",)),
    (["--process_id", "1"], ("without --num_processes",)),
    (["--num_processes", "2", "--coordinator", "127.0.0.1:1", "--process_id", "2"],
     ("--process_id=2", "0 to 1")),
    (["--cpu_devices", "0"], ("--cpu_devices=0", "at least 1")),
    (["--device_executor", "map", "--executor", "loop"],
     ("--device_executor map is read only with --executor sharded",)),
    (["--fwd_maxiter", "0"], ("--fwd_maxiter=0", "not a positive integer")),
    (["--fwd_tol", "-1"], ("--fwd_tol=-1", "not a non-negative number")),
    (["--fwd_maxiter", "6", "-d", "shakespeare", "--trainer", "fedeq_text"],
     ("the DEQ-Transformer runs its own Broyden",)),
]


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("inputs")
    (base / "bad.json").write_text('{"clients": {"0": [1, 2')
    return {"EMPTY": str(base / "empty"),
            "LEAF2": str(_femnist(base / "leaf2", _leaf_json([[0.1, 0.2]]))),
            "LEAFCUT": str(_femnist(base / "leafcut", _leaf_json([[0.5] * 784])[:-40])),
            "CIFARCUT": str(_cifar_truncated(base / "cifarcut")),
            "NOTH5": str(_shakespeare_not_h5(base / "noth5")),
            "PART": str(base / "bad.json"), "DATA": str(base)}


@pytest.mark.parametrize("argv,needles", ROWS, ids=[" ".join(r[0]) for r in ROWS])
def test_bad_input_is_one_error_line_and_no_run_directory(argv, needles, data_dirs, tmp_path,
                                                         capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default run directory (logs/...) would appear here
    args = [a if a not in data_dirs else data_dirs[a] for a in argv]
    args = [a.replace("DATA/", data_dirs["DATA"] + "/") for a in args]
    out = tmp_path / "run"
    code, stdout, stderr = _in_process([*args, "-o", str(out), "-q"], capsys)
    _assert_one_error_line(code, stdout, stderr, needles)
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_dataset_shapes_match_the_loaders():
    from data.registry import DATASETS, load_dataset

    assert set(DATASET_SHAPES) == set(DATASETS)
    data = load_dataset("synthetic", None, 4, 0.0, 0)
    assert DATASET_SHAPES["synthetic"] == (data.num_classes, data.input_shape)


def test_an_empty_cohort_is_refused_once_the_clients_are_known(tmp_path, capsys):
    code, out, err = _in_process(["-c", "8", "-cr", "0.1", "-o", str(tmp_path / "r"), "-q"],
                                 capsys)
    _assert_one_error_line(code, out, err, ("samples no client out of the 8 seen",),
                           quiet_stdout=False)
    assert not (tmp_path / "r").exists()


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"",
                                         p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("kind", ["corrupt", "other settings"])
def test_a_refused_resume_leaves_the_run_directory_exactly_as_it_was(kind, tmp_path, capsys):
    from utils import checkpoint

    out = tmp_path / "run"
    out.mkdir()
    if kind == "corrupt":
        (out / checkpoint.FILENAME).write_bytes(b"PK\x03\x04 not a zip")
    else:
        state = checkpoint.RunState(1, {"w": np.zeros(1)}, {"w": np.zeros((8, 1))},
                                    np.random.RandomState(0).get_state(),
                                    np.zeros(2, np.uint32), [])
        checkpoint.save(out, state, {"learning_rate": 0.5})
    (out / "flags.json").write_text('{"learning_rate": 0.5}')
    (out / "metrics.jsonl").write_text('{"round": 0}\n')
    (out / ".output.txt.123.tmp").write_text("left by a killed run")
    before = _snapshot(out)
    code, stdout, err = _in_process(["-c", "8", "-cr", "0.5", "-t", "1", "-o", str(out), "-q"],
                                   capsys)
    needle = "unreadable or corrupt" if kind == "corrupt" else "written with other settings"
    _assert_one_error_line(code, stdout, err, (needle, "--outdir"), quiet_stdout=False)
    assert _snapshot(out) == before


def test_a_data_error_found_after_the_run_directory_was_made_removes_it(tmp_path, capsys):
    """--vit_weights is only read once the model is initialised, inside the engine."""
    bad = tmp_path / "weights.npz"
    bad.write_bytes(b"not an npz")
    data = _fmnist(tmp_path / "data")
    out = tmp_path / "logs" / "run"
    code, stdout, err = _in_process(
        ["--trainer", "fedavg", "-d", "fmnist", "--partition", "homo", "-c", "2", "-cr", "1",
         "-t", "0",
         "--data_dir", str(data), "-m", "vit_s8", "--vit_weights", str(bad), "-o", str(out),
         "-q"], capsys)
    _assert_one_error_line(code, stdout, err, ("weights.npz", "unreadable file"),
                           quiet_stdout=False)
    assert not (tmp_path / "logs").exists()  # the run folder and the parent it made


# ------------------------------------------------------------------- the real entry point

def _main(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
                          capture_output=True, text=True, timeout=300)


def test_python_main_prints_one_line_and_writes_nothing(tmp_path):
    proc = _main(["-d", "femnist", "--data_dir", str(tmp_path / "EMPTY")], tmp_path)
    _assert_one_error_line(proc.returncode, proc.stdout, proc.stderr,
                           ("femnist/train", "How to get the data"))
    assert list(tmp_path.iterdir()) == []  # no logs/<run> under the working directory
    proc = _main(["--executor", "nosuch"], tmp_path)
    _assert_one_error_line(proc.returncode, proc.stdout, proc.stderr, ("--executor=nosuch",))


@pytest.mark.parametrize("how", [["--verbosity=1"], ["FEDEQ_TRACEBACK=1"]])
def test_a_traceback_only_when_asked_for(how, tmp_path):
    env = dict(h.split("=") for h in how if not h.startswith("-"))
    proc = _main(["--dataset", "nosuch", *[h for h in how if h.startswith("-")]], tmp_path,
                 **env)
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr
    assert "InputError" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("error: --dataset 'nosuch'")


def test_a_repeat_in_its_own_process_reports_its_error_once(tmp_path):
    proc = _main(["-d", "femnist", "--data_dir", str(tmp_path / "EMPTY"), "-r", "2",
                  "--repeat_mode", "subprocess", "-o", str(tmp_path / "runs")], tmp_path)
    _assert_one_error_line(proc.returncode, proc.stdout, proc.stderr, ("femnist/train",))
    assert list(tmp_path.iterdir()) == []
