"""One DEQ-ResNet-S training step and forward pass, per solver configuration, side by side.

(Achieved FLOP/s is not printed yet: XLA's cost analysis counts a while loop's body once,
so it undercounts the solvers' iterations; see docs/PERFORMANCE.md.)

    python -m benchmarks.deq_step [--batch 10 --eval_batch 32 --repeats 3]
"""

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from deq.config import SolverConfig  # noqa: E402
from models.registry import build_model  # noqa: E402

CONFIGS = {
    "reference (XLA conv grad, jaxopt Anderson)": SolverConfig(fast_conv=False,
                                                             anderson_impl="jaxopt"),
    "fast conv, jaxopt Anderson": SolverConfig(anderson_impl="jaxopt"),
    "XLA conv grad, batched Anderson": SolverConfig(fast_conv=False),
    "fast conv, batched Anderson (default)": SolverConfig(),
}


def best_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_flops_per_second(n: int = 2048, repeats: int = 5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    return 2 * n ** 3 / best_time(f, a, repeats=repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--eval_batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    x = jax.random.normal(jax.random.PRNGKey(1), (args.batch, 28, 28, 1))
    xe = jax.random.normal(jax.random.PRNGKey(2), (args.eval_batch, 28, 28, 1))
    y = jnp.arange(args.batch) % 62
    peak = matmul_flops_per_second()
    print(f"backend {jax.default_backend()}, {os.cpu_count()} cpus; dense 2048^2 matmul "
          f"{peak / 1e9:.1f} GFLOP/s", flush=True)
    base = None
    for name, solver in CONFIGS.items():
        model = build_model("deq_resnet_s", num_classes=62, input_shape=(28, 28, 1),
                            solver=solver)
        params, state = model.init(jax.random.PRNGKey(0), x)

        def loss(p, probe, model=model, state=state):
            out, _ = model.transformed.apply(p, state, None, x, True, probe)
            ce = -jnp.mean(jax.nn.log_softmax(out.logits)[jnp.arange(args.batch), y])
            return ce, out.solver_stats

        step = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
        probe = jnp.zeros((2,), jnp.float32)
        t_step = best_time(step, params, probe, repeats=args.repeats)
        (_, g_probe), stats = step(params, probe)
        fwd = jax.jit(lambda p, xx, model=model, state=state:
                      model.transformed.apply(p, state, None, xx, False, None)[0].logits)
        t_fwd = best_time(fwd, params, xe, repeats=args.repeats)
        base = base or (t_step, t_fwd)
        print(f"{name:45s} step {t_step:6.3f} s ({base[0] / t_step:4.2f}x)  "
              f"eval fwd {t_fwd:6.3f} s ({base[1] / t_fwd:4.2f}x)  "
              f"[fwd iters {float(stats.fwd_iters):.1f}, bwd iters "
              f"{float(g_probe[0]) / args.batch:.1f}]", flush=True)


if __name__ == "__main__":
    main()
