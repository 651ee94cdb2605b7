"""The `sharded` executor and several processes give the loop executor's numbers.

A process's CPU device count is fixed when JAX starts, so the 2- and 4-device runs are
subprocesses (tests/sharded_worker.py); the 2-process runs start main.py through
runners/distributed.sh, as a user would.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY_SHAKESPEARE_FLAGS, small_engine, write_tiny_shakespeare
from trainers.sharding import blocks

ROOT = Path(__file__).resolve().parent.parent
COMPARED = ("test_acc", "train_acc", "test_loss", "train_loss", "local_loss", "up_bytes",
            "down_bytes", "cohort", "clients_scored")


def _same_rounds(a: list[dict], b: list[dict], skip: tuple[str, ...] = ()) -> None:
    """Every logged metric, to the tolerance the other executors are held to
    (tests/test_engine.py): a scanned client (`map`) and an eager one (`loop`) sum in
    different orders."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in COMPARED:
            if key in x and key not in skip:
                assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-5, nan_ok=True), (
                    x["round"], key)


def _worker(devices: int, algorithms: str, inner: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tests.sharded_worker", str(devices),
                           algorithms, inner], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200, env={**_env(), "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env() -> dict:
    import os
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


def test_blocks_pad_with_the_last_client_and_cover_everyone():
    per, slots = blocks(5, 4)
    assert per == 2 and slots.tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
    per, slots = blocks(8, 4)
    assert per == 2 and slots.tolist() == list(range(8))
    per, slots = blocks(1, 2)
    assert per == 1 and slots.tolist() == [0, 0]


def test_sharded_on_one_device_equals_the_loop():
    loop = small_engine("fedavg", "loop", rounds=0, frac_unseen=0.25)
    loop_summary = loop.run()
    sharded = small_engine("fedavg", "sharded", rounds=0, frac_unseen=0.25)
    summary = sharded.run()
    assert sharded.executor.describe() == "sharded over 1 device, loop per device"
    _same_rounds(loop.history, sharded.history)
    assert summary["unseen_test_acc"] == pytest.approx(loop_summary["unseen_test_acc"])


@pytest.mark.parametrize("devices,algorithms,inner", [
    (2, "fedeq", "loop,map"),   # 3 clients a round: one padded slot
])
def test_sharded_over_forced_cpu_devices_equals_the_loop(devices, algorithms, inner):
    out = _worker(devices, algorithms, inner)
    assert out["devices"] == devices
    for algorithm in algorithms.split(","):
        loop = out[f"{algorithm}/loop/"]
        for device_executor in inner.split(","):
            run = out[f"{algorithm}/sharded/{device_executor}"]
            assert run["executor"] == (f"sharded over {devices} devices, {device_executor} "
                                       f"per device")
            _same_rounds(loop["history"], run["history"])
            if loop["unseen_test_acc"] is not None:
                assert run["unseen_test_acc"] == pytest.approx(loop["unseen_test_acc"])


@pytest.mark.slow
@pytest.mark.parametrize("devices,algorithms,inner", [
    (4, "fedeq", "loop,map"),
    (4, "fedavg", "map"),       # 6 clients scored: two padded slots
    (2, "fedavg", "loop"),
    # Sub-models of two depths, one tier per group. (Under `map` its test loss moves
    # 1.1e-4 relative from the loop's after one round, as the unsharded map executor
    # does too: a scan sums differently and Adam on the toy ResNets amplifies it.)
    (2, "incoavg", "loop"),
])
def test_sharded_equals_the_loop_for_more_algorithms(devices, algorithms, inner):
    test_sharded_over_forced_cpu_devices_equals_the_loop(devices, algorithms, inner)


def _history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _distributed(target: Path, args: list[str], out: Path, env: dict) -> str:
    proc = subprocess.run(["bash", str(ROOT / "runners" / "distributed.sh"), "2",
                           str(target), *args, "-o", str(out)],
                          cwd=ROOT, env={**env, "CPU_DEVICES": "2"}, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _one_process(target: Path, args: list[str], out: Path, env: dict) -> None:
    launch = [sys.executable] if target.suffix == ".py" else ["bash"]
    proc = subprocess.run([*launch, str(target), *args, "--executor", "loop", "-o", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _two_processes_equal_one(target: Path, args: list[str], tmp_path: Path,
                             env: dict) -> None:
    """2 processes x 2 CPU devices through runners/distributed.sh against one process
    with the loop executor: a 2-process run of round 0 equals the one-process run's round
    0 and writes once; rerun with -t 1 it resumes from its checkpoint, and its rounds
    equal the uninterrupted one-process run's (a resumed run scores every client again
    in its first evaluation: `clients_scored` differs, the numbers do not)."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    _one_process(target, [*args, "-t", "1"], single, env)
    printed = _distributed(target, [*args, "-t", "0"], multi, env)
    assert printed.count("final test acc") == 1          # process 1 prints nothing
    assert "sharded over 4 devices of 2 processes, loop per device" in printed
    _same_rounds(_history(single)[:1], _history(multi))
    assert "resuming from" in _distributed(target, [*args, "-t", "1"], multi, env)
    _same_rounds(_history(single), _history(multi), skip=("clients_scored",))
    assert (json.loads((multi / "summary.json").read_text())["final_test_acc"]
            == pytest.approx(json.loads((single / "summary.json").read_text())
                             ["final_test_acc"], abs=1e-6))


def test_two_processes_of_two_devices_equal_one_process_and_resume(tmp_path,
                                                                   shared_compile_env):
    """FeDEQ on the synthetic data, main.py through runners/distributed.sh."""
    args = ["--trainer", "fedeq", "-d", "synthetic", "-c", "8", "-cr", "0.5", "-le", "1",
            "-pe", "1", "-q"]
    _two_processes_equal_one(ROOT / "main.py", args, tmp_path, shared_compile_env)


@pytest.mark.slow
def test_a_text_runner_on_two_processes_equals_one_process(tmp_path, shared_compile_env):
    """FedAvg on tiny Shakespeare through its runner script."""
    write_tiny_shakespeare(tmp_path / "data")
    _two_processes_equal_one(ROOT / "runners" / "shakespeare" / "run_fedavg.sh",
                             ["--data_dir", str(tmp_path / "data"), *TINY_SHAKESPEARE_FLAGS],
                             tmp_path, shared_compile_env)


def test_distributed_runner_refuses_a_bad_count():
    proc = subprocess.run(["bash", str(ROOT / "runners" / "distributed.sh"), "0", "x.sh"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


def _cohort_inputs(engine, cohort):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from trainers.local import ClientData
    from utils.pytree import index

    params, state = engine.task.model.init(jax.random.PRNGKey(0),
                                           jnp.asarray(engine.data.train[0].x[:2]))
    server, clients = engine.alg.init(params, state, engine.num_clients)
    schedule, keys, _ = engine._client_inputs(engine.batcher, cohort, jax.random.PRNGKey(1))
    rows = jnp.asarray(cohort)
    data = ClientData(engine.train[0][rows], engine.train[1][rows])
    weights = engine.alg.aggregation_weights(jnp.asarray(engine.sizes[np.asarray(cohort)]))
    return server, (index(clients, rows), data, schedule, keys), weights


def _primitives(jaxpr) -> set[str]:
    """Every primitive of a jaxpr, sub-jaxprs (scans, conds, custom rules) included."""
    from jax.extend.core import ClosedJaxpr, Jaxpr

    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, ClosedJaxpr):
                    names |= _primitives(sub.jaxpr)
                elif isinstance(sub, Jaxpr):
                    names |= _primitives(sub)
    return names


def test_a_compiled_cohort_and_the_server_step_never_copy_to_the_host():
    """Under vmap (the accelerator default, and each device's block under sharded with
    vmap) a round's training and server step are programs without a host callback, run
    under a transfer guard that refuses device-to-host copies. (On CPU a device array
    is host memory and the guard sees nothing; the callback check holds everywhere.)"""
    import jax

    engine = small_engine("fedeq", "vmap")
    server, inputs, weights = _cohort_inputs(engine, [0, 3, 5])
    cohort = jax.vmap(engine._client_fn, in_axes=(None, 0))
    _, uploads, _ = jax.eval_shape(cohort, server, inputs)
    used = (_primitives(jax.make_jaxpr(cohort)(server, inputs).jaxpr)
            | _primitives(jax.make_jaxpr(engine.alg.server_update)(server, uploads,
                                                                   weights).jaxpr))
    assert "custom_vjp_call" in used or "custom_vjp_call_jaxpr" in used  # looked inside
    assert not {name for name in used if "callback" in name or "print" in name}, used
    jax.block_until_ready(engine.executor(engine._client_fn, server, inputs, trains=True))
    with jax.transfer_guard_device_to_host("disallow"):
        _, uploads, _ = engine.executor(engine._client_fn, server, inputs, trains=True)
        jax.block_until_ready(engine._server_update(server, uploads, weights))
