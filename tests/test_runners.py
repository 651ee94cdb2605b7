"""Every runner script starts and completes a round on tiny data the test writes.

Every script's command line is checked against spec 4.2 with a stand-in python3 (fast, all
32 scripts). Real runs: in the default (CI) run each of the eight vision algorithms runs
one of its scripts (rotating over the three datasets) with all of its flags but the small
DEQ-MLP (`-m deq_mlp` appended, absl takes the last value), which checks that the script
reaches main.py with its trainer, dataset and hyper-parameters; the FEMNIST FeDEQ script
also runs with its own model. `-m slow` runs every script, with DEQ-MLP and with the model
it names (ResNet34 and DEQ-ResNet-M on CIFAR take about a minute each here).
"""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import TINY_SHAKESPEARE_FLAGS, write_tiny_shakespeare
from tests.test_cifar_data import write_cifar10, write_cifar100

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ("femnist", "cifar10", "cifar100")
RUNNERS = [p for d in DATASETS for p in sorted((ROOT / "runners" / d).glob("run_*.sh"))]
# Per dataset: flags that make a round tiny, and the script's batch size.
TINY = {"femnist": (["-c", "4", "-cr", "0.5"], 10),
        "cifar10": (["-c", "4", "-cr", "0.5"], 20),
        "cifar100": (["-c", "20", "-cr", "0.1"], 20)}


def _tiny_femnist(root: Path, writers: int = 4, train: int = 12, test: int = 4) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        users = {f"f{i:04d}": {"x": rng.integers(0, 256, (n, 784)).__truediv__(255).tolist(),
                               "y": rng.integers(0, 62, n).tolist()} for i in range(writers)}
        blob = {"users": list(users), "num_samples": [n] * writers, "user_data": users}
        (root / "femnist" / split).mkdir(parents=True, exist_ok=True)
        (root / "femnist" / split / f"{split}.json").write_text(json.dumps(blob))


def _tiny_data(root: Path, dataset: str) -> None:
    if dataset == "femnist":
        _tiny_femnist(root)
    elif dataset == "cifar10":
        write_cifar10(root / "cifar10" / "cifar-10-batches-py", train_per_class=8,
                      test_per_class=4)
    else:
        write_cifar100(root / "cifar100" / "cifar-100-python", train_per_class=2,
                       test_per_class=1)


def _run_script(tmp_path: Path, script: Path, *extra: str) -> dict:
    dataset = script.parent.name
    _tiny_data(tmp_path / "data", dataset)
    out = tmp_path / "run"
    tiny, batch = TINY[dataset]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        ["bash", str(script), "--data_dir", str(tmp_path / "data"), *tiny, "-t", "0",
         "-le", "1", "-pe", "1", "-q", "-o", str(out), *extra],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len((out / "output.txt").read_text().splitlines()) == 1
    assert (out / "final_result.txt").is_file()
    flags = json.loads((out / "flags.json").read_text())
    assert flags["dataset"] == dataset and flags["num_rounds"] == 0  # extra flags win
    assert flags["seed"] == 100 and flags["batch_size"] == batch
    assert flags["trainer"].startswith(script.stem.removeprefix("run_"))
    if dataset.startswith("cifar"):
        assert (out / "partition.npz").is_file()
    return flags


# One script per algorithm runs in CI, the datasets taking turns; the rest run with -m slow.
_CI_VISION = {"femnist/run_fedavg.sh", "cifar10/run_finetune.sh", "cifar100/run_local.sh",
              "femnist/run_ditto.sh", "cifar10/run_fedrep.sh", "cifar100/run_fedper.sh",
              "femnist/run_knnper.sh", "cifar10/run_fedeq.sh"}
# NIID-Bench's baselines (FedProx, SCAFFOLD, FedNova, MOON) run for real only with -m slow:
# their command lines are checked below with every other script's, and the algorithms on
# the engine in tests/test_client_algorithms.py.
_NIID_BASELINES = {"fedprox", "scaffold", "fednova", "moon"}


def _name(script: Path) -> str:
    return f"{script.parent.name}/{script.name}"


@pytest.mark.parametrize("script", [
    pytest.param(p, marks=() if _name(p) in _CI_VISION else pytest.mark.slow)
    for p in RUNNERS], ids=_name)
def test_runner_completes_a_round(tmp_path, script):
    _run_script(tmp_path, script, "-m", "deq_mlp")


