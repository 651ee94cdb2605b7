"""Peak memory of one local training step: each DEQ model against its explicit baseline.

    python -m benchmarks.memory [--pairs femnist,cifar10,cifar100,shakespeare]

The step is what a client runs: forward, loss, gradient, SGD update, at the reference
batch sizes (FEMNIST 10, CIFAR 20, Shakespeare 16 x 80 tokens). On CPU the figure comes
from the compiled program's memory analysis (arguments + outputs + temporaries - aliased
buffers), which is what XLA reserves for that step; on a GPU it is the device's peak
bytes in use after running the step, with preallocation off (the script sets
XLA_PYTHON_CLIENT_PREALLOCATE=false before JAX starts). The paper claims 1.5x less
training memory for the DEQ models: each pair's ratio is printed.
"""

import argparse
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from deq.config import SolverConfig  # noqa: E402
from models.registry import build_model  # noqa: E402

# dataset -> (input shape, integer inputs?, classes, batch, explicit model, DEQ model)
PAIRS = {
    "femnist": ((28, 28, 1), False, 62, 10, "resnet20", "deq_resnet_s"),
    "cifar10": ((32, 32, 3), False, 10, 20, "resnet34", "deq_resnet_m"),
    "cifar100": ((32, 32, 3), False, 100, 20, "resnet34", "deq_resnet_m"),
    "shakespeare": ((80,), True, 90, 16, "transformer8", "deq_transformer"),
}


def _batch(shape, integer: bool, classes: int, batch: int):
    key_x, key_y = jax.random.split(jax.random.PRNGKey(0))
    if integer:
        x = jax.random.randint(key_x, (batch,) + shape, 1, classes)
        return x, jnp.roll(x, -1, axis=1)
    x = jax.random.normal(key_x, (batch,) + shape)
    return x, jax.random.randint(key_y, (batch,), 0, classes)


def training_step(name: str, shape, integer: bool, classes: int, batch: int):
    """(jitted step, its arguments) for one SGD step of model `name`."""
    model = build_model(name, num_classes=classes, input_shape=shape, solver=SolverConfig())
    x, y = _batch(shape, integer, classes, batch)
    params, state = model.init(jax.random.PRNGKey(1), x)
    opt = optax.sgd(0.01)

    def step(params, state, rng, x, y):
        def loss(p):
            out, new_state = model.transformed.apply(p, state, rng, x, True, None)
            ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, y)
            return jnp.mean(ce), new_state

        (value, new_state), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, _ = opt.update(grads, opt.init(params), params)
        return optax.apply_updates(params, updates), new_state, value

    return jax.jit(step), (params, state, jax.random.PRNGKey(2), x, y)


def peak_bytes(step, args) -> tuple[float, str]:
    """(bytes, how measured) for one call of `step(*args)` on the default device."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        jax.block_until_ready(step(*args))
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return float(stats["peak_bytes_in_use"]), "device peak bytes in use"
    mem = step.lower(*args).compile().memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)
    return float(total), "compiled memory analysis"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", default=",".join(PAIRS), help="datasets, comma separated")
    args = p.parse_args()
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind})", flush=True)
    gpu = jax.default_backend() != "cpu"
    for dataset in args.pairs.split(","):
        shape, integer, classes, batch, explicit, deq = PAIRS[dataset]
        sizes = {}
        for name in (explicit, deq):
            if gpu:   # a fresh process would be cleaner; peak stats only grow
                jax.clear_caches()
            step, step_args = training_step(name, shape, integer, classes, batch)
            sizes[name], how = peak_bytes(step, step_args)
            print(f"  {dataset:12s} {name:16s} batch {batch:3d}: "
                  f"{sizes[name] / 2**20:8.1f} MiB ({how})", flush=True)
        print(f"{dataset:12s} {explicit} / {deq} = {sizes[explicit] / sizes[deq]:.2f}x "
              f"(paper: DEQ needs 1.5x less)", flush=True)


if __name__ == "__main__":
    main()
