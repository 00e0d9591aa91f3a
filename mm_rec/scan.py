"""The scan op: h_t = x_t + gamma_t * h_{t-1} over [B, T, D] (docs/ARCHITECTURE.md section 4).

Public API:
    scan(x, log_gamma, initial_state=None, output_final_state=False, backend="auto")
    associative_scan_exponential(gamma)

Decays are given in log space. ``log_gamma = -inf`` at a position is a *reset*:
gamma = 0 there, so the state forgets everything before it (packed documents).

Backends:
    "torch"  - chunked reference in pure PyTorch; runs everywhere (the CPU path).
    "triton" - Triton kernels (``scan_triton.py``); CUDA, or CPU under TRITON_INTERPRET=1.
    "auto"   - "triton" on CUDA tensors when Triton is importable, else "torch".

Both are registered as ``torch.library`` custom ops (``mm_rec::scan_fwd`` /
``mm_rec::scan_bwd``) with fake implementations, so ``torch.compile`` traces the model
without graph breaks. In eager mode the same forward and backward run under a plain
``autograd.Function``, which skips the custom-op dispatch and its host time
(docs/ARCHITECTURE.md section 4). The backward is itself a reverse scan, so only the decays and the
output are saved, never a [T, T] weight matrix.

Dtype policy: accumulation is float32 (float64 for float64 inputs); ``h`` is returned in
``x.dtype`` and the final state in the accumulation dtype.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .scan_triton import AVAILABLE as TRITON_AVAILABLE

BACKENDS = ("auto", "triton", "torch")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def cumulative_log_decay(log_gamma: Tensor, dim: int = 1) -> Tensor:
    """Inclusive prefix sum of log-decays in the accumulation dtype: log prod_{r<=t} gamma_r."""
    return log_gamma.to(accumulation_dtype(log_gamma.dtype)).cumsum(dim)


def associative_scan_exponential(gamma: Tensor, dim: int = 1) -> Tensor:
    """Cumulative product of decays, computed in log space: out_t = prod_{r<=t} gamma_r.

    gamma: [..., T, ...] with values in [0, 1]; returned in the accumulation dtype.
    On CUDA this runs the Triton kernel; elsewhere ``exp(cumsum(log gamma))``.
    """
    if gamma.is_floating_point() is False:
        raise ValueError(f"gamma must be a floating tensor, got dtype {gamma.dtype}")
    if gamma.is_cuda and TRITON_AVAILABLE and gamma.dim() == 3 and dim == 1:
        from .scan_triton import cumprod_exp

        return cumprod_exp(gamma)
    return torch.exp(cumulative_log_decay(torch.log(gamma), dim))


# ---------------------------------------------------------------------------------------
# The PyTorch reference: chunked, two levels
# ---------------------------------------------------------------------------------------

def _chunked_scan_torch(x: Tensor, log_gamma: Tensor, h0: Tensor) -> Tuple[Tensor, Tensor]:
    """x, log_gamma: [B, T, D]; h0: [B, D] (accumulation dtype). Returns (h [B,T,D] acc, h_T).

    Two levels over chunks of about sqrt(T) steps, so the loops are O(sqrt(T)) steps of
    whole-tensor work: every chunk is scanned from a zero state (all chunks at once, one step
    at a time), the cumulative decay inside each chunk is exp(cumsum(log gamma))
    (``associative_scan_exponential``), and the carries pass from chunk to chunk. Resets (-inf)
    need nothing special: exp(-inf) = 0 cuts every product across them.
    """
    acc = h0.dtype
    B, T, D = x.shape
    if T == 1:  # a decode step
        h = x.to(acc) + torch.exp(log_gamma.to(acc)) * h0[:, None]
        return h, h[:, 0].clone()
    C = max(1, math.isqrt(T))
    n = -(-T // C)
    pad = (0, 0, 0, n * C - T)  # padded steps: gamma = 1, x = 0, so the end state is h_T
    xs = torch.nn.functional.pad(x.to(acc), pad).view(B, n, C, D)
    log_gammas = torch.nn.functional.pad(log_gamma.to(acc), pad).view(B, n, C, D)
    gammas = torch.exp(log_gammas)
    decay = torch.exp(cumulative_log_decay(log_gammas, dim=2))  # prod of gamma inside the chunk
    h = xs[:, :, 0]
    local = [h]
    for t in range(1, C):
        h = xs[:, :, t] + gammas[:, :, t] * h
        local.append(h)
    local = torch.stack(local, 2)  # [B, n, C, D]: each chunk from a zero state
    carry, carries = h0, []
    for c in range(n):
        carries.append(carry)
        carry = local[:, c, -1] + decay[:, c, -1] * carry
    h = local + decay * torch.stack(carries, 1)[:, :, None]
    return h.view(B, n * C, D)[:, :T].contiguous(), carry


def _reverse_decays(log_gamma: Tensor) -> Tensor:
    """The decays of the backward scan, time-reversed: step t of the gradient recursion
    g_t = dh_t + gamma_{t+1} g_{t+1} decays by gamma_{t+1} (1 at the last step)."""
    shifted = torch.cat([log_gamma[:, 1:], torch.zeros_like(log_gamma[:, :1])], dim=1)
    return shifted.flip(1)


def _backward_from_reverse_scan(grad_state: Tensor, h: Tensor, log_gamma: Tensor, h0: Tensor):
    """Turn g (the total gradient reaching each h_t) into the input gradients."""
    h_prev = torch.cat([h0[:, None].to(h.dtype), h[:, :-1]], dim=1)
    gamma = torch.exp(log_gamma.to(grad_state.dtype))
    d_log_gamma = grad_state * gamma * h_prev.to(grad_state.dtype)
    d_h0 = grad_state[:, 0] * gamma[:, 0]
    return d_log_gamma, d_h0


# ---------------------------------------------------------------------------------------
# Backends, the custom ops (for torch.compile) and the eager autograd path
# ---------------------------------------------------------------------------------------

def _forward_impl(x: Tensor, log_gamma: Tensor, h0: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor]:
    """h0 None means zeros; the Triton kernel then skips reading it."""
    if backend == "triton":
        from .scan_triton import scan_fwd

        return scan_fwd(x, log_gamma, h0)
    if h0 is None:
        h0 = x.new_zeros(x.shape[0], x.shape[2], dtype=accumulation_dtype(x.dtype))
    h, h_T = _chunked_scan_torch(x, log_gamma, h0)
    return h.to(x.dtype), h_T


def _backward_impl(grad_h: Tensor, grad_h_T: Optional[Tensor], h: Tensor, log_gamma: Tensor, h0: Optional[Tensor],
                   backend: str) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(d_x, d_log_gamma, d_h0); grad_h_T None means zeros; d_h0 is None when h0 is."""
    if backend == "triton":
        from .scan_triton import scan_bwd

        return scan_bwd(grad_h, grad_h_T, h, log_gamma, h0)
    acc = accumulation_dtype(grad_h.dtype)
    zeros = grad_h.new_zeros(grad_h.shape[0], grad_h.shape[2], dtype=acc)
    start = zeros if grad_h_T is None else grad_h_T.to(acc)
    grad_state, _ = _chunked_scan_torch(grad_h.flip(1), _reverse_decays(log_gamma), start)
    grad_state = grad_state.flip(1)
    d_log_gamma, d_h0 = _backward_from_reverse_scan(grad_state, h, log_gamma, zeros if h0 is None else h0)
    return grad_state.to(grad_h.dtype), d_log_gamma.to(log_gamma.dtype), None if h0 is None else d_h0.to(h0.dtype)


