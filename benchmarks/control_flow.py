"""Why the loop executor runs each SGD step as its own jitted call on CPU.

XLA:CPU runs a convolution's gradient far slower inside control flow (jax issue 12868).
This times one ResNet20 SGD step (batch 10, FEMNIST shapes) three ways in one run: at the
top level of a jitted function, inside a `lax.cond`, and per step inside a `lax.scan`.

    python -m benchmarks.control_flow [--model resnet20 --steps 3]
"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from benchmarks.deq_step import best_time  # noqa: E402
from models.registry import build_model  # noqa: E402
from trainers.task import ClassificationTask  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    model = build_model(args.model, num_classes=62, input_shape=(28, 28, 1))
    task = ClassificationTask(model)
    x = jax.random.normal(jax.random.PRNGKey(0), (10, 28, 28, 1))
    y = jnp.arange(10) % 62
    params, state = model.init(jax.random.PRNGKey(0), x)

    def step(p, s):
        def loss(p):
            out, ns = task.apply(p, s, None, x, True)
            return task.loss(out.logits, y, jnp.ones(10)), ns
        g, ns = jax.grad(loss, has_aux=True)(p)
        return jax.tree.map(lambda a, b: a - 0.01 * b, p, g), ns

    top = best_time(jax.jit(step), params, state, repeats=2)
    in_cond = best_time(jax.jit(lambda p, s, c: lax.cond(c, lambda ps: step(*ps), lambda ps: ps,
                                                     (p, s))), params, state, True,
                        repeats=2)
    in_scan = best_time(jax.jit(lambda p, s: lax.scan(lambda c, _: (step(*c), None), (p, s), None,
                                                  length=args.steps)[0]), params, state,
                        repeats=2)
    in_scan /= args.steps
    print(f"backend {jax.default_backend()}, {args.model} SGD step, batch 10")
    print(f"top level  {top:.3f} s/step (1.00x)")
    print(f"in cond    {in_cond:.3f} s/step ({in_cond / top:.2f}x slower)")
    print(f"in scan    {in_scan:.3f} s/step ({in_scan / top:.2f}x slower)")


if __name__ == "__main__":
    main()
