"""`--fast_conv` on the explicit CNNs: XLA's convolutions against models.conv2d's patch
products, side by side in one run, on random inputs of each model's data shape.

    python -m benchmarks.conv_models                       # every model, default sizes
    python -m benchmarks.conv_models --models resnet26 --eval_batch 512 --train_batch 64

For each model: one evaluation forward pass (the engine scores in batches of
--eval_batch) and one training step's gradient (batch --train_batch), each compiled once
and then timed as the median of --repeats calls, with both forms' largest relative
difference in the logits and in the gradient, so the speed-up is read beside the
evidence that the numbers are the same.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from deq.config import SolverConfig
from models.registry import build_model

# model -> (input shape, classes): the shapes the project trains them on.
MODELS = {
    "resnet10": ((32, 32, 3), 10), "resnet18": ((32, 32, 3), 10),
    "resnet26": ((32, 32, 3), 10), "resnet34": ((32, 32, 3), 10),
    "resnet20": ((28, 28, 1), 62),
}


def _median_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _relative(a, b) -> float:
    diffs = [float(jnp.linalg.norm(x - y) / jnp.maximum(jnp.linalg.norm(y), 1e-30))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
    return max(diffs)


def measure(name: str, eval_batch: int, train_batch: int, repeats: int) -> dict:
    shape, classes = MODELS[name]
    key_x, key_init = jax.random.split(jax.random.PRNGKey(0))
    x_eval = jax.random.normal(key_x, (eval_batch, *shape))
    x_train, y_train = x_eval[:train_batch], jnp.arange(train_batch) % classes
    row = {"model": name}
    outputs = {}
    for fast in (False, True):
        model = build_model(name, num_classes=classes, input_shape=shape,
                            solver=SolverConfig(fast_conv=fast))
        params, state = model.init(key_init, x_train[:2])
        forward = jax.jit(lambda p, s, x, m=model: m.transformed.apply(
            p, s, None, x, False)[0].logits)

        def loss(p, s, x, y, m=model):
            out, _ = m.transformed.apply(p, s, None, x, True)
            return -jnp.mean(jax.nn.log_softmax(out.logits)[jnp.arange(y.shape[0]), y])

        grad = jax.jit(jax.grad(loss))
        tag = "fast" if fast else "xla"
        row[f"eval_{tag}"] = _median_seconds(forward, params, state, x_eval, repeats=repeats)
        row[f"train_{tag}"] = _median_seconds(grad, params, state, x_train, y_train,
                                              repeats=repeats)
        outputs[tag] = (forward(params, state, x_eval),
                        grad(params, state, x_train, y_train))
    row["logits_rel"] = _relative(outputs["fast"][0], outputs["xla"][0])
    row["grad_rel"] = _relative(outputs["fast"][1], outputs["xla"][1])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--eval_batch", type=int, default=512)
    parser.add_argument("--train_batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"backend {jax.default_backend()}, eval batch {args.eval_batch}, "
          f"train batch {args.train_batch}, median of {args.repeats}")
    print("| model | eval XLA ms | eval fast ms | speed-up | train step XLA ms "
          "| train step fast ms | speed-up | logits rel. diff | gradient rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        r = measure(name, args.eval_batch, args.train_batch, args.repeats)
        print(f"| {name} | {r['eval_xla'] * 1e3:.1f} | {r['eval_fast'] * 1e3:.1f} "
              f"| {r['eval_xla'] / r['eval_fast']:.2f}x | {r['train_xla'] * 1e3:.1f} "
              f"| {r['train_fast'] * 1e3:.1f} | {r['train_xla'] / r['train_fast']:.2f}x "
              f"| {r['logits_rel']:.1e} | {r['grad_rel']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
