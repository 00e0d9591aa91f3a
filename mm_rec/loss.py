"""The language-model loss without [tokens, vocab] logits: a chunked, fused linear + cross-entropy.

Training never materialises the logits of the whole batch: rows are taken ``chunk_rows`` at
a time, their logits computed, turned into the loss and, at once, into the gradients of the
hidden states and of the head's weight, and dropped. The backward only scales those
gradients. Peak memory is set by the chunk, not by batch x length x vocabulary.

Where ``backend`` (``config.kernel_backend``) resolves to Triton, a chunk's logits stay in the
compute dtype and one kernel turns them into the row losses and, in place, their gradient
(loss_triton.py); elsewhere PyTorch does it on a float32 copy.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .loss_triton import AVAILABLE as KERNEL_AVAILABLE
from .loss_triton import cross_entropy_rows_
from .scan import resolve_backend

IGNORE_INDEX = -100
CHUNK_BYTES = 1 << 27  # one chunk's logits: 128 MiB (float32 on the PyTorch path, the compute dtype in the kernel)
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the kernel's logits (it computes in float32)


def _chunk_loss_and_gradient(logits: Tensor, target: Tensor, acc: torch.dtype):
    """The summed loss (in ``acc``) of a chunk's rows and its gradient with respect to their logits [n, V] (in the
    logits' dtype), computed in ``acc``."""
    dtype, logits = logits.dtype, logits.to(acc)
    valid = target != IGNORE_INDEX
    log_z = torch.logsumexp(logits, -1)
    safe = target.clamp(min=0)
    loss = ((log_z - logits.gather(1, safe[:, None])[:, 0]) * valid).sum()
    grad = logits.sub_(log_z[:, None]).exp_()  # softmax, in place
    grad[torch.arange(grad.shape[0], device=grad.device), safe] -= 1.0
    return loss, (grad * valid[:, None]).to(dtype)


def _loss_and_gradients(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int, fused: bool,
                        needs_hidden: bool, needs_weight: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """hidden: [R, d]; weight: [V, d] (same dtype); targets: [R] long, IGNORE_INDEX skipped; fused: each chunk
    through loss_triton's kernel. Returns (the summed cross-entropy, an fp32 scalar (fp64 for fp64 inputs), its
    gradient for hidden [R, d], for weight [V, d] in that accumulation dtype), a gradient not needed as an empty [0]."""
    acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    total = torch.zeros((), dtype=acc, device=hidden.device)
    d_hidden = torch.empty_like(hidden) if needs_hidden else hidden.new_empty(0)
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs_weight else weight.new_empty(0)
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start:start + chunk_rows]
            target = targets[start:start + chunk_rows]
            if fused:  # the kernel leaves the rows' gradient in place of their logits (compute dtype)
                grad = h @ weight.T
                total += cross_entropy_rows_(grad, target, IGNORE_INDEX).sum()
            else:
                loss, grad = _chunk_loss_and_gradient(h @ weight.T, target, acc)
                total += loss
            if needs_hidden:
                torch.mm(grad, weight, out=d_hidden[start:start + chunk_rows])
            if needs_weight:
                d_weight += (grad.T @ h).to(acc)
    return total, d_hidden, d_weight