@torch.library.custom_op("mm_rec::scan_fwd", mutates_args=())
def _scan_fwd(x: Tensor, log_gamma: Tensor, h0: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor]:
    return _forward_impl(x, log_gamma, h0, backend)


@_scan_fwd.register_fake
def _(x, log_gamma, h0, backend):
    return torch.empty_like(x), x.new_empty(x.shape[0], x.shape[2], dtype=accumulation_dtype(x.dtype))


@torch.library.custom_op("mm_rec::scan_bwd", mutates_args=())
def _scan_bwd(
    grad_h: Tensor, grad_h_T: Optional[Tensor], h: Tensor, log_gamma: Tensor, h0: Optional[Tensor], backend: str
) -> Tuple[Tensor, Tensor, Tensor]:
    """d_h0 is an empty tensor when h0 is None (custom ops cannot return None)."""
    d_x, d_log_gamma, d_h0 = _backward_impl(grad_h, grad_h_T, h, log_gamma, h0, backend)
    return d_x, d_log_gamma, grad_h.new_empty(0) if d_h0 is None else d_h0


@_scan_bwd.register_fake
def _(grad_h, grad_h_T, h, log_gamma, h0, backend):
    d_h0 = grad_h.new_empty(0) if h0 is None else torch.empty_like(h0)
    return torch.empty_like(grad_h), torch.empty_like(log_gamma), d_h0


