"""Triton kernel behind loss.py's chunked cross-entropy on CUDA: one pass over a chunk's logits.

Importing this module never fails: without Triton, AVAILABLE is False and loss.py computes the
chunk with PyTorch operations.

For each row r of a chunk's logits x [n, V] (the head's product, in the compute dtype) and its
target t_r:

    lse_r = log sum_j exp(x_rj),   loss_r = lse_r - x_(r, t_r),   x_rj <- exp(x_rj - lse_r) - [j = t_r]

the last in place: the row becomes the gradient of loss_r with respect to its logits. A row whose
target is IGNORE_INDEX has loss 0 and gradient 0. One program walks one row: a first read keeps a
running maximum and sum of exponentials per lane (the online log-sum-exp), a second read writes the
gradient. All arithmetic is float32. The PyTorch path makes a float32 copy of the chunk and passes
over it five more times (log-sum-exp, subtract, exponentiate, mask, cast back).
"""

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # CPU-only machines load the model without Triton
    AVAILABLE = False

MAX_BLOCK = 4096  # vocabulary entries a program holds at once

if AVAILABLE:

    @triton.jit
    def _cross_entropy_kernel(logits, targets, losses, V, stride, ignore_index, BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        row = logits + r * stride
        target = tl.load(targets + r)
        valid = target != ignore_index
        cols = tl.arange(0, BLOCK)
        # per lane: the largest logit so far and the sum of exp(x - that maximum); the maximum starts finite
        # (below any finite float32) so that no lane ever computes -inf - (-inf)
        lane_max = tl.full([BLOCK], -3.0e38, tl.float32)
        lane_sum = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            x = tl.load(row + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(lane_max, x)
            lane_sum = lane_sum * tl.exp(lane_max - new_max) + tl.exp(x - new_max)
            lane_max = new_max
        row_max = tl.max(lane_max, 0)
        lse = row_max + tl.log(tl.sum(lane_sum * tl.exp(lane_max - row_max), 0))
        picked = tl.load(row + tl.where(valid, target, 0)).to(tl.float32)
        tl.store(losses + r, tl.where(valid, lse - picked, 0.0))
        for start in range(0, V, BLOCK):
            mask = start + cols < V
            x = tl.load(row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(start + cols == target, 1.0, 0.0)
            grad = tl.where(valid, grad, 0.0)
            tl.store(row + start + cols, grad.to(logits.dtype.element_ty), mask=mask)


def cross_entropy_rows_(logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    """logits: [n, V] (float32, bfloat16 or float16; rows contiguous), overwritten with the gradient of
    each row's loss with respect to its logits; targets: [n] long. Returns the per-row losses [n] float32
    (0 where the target is ``ignore_index``)."""
    n, V = logits.shape
    if logits.stride(1) != 1:
        raise ValueError(f"logits must have contiguous rows, got strides {tuple(logits.stride())}")
    losses = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        block = min(MAX_BLOCK, triton.next_power_of_2(V))
        _cross_entropy_kernel[(n,)](logits, targets.contiguous(), losses, V, logits.stride(0), ignore_index,
                                    BLOCK=block, num_warps=8)
    return losses