def test_every_vision_algorithm_has_a_script_in_the_default_run():
    algos = {Path(n).stem.removeprefix("run_") for n in _CI_VISION}
    assert algos | _NIID_BASELINES == {p.stem.removeprefix("run_") for p in RUNNERS}
    assert _CI_VISION <= {_name(p) for p in RUNNERS}


@pytest.mark.parametrize("script", [
    ROOT / "runners/femnist/run_fedeq.sh",
    pytest.param(ROOT / "runners/femnist/run_fedavg.sh", marks=pytest.mark.slow)],
    ids=lambda p: p.name)
def test_femnist_runner_with_its_own_model(tmp_path, script):
    flags = _run_script(tmp_path, script)
    assert flags["model"] == ("deq_resnet_s" if "fedeq" in script.name else "resnet20")


@pytest.mark.slow
@pytest.mark.parametrize("script", RUNNERS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_runner_with_its_own_model(tmp_path, script):
    flags = _run_script(tmp_path, script)
    assert flags["model"] in ("resnet20", "deq_resnet_s", "resnet34", "deq_resnet_m")


SHAKESPEARE_RUNNERS = sorted((ROOT / "runners" / "shakespeare").glob("run_*.sh"))


def _run_shakespeare_script(tmp_path: Path, script: Path, env: dict, *extra: str) -> dict:
    write_tiny_shakespeare(tmp_path / "data")
    out = tmp_path / "run"
    proc = subprocess.run(
        ["bash", str(script), "--data_dir", str(tmp_path / "data"), *TINY_SHAKESPEARE_FLAGS,
         "-t", "0", "-o", str(out), *extra],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len((out / "output.txt").read_text().splitlines()) == 1
    assert (out / "final_result.txt").is_file()
    flags = json.loads((out / "flags.json").read_text())
    algo = script.stem.removeprefix("run_")
    assert flags["trainer"] == f"{algo}_seq" and flags["dataset"] == "shakespeare"
    assert flags["num_rounds"] == 0 and flags["batch_size"] == 4  # extra flags win
    assert (flags["seed"], flags["learning_rate"], flags["inner_mode"]) == (100, 0.1, "epoch")
    if algo == "ditto":
        assert flags["lambda"] == 0.1
    if algo == "fedeq":
        assert (flags["rho"], flags["lam_admm"]) == (0.01, 0.001)
    return flags


# Spec 4.2: what every dataset's main.sh sets ("common to the four datasets").
REFERENCE_COMMON = {"--inner_mode": "epoch", "--eval_every": "1", "--inner_epochs": "5",
                    "--personalized_epochs": "3", "--seed": "100",
                    "--clients_per_round": "0.1"}
# What every Shakespeare script sets, and what each adds.
SHAKESPEARE_FLAGS = {**REFERENCE_COMMON, "--dataset": "shakespeare", "--num_clients": "200",
                     "--num_rounds": "400", "--batch_size": "16", "--learning_rate": "0.1"}
SHAKESPEARE_SCRIPT_FLAGS = {
    "fedavg": {}, "finetune": {}, "local": {}, "fedrep": {}, "fedper": {},
    "ditto": {"--lambda": "0.1"},
    "knnper": {"--knn_neighbors": "10", "--knn_lam": "0.5"},
    "fedeq": {"--model": "deq_transformer", "--rho": "0.01", "--lam_admm": "0.001"},
    "fedprox": {"--prox_mu": "0.1"}, "scaffold": {}, "fednova": {},
    "moon": {"--moon_mu": "0.001", "--moon_temperature": "0.5"},
}


def _script_argv(tmp_path: Path, script: Path, *extra: str) -> list[str]:
    """The arguments a runner script hands to python3, caught by a stand-in python3."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python3").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGV_FILE"\n')
    (bin_dir / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "ARGV_FILE": str(tmp_path / "argv")}
    subprocess.run(["bash", str(script), *extra], env=env, check=True, timeout=60)
    return (tmp_path / "argv").read_text().splitlines()


def _flags_reaching_main(tmp_path: Path, script: Path) -> dict[str, str]:
    """The flags a script hands to main.py (the last value of a repeated flag, as absl
    takes it), after checking that extra arguments arrive whole at the end (the
    reference glued them onto a value, spec 8.1.3)."""
    argv = _script_argv(tmp_path, script, "-r", "1")
    assert Path(argv[0]).resolve() == (ROOT / "main.py").resolve()
    assert argv[-2:] == ["-r", "1"]
    pairs = argv[1:-2]
    return dict(zip(pairs[::2], pairs[1::2], strict=True))


def test_shakespeare_scripts_pass_the_reference_hyper_parameters(tmp_path):
    assert sorted(p.stem.removeprefix("run_") for p in SHAKESPEARE_RUNNERS) == sorted(
        SHAKESPEARE_SCRIPT_FLAGS)
    for script in SHAKESPEARE_RUNNERS:
        algo = script.stem.removeprefix("run_")
        expected = {**SHAKESPEARE_FLAGS, "--trainer": f"{algo}_seq",
                    "--model": "transformer8", **SHAKESPEARE_SCRIPT_FLAGS[algo]}
        assert _flags_reaching_main(tmp_path / algo, script) == expected, algo


# Spec 4.2 for the vision scripts: what each dataset's main.sh sets, and what each script adds.
_COMMON = {**REFERENCE_COMMON, "--num_clients": "100", "--num_rounds": "150"}
VISION_FLAGS = {
    "femnist": {**_COMMON, "--dataset": "femnist", "--batch_size": "10",
                "--learning_rate": "0.01"},
    "cifar10": {**_COMMON, "--dataset": "cifar10", "--batch_size": "20",
                "--learning_rate": "0.01", "--labels_per_client": "5"},
    "cifar100": {**_COMMON, "--dataset": "cifar100", "--batch_size": "20",
                 "--learning_rate": "0.05", "--labels_per_client": "5"},
}
VISION_MODELS = {"femnist": ("resnet20", "deq_resnet_s"),
                 "cifar10": ("resnet34", "deq_resnet_m"),
                 "cifar100": ("resnet34", "deq_resnet_m")}
VISION_SCRIPT_FLAGS = {
    "fedavg": {}, "finetune": {}, "local": {}, "fedrep": {}, "fedper": {},
    "ditto": {"--lambda": "0.3"},
    "knnper": {"--knn_neighbors": "10", "--knn_lam": "0.5"},
    "fedeq": {"--rho": "0.01", "--lam_admm": "0.01"},
    "fedprox": {"--prox_mu": "0.1"}, "scaffold": {}, "fednova": {},
    "moon": {"--moon_mu": "0.001", "--moon_temperature": "0.5"},
}


def test_vision_scripts_pass_the_reference_hyper_parameters(tmp_path):
    for dataset in DATASETS:
        scripts = [p for p in RUNNERS if p.parent.name == dataset]
        assert sorted(p.stem.removeprefix("run_") for p in scripts) == sorted(
            VISION_SCRIPT_FLAGS)
        explicit, deq = VISION_MODELS[dataset]
        for script in scripts:
            algo = script.stem.removeprefix("run_")
            expected = {**VISION_FLAGS[dataset], "--trainer": f"{algo}_resnet",
                        "--model": deq if algo == "fedeq" else explicit,
                        **VISION_SCRIPT_FLAGS[algo]}
            if (dataset, algo) == ("cifar100", "fedeq"):
                expected["--learning_rate"] = "0.01"  # the script overrides the dataset's 0.05
            got = _flags_reaching_main(tmp_path / dataset / algo, script)
            assert got == expected, (dataset, algo)


# The default set runs kNN-Per's script, the one with text-only scoring code (FedAvg-seq and
# FeDEQ-text run through main.py in tests/test_text_task.py); every script runs with
# -m slow (15-40 s each here).
_CI_SHAKESPEARE = ("run_knnper.sh",)


@pytest.mark.parametrize("script", [
    pytest.param(p, marks=() if p.name in _CI_SHAKESPEARE else pytest.mark.slow)
    for p in SHAKESPEARE_RUNNERS], ids=lambda p: f"shakespeare/{p.name}")
def test_shakespeare_runner_completes_a_round(tmp_path, script, shared_compile_env):
    """Every script with Transformer-8 (the FeDEQ script names the DEQ-Transformer, which
    tests/test_text_task.py runs through main.py with these flags); the runs share
    compiled programs through the session's compilation cache."""
    flags = _run_shakespeare_script(tmp_path, script, shared_compile_env, "-m", "transformer8")
    assert flags["model"] == "transformer8"


@pytest.mark.slow
def test_shakespeare_fedeq_runner_with_its_own_model(tmp_path, shared_compile_env):
    flags = _run_shakespeare_script(tmp_path, ROOT / "runners/shakespeare/run_fedeq.sh",
                                    shared_compile_env)
    assert flags["model"] == "deq_transformer"


# InCo's runners: every script hands main.py the paper's settings (stand-in python3, all
# ten); with -m slow each really runs a round with two sub-models on tiny CIFAR-10 (about
# 40 s each: a full-width ResNet26 compiles; tests/test_submodel_federation.py runs the
# same engine path on tiny widths in the default set).
INCO_RUNNERS = sorted((ROOT / "runners" / "inco").glob("run_*.sh"))
INCO_FLAGS = {"--dataset": "cifar10", "--model": "resnet26", "--partition": "hetero-fixed",
              "--alpha": "0.5", "--num_clients": "100", "--num_rounds": "500",
              "--clients_per_round": "0.1", "--inner_epochs": "5", "--batch_size": "64",
              "--learning_rate": "0.001", "--eval_every": "1", "--seed": "100"}


def test_inco_scripts_pass_the_papers_settings(tmp_path):
    methods = [p.stem.removeprefix("run_") for p in INCO_RUNNERS]
    assert sorted(methods) == sorted(f"{kind}{m}" for kind in ("hetero", "inco")
                                     for m in ("avg", "prox", "scaffold", "nova", "moon"))
    for script in INCO_RUNNERS:
        method = script.stem.removeprefix("run_")
        argv = _script_argv(tmp_path / method, script, "-r", "1")
        assert "--unweighted_updates" in argv        # HeteroAvg's mean is unweighted
        argv = [a for a in argv[1:-2] if a != "--unweighted_updates"]
        got = dict(zip(argv[::2], argv[1::2], strict=True))
        expected = {**INCO_FLAGS, "--trainer": method}
        if method.endswith("prox"):
            expected["--prox_mu"] = "0.1"
        if method.endswith("moon"):
            expected["--num_rounds"] = "100"
        assert got == expected, method


@pytest.mark.parametrize("script", [
    pytest.param(p, marks=pytest.mark.slow) for p in INCO_RUNNERS],
    ids=lambda p: f"inco/{p.name}")
def test_inco_runner_completes_a_round(tmp_path, script):
    write_cifar10(tmp_path / "data" / "cifar10" / "cifar-10-batches-py", train_per_class=8,
                  test_per_class=2)
    out = tmp_path / "run"
    proc = subprocess.run(
        ["bash", str(script), "--data_dir", str(tmp_path / "data"), "-c", "4", "-cr", "0.5",
         "--partition", "homo", "--submodels", "resnet10,resnet26", "-t", "0", "-le", "1",
         "-b", "8", "--noglobal_eval_drop_last", "-q", "-o", str(out)],
        cwd=tmp_path, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
        text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resnet10" in proc.stdout and "4,910,922 params" in proc.stdout
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(record["test_acc_tiers"]) == {"resnet10", "resnet26"}
    assert np.isclose(record["test_acc"], np.mean(list(record["test_acc_tiers"].values())))


# DAC's runners (dac_spec 2.3, 3.1, 4.1): every script hands its program DAC's settings
# (stand-in python3, in CI); with -m slow each really runs on tiny CIFAR-10 (a full
# MobileNet-V2 compiles for about a minute; tests/test_dac.py runs the same paths on
# tiny widths in the default set).
DAC = ROOT / "runners" / "dac"
DAC_FL_FLAGS = {"--trainer": "heteroavg", "--dataset": "cifar10", "--partition": "dac-iid",
                "--num_clients": "10", "--clients_per_round": "0.1", "--num_rounds": "49",
                "--inner_epochs": "5", "--batch_size": "128", "--learning_rate": "0.1",
                "--optimizer": "sgd", "--momentum": "0.5", "--eval_every": "1",
                "--seed": "100"}


def _pairs(argv: list[str]) -> dict[str, str]:
    switches = {"--unweighted_updates", "--noglobal_eval_drop_last"}
    rest = [a for a in argv if a not in switches]
    return dict(zip(rest[::2], rest[1::2], strict=True))


def test_dac_scripts_pass_dacs_settings(tmp_path):
    argv = _script_argv(tmp_path / "search", DAC / "run_search.sh", "--out", "x")
    assert argv[:2] == ["-m", "trainers.dac.search"]
    assert _pairs(argv[2:]) == {"--epochs": "10", "--lr": "0.01", "--batch_size": "256",
                                "--penalty_factor": "0.1", "--threshold": "0.1",
                                "--floor": "8", "--out": "x"}
    argv = _script_argv(tmp_path / "retrain", DAC / "run_retrain.sh", "--out", "x")
    assert argv[:2] == ["-m", "trainers.dac.retrain"]
    assert _pairs(argv[2:]) == {"--epochs": "10", "--lr": "0.1", "--batch_size": "100",
                                "--out": "x"}
    tiers = {"run_fedavg.sh": ("--budgets", "113329664:2932095"),
             "run_mixed.sh": ("--budgets", "26328640:714658,34196512:840828,51755680:1096978,"
                              "64238800:1338288,94604800:2932095"),
             "run_heterofl.sh": ("--width_multipliers", "0.35,0.5,0.75,1.0")}
    for script, (flag, value) in tiers.items():
        argv = _script_argv(tmp_path / script, DAC / script, "-r", "1")
        assert Path(argv[0]).resolve() == (ROOT / "main.py").resolve()
        assert "--unweighted_updates" in argv and "--noglobal_eval_drop_last" in argv
        got = _pairs(argv[1:])
        assert got == {**DAC_FL_FLAGS, "--augment": "none", flag: value, "-r": "1"}, script


def _snapshot_file(path: Path) -> Path:
    from models.mobilenet_v2 import FULL, MobileNetConfig, count_macs, count_params
    from trainers.dac.snapshots import Snapshot, write_snapshots
    small = MobileNetConfig.from_expansions([8] * 17)
    write_snapshots(path, [Snapshot(str(k), count_macs(c), count_params(c), c)
                           for k, c in enumerate((FULL, small))])
    return path


@pytest.mark.slow
@pytest.mark.parametrize("script", ["run_search.sh", "run_retrain.sh", "run_fedavg.sh",
                                    "run_mixed.sh", "run_heterofl.sh"])
def test_dac_runner_completes(tmp_path, script):
    write_cifar10(tmp_path / "data" / "cifar10" / "cifar-10-batches-py", train_per_class=8,
                  test_per_class=2)
    snaps = _snapshot_file(tmp_path / "snaps.json")
    out = tmp_path / "run"
    extra = {"run_search.sh": ["--epochs", "1", "--quiet"],
             "run_retrain.sh": ["--epochs", "1", "--snapshots", str(snaps), "--epoch", "1",
                                "--quiet"],
             "run_fedavg.sh": ["--dac_snapshots", str(snaps), "-c", "4", "-cr", "0.5"],
             "run_mixed.sh": ["--dac_snapshots", str(snaps), "--budgets",
                              "2e7:6e5,inf:inf", "-c", "4", "-cr", "0.5"],
             "run_heterofl.sh": ["--width_multipliers", "0.35,1.0", "-c", "4", "-cr", "0.5"]}
    fl = script not in ("run_search.sh", "run_retrain.sh")
    args = [*extra[script], "--data_dir", str(tmp_path / "data")]
    args += ["-t", "0", "-le", "1", "-b", "8", "-q", "-o", str(out)] if fl else ["--out",
                                                                                 str(out)]
    proc = subprocess.run(["bash", str(DAC / script), *args], cwd=tmp_path,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if script == "run_search.sh":
        snap = json.loads((out / "snapshots.json").read_text())
        assert list(snap) == ["0"] and snap["0"]["params"] == 2_296_922
    elif script == "run_retrain.sh":
        summary = json.loads((out / "summary.json").read_text())
        assert summary["cfg"][0][0] == 8 and len(summary["history"]) == 1
    else:
        record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        assert record["test_acc_tiers"] and record["macs_per_image_tiers"]


def test_deq_tier_scripts_add_their_tiers_to_the_fedeq_runner(tmp_path):
    tiers = ROOT / "runners" / "deq_tiers"
    base = _flags_reaching_main(tmp_path / "base", ROOT / "runners/femnist/run_fedeq.sh")
    for script, table in (("run_caps.sh", "name=cap4,maxiter=4;name=cap10,maxiter=10;"
                           "name=cap20,maxiter=20"),
                          ("run_widths.sh", "name=w25,width=0.25;name=w50,width=0.5;"
                           "name=w100,width=1")):
        argv = _script_argv(tmp_path / script, tiers / script, "femnist", "-r", "1")
        assert Path(argv[0]).resolve() == (ROOT / "main.py").resolve()
        assert _pairs(argv[1:]) == {**base, "--tiers": table, "--eval_maxiter": "40",
                                    "-r": "1"}
