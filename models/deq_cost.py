"""Multiply-accumulates of the DEQ-ResNet per example: stem + iterations x block + head.

Counted are the convolutions' and linear layers' products (normalisations, activations
and pooling are left out: under 2% here). A block's hidden width is the number of
hidden channels a tier keeps (models/deq_resnet.hidden_channels): its two convolutions
shrink with it, so the figures are those of a device that runs the narrowed block.

Backward passes are counted with the usual rule that a vector-Jacobian product costs
twice the forward pass: a training example costs the forward solve, one vjp per backward
step (normal-equation CG needs a vjp and the vjp of a vjp, so two), one vjp of the block
for the parameters' gradient, and twice the stem and head.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class DeqResNetCost:
    stem: int
    block: int          # one application of f at the tier's hidden width
    head: int

    def forward(self, iters: float) -> float:
        """A forward pass that ran `iters` applications of f (the solver's count; the
        batched Anderson applies f once per iteration)."""
        return self.stem + iters * self.block + self.head

    def training(self, fwd_iters: float, bwd_iters: float, bwd_solver: str) -> float:
        per_step = 4 if bwd_solver == "normal_cg" else 2
        return (self.forward(fwd_iters) + per_step * bwd_iters * self.block
                + 2 * self.block + 2 * (self.stem + self.head))


def _pooled(n: int) -> int:
    return -(-n // 2)  # 3x3 max pool, stride 2, SAME


def deq_resnet_cost(input_shape: tuple[int, int, int], c1: int, hidden: int,
                    num_classes: int) -> DeqResNetCost:
    h, w, cin = input_shape
    stem = h * w * 9 * cin * c1
    bh, bw = _pooled(h), _pooled(w)
    block = 2 * bh * bw * 9 * c1 * hidden
    head = _pooled(bh) * _pooled(bw) * c1 * 256 + 256 * 128 + 128 * num_classes
    return DeqResNetCost(stem, block, head)
