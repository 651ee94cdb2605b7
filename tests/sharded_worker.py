"""`python -m tests.sharded_worker N ALGORITHMS DEVICE_EXECUTORS` in a fresh process: N
forced CPU devices, then each algorithm (comma-separated) on the test engine's synthetic
data with the `loop` executor and with `sharded` under each per-device executor
(comma-separated); the last line printed is one JSON object with every run's metrics. A
process's device count is fixed when JAX starts, so each count needs its own process."""

import json
import sys

import jax

SUBMODEL = ("incoavg", "heteroavg")


def main() -> None:
    devices, algorithms, inner = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.config.update("jax_num_cpu_devices", devices)
    from tests.helpers import small_engine
    from tests.test_submodel_federation import _engine as submodel_engine

    out = {"devices": len(jax.devices())}
    for algorithm in algorithms.split(","):
        runs = [("loop", "")] + [("sharded", d) for d in inner.split(",")]
        for kind, device_executor in runs:
            if algorithm in SUBMODEL:   # InCo's sub-model federation on toy ResNets
                engine = submodel_engine(algorithm, rounds=1, executor=kind,
                                         device_executor=device_executor)
            else:
                engine = small_engine(algorithm, kind, rounds=1, frac_unseen=0.25,
                                      device_executor=device_executor)
            summary = engine.run()
            out[f"{algorithm}/{kind}/{device_executor}"] = {
                "history": engine.history, "unseen_test_acc": summary.get("unseen_test_acc"),
                "executor": engine.executor.describe()}
    print(json.dumps(out, default=float))


if __name__ == "__main__":
    main()