def _scaled_gradients(d_hidden: Tensor, d_weight: Tensor, grad_total: Tensor, weight_dtype: torch.dtype,
                      needs_hidden: bool, needs_weight: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    return (d_hidden * grad_total.to(d_hidden.dtype) if needs_hidden else None,
            (d_weight * grad_total).to(weight_dtype) if needs_weight else None)


class _LinearCrossEntropy(torch.autograd.Function):
    """Eager: the loss and its gradients in the forward; the backward scales them."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int, fused: bool) -> Tensor:
        ctx.needs = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total, d_hidden, d_weight = _loss_and_gradients(hidden, weight, targets, chunk_rows, fused, *ctx.needs)
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        return *_scaled_gradients(*ctx.saved_tensors, grad_total, ctx.weight_dtype, *ctx.needs), None, None, None


# Traced (torch.compile, torch.export): the same computation as one opaque op, so that the compiler neither
# unrolls the chunks nor plans [rows, vocabulary] logits; its gradients are two more outputs, scaled in the
# backward. (A second copy of this code, e.g. a checkpoint's, re-registers the op.)
_loss_op = torch.library.custom_op("mm_rec::chunked_linear_cross_entropy", mutates_args=())(_loss_and_gradients)


@_loss_op.register_fake
def _(hidden, weight, targets, chunk_rows, fused, needs_hidden, needs_weight):
    acc = torch.promote_types(hidden.dtype, torch.float32)
    return (hidden.new_empty((), dtype=acc), hidden.new_empty(hidden.shape if needs_hidden else (0,)),
            weight.new_empty(weight.shape if needs_weight else (0,), dtype=acc))


def _op_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])
    ctx.weight_dtype, ctx.needs = inputs[1].dtype, (inputs[5], inputs[6])


def _op_backward(ctx, grad_total, _d_hidden, _d_weight):
    return *_scaled_gradients(*ctx.saved_tensors, grad_total, ctx.weight_dtype, *ctx.needs), None, None, None, None, None


_loss_op.register_autograd(_op_backward, setup_context=_op_setup)


def causal_lm_loss(hidden: Tensor, weight: Tensor, labels: Tensor, num_items_in_batch: Optional[Tensor | int] = None,
                   chunk_rows: Optional[int] = None, backend: str = "auto") -> Tensor:
    """Mean next-token cross-entropy of ``hidden @ weight.T`` against ``labels`` shifted by one,
    as transformers' causal-LM loss computes it (IGNORE_INDEX skipped; divided by
    ``num_items_in_batch`` when given, for gradient accumulation; NaN when no label is scored and
    ``num_items_in_batch`` is not given, with zero gradients), without the logits.

    hidden: [B, T, d]; weight: [V, d]; labels: [B, T] long. Under autocast the product runs
    in the autocast dtype; the loss and its accumulation are fp32. ``backend``: the scan's choices
    (``config.kernel_backend``); Triton runs each chunk's softmax in one kernel (float32, bfloat16 and
    float16 products; float64 stays on the PyTorch path).
    """
    B, T, d = hidden.shape
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif weight.dtype != hidden.dtype:
        hidden = hidden.to(weight.dtype)
    targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1).to(hidden.device)
    fused = KERNEL_AVAILABLE and hidden.dtype in FUSED_DTYPES and resolve_backend(backend, hidden.device) == "triton"
    logit_bytes = hidden.element_size() if fused else 4
    rows = chunk_rows or max(1, CHUNK_BYTES // (logit_bytes * weight.shape[0]))
    if torch.compiler.is_compiling():
        total = _loss_op(hidden.reshape(B * T, d), weight, targets, rows, fused, hidden.requires_grad,
                         weight.requires_grad)[0]
    else:
        total = _LinearCrossEntropy.apply(hidden.reshape(B * T, d), weight, targets, rows, fused)
    # total / divisor, as transformers' loss: NaN with nothing to score and no num_items_in_batch
    # (0 / 0). A zero divisor's gradient is taken as zero (transformers' is), not 0 * inf = NaN.
    if num_items_in_batch is None:
        divisor = (targets != IGNORE_INDEX).sum()
    elif isinstance(num_items_in_batch, Tensor):
        divisor = num_items_in_batch.to(total.device)
    else:  # a number: no tensor made from it (a copy to the device every step)
        return total / num_items_in_batch if num_items_in_batch else (total / 0.0).detach() + 0.0 * total
    empty = divisor == 0
    return torch.where(empty, (total / divisor).detach(), total / torch.where(empty, 1, divisor))
