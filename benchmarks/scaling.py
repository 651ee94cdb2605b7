"""Seconds per FeDEQ round on FEMNIST against the number of devices and the cohort size,
with the `sharded` executor (issue 16).

    python -m benchmarks.scaling --data_dir ROOT [--devices 1,2,4] [--cohorts 10,50,100]

Each (devices, cohort) pair runs main.py in its own process, since a process's device
count is fixed when JAX starts: on CPU with `--cpu_devices N` (XLA's host platform split
into N devices), on an accelerator with the first N devices visible. Round 0 compiles
and scores every client; round 1 is timed (training, evaluation of the clients that
changed, whole round). Each row's ratio is against the one-device row of its cohort.

Forced CPU devices share the machine's cores: on this 2-core machine the table shows the
executor's own cost (padding, joins, one compiled copy of the steps per device under
`loop`) and whether more, smaller blocks keep the cores busier, never what real devices
would give. Defaults are reduced for a CPU (1 + 1 epochs); pass main.py flags to change.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(args, devices: int, cohort: int, out: Path, extra: list[str]) -> dict:
    env = dict(os.environ)
    if args.platform == "cpu":
        placement = ["--cpu_devices", str(devices)]
        env["JAX_PLATFORMS"] = "cpu"
    else:
        placement = []
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(devices))
    command = [sys.executable, str(ROOT / "main.py"), "--trainer", "fedeq_vision",
               "--dataset", "femnist", "--data_dir", args.data_dir,
               "--num_clients", str(args.num_clients),
               "--clients_per_round", str(cohort / args.num_clients), "-t", "1",
               "-le", str(args.le), "-pe", str(args.pe), "--seed", "100", "-q",
               "--eval_train_every", "0", "--checkpoint_every", "0",
               "--executor", "sharded", *placement, "--outdir", str(out), *extra]
    if args.device_executor:
        command += ["--device_executor", args.device_executor]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rounds[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--devices", default="1,2,4")
    p.add_argument("--cohorts", default="10,50,100")
    p.add_argument("--num_clients", type=int, default=100)
    p.add_argument("-le", type=int, default=1)
    p.add_argument("-pe", type=int, default=1)
    p.add_argument("--platform", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--device_executor", default="", help="loop, map or vmap (default: the "
                   "backend's)")
    args, extra = p.parse_known_args()
    devices = [int(d) for d in args.devices.split(",")]
    cohorts = [int(c) for c in args.cohorts.split(",")]
    print(f"FeDEQ, FEMNIST {args.num_clients} writers, -le {args.le} -pe {args.pe}, "
          f"--executor sharded on {args.platform}; round 1 timed", flush=True)
    print("| cohort | devices | train s | eval s (clients scored) | round s | cores busy "
          "| speed-up over 1 device |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for cohort in cohorts:
            first = None
            for d in devices:
                r = _run(args, d, cohort, Path(tmp) / f"c{cohort}_d{d}", extra)
                first = first or r["seconds"]
                print(f"| {cohort} | {d} | {r['train_seconds']:.2f} | "
                      f"{r['eval_seconds']:.2f} ({r['clients_scored']}) | {r['seconds']:.2f} "
                      f"| {r['cpu_seconds'] / r['seconds']:.2f} | "
                      f"{first / r['seconds']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
