"""Several processes (hosts) with JAX's own distributed runtime, and forced CPU devices.

Every process runs the same command with its own `--process_id`; `jax.distributed`
connects them through the coordinator, after which `jax.devices()` lists every process's
devices and the `sharded` executor spreads a cohort over all of them
(trainers/sharding.py). Only process 0 writes the run directory, metrics and
checkpoints (`is_writer`); every process reads a checkpoint to resume from, so all of
them continue from the same state.

Both calls must come before JAX first touches a device (main.py makes them first thing).
"""

import os

import jax

from utils.input_error import InputError

# The variables a launcher may set instead of the flags (runners/distributed.sh sets flags).
ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


def settings_from_env(coordinator: str | None, num_processes: int | None,
                      process_id: int | None) -> tuple[str | None, int, int | None]:
    """Flags first, then JAX's environment variables; one process when neither says."""
    coordinator = coordinator or os.environ.get(ENV["coordinator"]) or None
    if num_processes is None:
        num_processes = int(os.environ.get(ENV["num_processes"], "1"))
    if process_id is None and ENV["process_id"] in os.environ:
        process_id = int(os.environ[ENV["process_id"]])
    return coordinator, num_processes, process_id


def initialize(coordinator: str | None, num_processes: int, process_id: int | None,
               cpu_devices: int | None = None) -> None:
    """Forces `cpu_devices` CPU devices in this process (XLA's host platform), and joins
    `num_processes` processes when there is more than one."""
    if cpu_devices is not None:
        if cpu_devices < 1:
            raise InputError(f"--cpu_devices={cpu_devices}: give at least 1")
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    if num_processes <= 1:
        if process_id not in (None, 0):
            raise InputError(f"--process_id={process_id} without --num_processes: give "
                             f"--num_processes N (> 1) and --coordinator HOST:PORT")
        return
    if not coordinator:
        raise InputError(f"--num_processes={num_processes} needs --coordinator HOST:PORT "
                         f"(the address of process 0, the same for every process)")
    if process_id is None or not 0 <= process_id < num_processes:
        raise InputError(f"--process_id={process_id}: give this process's index, 0 to "
                         f"{num_processes - 1}, a different one for each process")
    jax.distributed.initialize(coordinator, num_processes, process_id)


def is_writer() -> bool:
    """Whether this process writes files and prints the run's output (process 0)."""
    return jax.process_index() == 0