def _setup_context(ctx, inputs, output):
    _, log_gamma, h0, backend = inputs
    h, _ = output
    ctx.save_for_backward(h, log_gamma, h0)
    ctx.backend = backend


def _incoming(ctx, grad_h, grad_h_T):
    h, log_gamma, h0 = ctx.saved_tensors
    grad_h = torch.zeros_like(h) if grad_h is None else grad_h.contiguous()
    grad_h_T = None if grad_h_T is None else grad_h_T.contiguous()
    return grad_h, grad_h_T, h, log_gamma, h0


def _backward(ctx, grad_h, grad_h_T):
    grad_h, grad_h_T, h, log_gamma, h0 = _incoming(ctx, grad_h, grad_h_T)
    d_x, d_log_gamma, d_h0 = _scan_bwd(grad_h, grad_h_T, h, log_gamma, h0, ctx.backend)
    return d_x, d_log_gamma, (None if h0 is None else d_h0), None


_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerScan(torch.autograd.Function):
    """The same forward and backward without the custom-op dispatch, for eager mode, where the
    dispatch costs host time on every call (research/bench_kernels.py prints both paths' host
    time). torch.compile sees the custom ops."""

    @staticmethod
    def forward(ctx, x, log_gamma, h0, backend):
        h, h_T = _forward_impl(x, log_gamma, h0, backend)
        _setup_context(ctx, (x, log_gamma, h0, backend), (h, h_T))
        return h, h_T

    @staticmethod
    def backward(ctx, grad_h, grad_h_T):
        d_x, d_log_gamma, d_h0 = _backward_impl(*_incoming(ctx, grad_h, grad_h_T), ctx.backend)
        return d_x, d_log_gamma, d_h0, None


# ---------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------

def resolve_backend(backend: str, device: torch.device) -> str:
    """Pick the backend that will run on tensors of ``device``; raise if a forced one cannot. The one
    rule for every kernel of the model (the scan, the recurrence's inputs, the state gate's walk and
    the memory's routing), which ``config.kernel_backend`` chooses for all of them at once."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    triton_runs = TRITON_AVAILABLE and (device.type == "cuda" or interpreted)
    if backend == "triton" and not triton_runs:
        why = ("triton is not importable" if not TRITON_AVAILABLE
               else f"tensors are on {device.type}, not CUDA (set TRITON_INTERPRET=1 to interpret on CPU)")
        raise ValueError(f"backend='triton' cannot run: {why}; use backend='torch' or 'auto'")
    if backend == "auto":
        if device.type == "cuda" and TRITON_AVAILABLE:
            return "triton"
        return "torch"
    return backend


def scan(
    x: Tensor,
    log_gamma: Tensor,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> Tuple[Tensor, Optional[Tensor]]:
    """h_t = x_t + exp(log_gamma_t) * h_{t-1}, h_{-1} = initial_state (zeros if None).

    x, log_gamma: [B, T, D], floating (fp32/bf16/fp16/fp64), same shape.
    initial_state: [B, D] or None.
    Returns (h [B, T, D] in x.dtype, h_T [B, D] in the accumulation dtype or None).
    """
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, D], got shape {tuple(x.shape)}")
    if log_gamma.shape != x.shape:
        raise ValueError(f"log_gamma must have the shape of x {tuple(x.shape)}, got {tuple(log_gamma.shape)}")
    for name, t in (("x", x), ("log_gamma", log_gamma)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    B, T, D = x.shape
    acc = accumulation_dtype(x.dtype)
    h0 = None
    if initial_state is not None:
        if initial_state.shape != (B, D):
            raise ValueError(f"initial_state must be [B, D] = {(B, D)}, got {tuple(initial_state.shape)}")
        h0 = initial_state.to(acc).contiguous()
    chosen = resolve_backend(backend, x.device)
    if T == 0:
        h_T = x.new_zeros(B, D, dtype=acc) if h0 is None else h0
        return x.new_empty(B, 0, D), (h_T if output_final_state else None)
    op = _scan_fwd if torch.compiler.is_compiling() else _EagerScan.apply
    h, h_T = op(x.contiguous(), log_gamma.contiguous(), h0, chosen)
    return h, (h_T if output_final_state else None)
