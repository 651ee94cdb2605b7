"""One DEQ-ResNet-S training step and forward pass, per solver configuration, side by side.

Achieved FLOP/s: XLA's cost analysis counts a while loop's body once, so the step's
count is corrected by hand: (step as compiled) + (forward iterations - 1) x (one block
application) + (backward iterations - 1) x (one normal-equation CG product), each piece
from the compiled cost analysis, the iteration counts from the solver statistics. It is
compared with a dense matmul measured in the same run: the distance to this machine's limit.
Backward iterations are the per-example mean, i.e. useful work: under `vmap` the batch's
CG loop runs until its slowest example stops, so the executed work is somewhat larger.

    python -m benchmarks.deq_step [--batch 10 --eval_batch 32 --repeats 3]
"""

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from deq.config import SolverConfig  # noqa: E402
from deq.fixed_point import PROBE_SIZE  # noqa: E402
from models.deq_resnet import make_resnet_block  # noqa: E402
from models.registry import build_model  # noqa: E402

CONFIGS = {
    "reference (XLA conv grad, jaxopt Anderson)": SolverConfig(fast_conv=False,
                                                             anderson_impl="jaxopt"),
    "fast conv, jaxopt Anderson": SolverConfig(anderson_impl="jaxopt"),
    "XLA conv grad, batched Anderson": SolverConfig(fast_conv=False),
    "fast conv, batched Anderson (default)": SolverConfig(),
    "default, GMRES backward (not the reference's)": SolverConfig(bwd_solver="gmres"),
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


def all_cores_matmul_flops_per_second(n: int = 2048, repeats: int = 5) -> float:
    """The dense float32 matmul rate with every core busy: the larger of one matmul (XLA's
    own thread pool) and one matmul per core from as many threads at once. A round keeps
    both cores busy (threads executor), so this, not one matmul, is the rate its
    arithmetic is held against."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    workers = os.cpu_count() or 1
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda _: jax.block_until_ready(f(a)), range(workers)))
        best = max(best, workers * 2 * n ** 3 / (time.perf_counter() - t))
    return max(best, matmul_flops_per_second(n, repeats))


def compiled_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def solver_piece_flops(params: dict, u: jnp.ndarray, fast_conv: bool
                       ) -> tuple[float, float, float]:
    """FLOPs of one block application f(z, u), of one CG product (I-J)(I-J^T) v and of one
    GMRES product (I - J^T) v on the whole batch, as the solver loops run them."""
    block = make_resnet_block(fast_conv)
    p = {"conv1": params["deq_block"]["conv1_w"], "conv2": params["deq_block"]["conv2_w"],
         **{g: (params["deq_block"][f"{g}_scale"], params["deq_block"][f"{g}_offset"])
            for g in ("gn1", "gn2", "gn3")}}
    f = lambda z: block(p, z, u)

    def cg_products(z, v, n):
        """n products as deq/fixed_point.py builds them (linearised once, outside)."""
        _, vjp_z = jax.vjp(f, z)
        vjp = lambda w: vjp_z(w)[0]
        _, transpose_of_vjp = jax.vjp(vjp, jnp.zeros_like(z))
        for _ in range(n):
            m = v - vjp(v)
            v = m - transpose_of_vjp(m)[0]
        return v

    def vjps(z, v, n):
        _, vjp_z = jax.vjp(f, z)
        for _ in range(n):
            v = v - vjp_z(v)[0]
        return v

    per_product = (compiled_flops(lambda z, v: cg_products(z, v, 2), u, u)
                   - compiled_flops(lambda z, v: cg_products(z, v, 1), u, u))
    per_vjp = (compiled_flops(lambda z, v: vjps(z, v, 2), u, u)
               - compiled_flops(lambda z, v: vjps(z, v, 1), u, u))
    return compiled_flops(f, u), per_product, per_vjp


def training_step(model, params, state, x, y):
    """The jitted gradient of one batch's cross-entropy, and of the solver-statistics
    probe (deq/fixed_point.py) whose gradient carries the backward iteration count."""
    def loss(p, probe):
        out, _ = model.transformed.apply(p, state, None, x, True, probe)
        ce = -jnp.mean(jax.nn.log_softmax(out.logits)[jnp.arange(x.shape[0]), y])
        return ce, out.solver_stats

    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))


def step_flops(solver: SolverConfig, batch: int, fwd_iters: float, bwd_iters: float,
               input_shape: tuple[int, ...] = (28, 28, 1), num_classes: int = 62) -> float:
    """FLOPs of one DEQ-ResNet-S training step of `batch` examples whose solves ran
    `fwd_iters` forward and `bwd_iters` backward iterations (per-example means): the step
    as compiled plus the loop bodies XLA counted once (module docstring). Nothing runs."""
    model = build_model("deq_resnet_s", num_classes=num_classes, input_shape=input_shape,
                        solver=solver)
    x = jnp.zeros((batch, *input_shape), jnp.float32)
    y = jnp.arange(batch) % num_classes
    params, state = model.init(jax.random.PRNGKey(0), x)
    step = training_step(model, params, state, x, y)
    probe = jnp.zeros((PROBE_SIZE,), jnp.float32)
    return _corrected_step_flops(step, params, probe, solver, x.shape, fwd_iters,
                                 bwd_iters)[0]


def _corrected_step_flops(step, params, probe, solver, x_shape, fwd_iters, bwd_iters
                          ) -> tuple[float, float]:
    """(the step's FLOPs, one block application's) on a batch of shape `x_shape`."""
    h, w = -(-x_shape[1] // 2), -(-x_shape[2] // 2)   # the stem's stride-2 pool
    u = jax.random.normal(jax.random.PRNGKey(3), (x_shape[0], h, w,
                          params["deq_block"]["conv1_w"].shape[2]))
    f_block, f_cg, f_vjp = solver_piece_flops(params, u, solver.fast_conv)
    f_bwd = {"gmres": f_vjp, "normal_cg": f_cg}.get(solver.bwd_solver, 0.0)
    return (compiled_flops(step, params, probe) + (fwd_iters - 1) * f_block
            + (bwd_iters - 1) * f_bwd), f_block


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

        step = training_step(model, params, state, x, y)
        probe = jnp.zeros((PROBE_SIZE,), jnp.float32)
        t_step = best_time(step, params, probe, repeats=args.repeats)
        (_, g_probe), stats = step(params, probe)

        def forward(p, xx, model=model, state=state):
            out = model.transformed.apply(p, state, None, xx, False, None)[0]
            return out.logits, out.solver_stats.fwd_iters

        fwd = jax.jit(forward)
        t_fwd = best_time(fwd, params, xe, repeats=args.repeats)
        eval_iters = float(fwd(params, xe)[1])
        base = base or (t_step, t_fwd)
        fwd_iters, bwd_iters = float(stats.fwd_iters), float(g_probe[0]) / args.batch
        flops, f_block = _corrected_step_flops(step, params, probe, solver, x.shape,
                                               fwd_iters, bwd_iters)
        # Convolutions and group norms cost the same per example: scale to the eval batch.
        eval_flops = (compiled_flops(fwd, params, xe)
                      + (eval_iters - 1) * f_block * args.eval_batch / args.batch)
        print(f"{name}\n  step     {t_step:6.3f} s ({base[0] / t_step:4.2f}x)  "
              f"[fwd iters {fwd_iters:.1f}, bwd iters {bwd_iters:.1f}]  "
              f"{flops / 1e9:.2f} GFLOP = {flops / t_step / 1e9:.1f} GFLOP/s "
              f"({100 * flops / t_step / peak:.0f}% of the matmul)\n"
              f"  eval fwd {t_fwd:6.3f} s ({base[1] / t_fwd:4.2f}x)  "
              f"[fwd iters {eval_iters:.1f}]  {eval_flops / 1e9:.2f} GFLOP = "
              f"{eval_flops / t_fwd / 1e9:.1f} GFLOP/s "
              f"({100 * eval_flops / t_fwd / peak:.0f}% of the matmul)", flush=True)


if __name__ == "__main__":
    main()
