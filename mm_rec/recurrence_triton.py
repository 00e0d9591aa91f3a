"""Triton kernels behind recurrence.py's ``recurrence_inputs`` on CUDA (docs/ARCHITECTURE.md section 1).

Importing this module never fails: without Triton, AVAILABLE is False and recurrence.py computes
the same formulas with PyTorch operations.

One elementwise pass turns the block's projections into the scan's two inputs, so the
float32 intermediates of the chain (log-sigmoid, clamp, masks, expm1, sigmoid, products)
never reach memory, forward or backward:

    log_gamma = clamp(logsigmoid(a), LOG_GAMMA_MIN, LOG_GAMMA_MAX), 0 at padding
    x         = -expm1(log_gamma) * sigmoid(g) * z
    carry     = log_gamma, -inf where a document starts (a reset)
"""

from typing import Tuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # CPU-only machines load the model without Triton
    AVAILABLE = False

BLOCK = 1024


if AVAILABLE:

    @triton.jit
    def _log1p(e):
        # log(1 + e) to a few ulps for small e (Kahan): log(u) * e / (u - 1) with u = 1 + e rounded
        u = 1.0 + e
        return tl.where(u == 1.0, e, tl.log(u) * e / (u - 1.0))

    @triton.jit
    def _expm1(x):
        # exp(x) - 1 to a few ulps near 0 (Kahan): (u - 1) * x / log(u) with u = exp(x) rounded
        u = tl.exp(x)
        return tl.where(u == 1.0, x, tl.where(u - 1.0 == -1.0, -1.0, (u - 1.0) * x / tl.log(u)))

    @triton.jit
    def _log_gamma(a, lo, hi):
        """(clamped log-sigmoid, unclamped log-sigmoid) of a."""
        ls = tl.minimum(a, 0.0) - _log1p(tl.exp(-tl.abs(a)))
        return tl.minimum(tl.maximum(ls, lo), hi), ls

    @triton.jit
    def _load_inputs(a, g, z, real, reset, N, D: tl.constexpr, sa, sg, sz, BLOCK: tl.constexpr):
        """This program's BLOCK elements: (offsets, mask, is_real, is_reset, a, g, z in fp32).
        sa, sg, sz: the distance between tokens (rows of d) of a, g and z: d for a tensor of its own,
        wider for a slice of a wider projection, which is read in place."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        row, col = offs // D, offs % D
        is_real = tl.load(real + row, mask=mask, other=0) != 0
        is_reset = tl.load(reset + row, mask=mask, other=0) != 0
        a_ = tl.load(a + row * sa + col, mask=mask, other=0.0).to(tl.float32)
        g_ = tl.load(g + row * sg + col, mask=mask, other=0.0).to(tl.float32)
        z_ = tl.load(z + row * sz + col, mask=mask, other=0.0).to(tl.float32)
        return offs, mask, is_real, is_reset, a_, g_, z_

    @triton.jit
    def _recurrence_inputs_fwd_kernel(a, g, z, real, reset, x, carry, N, D: tl.constexpr, sa, sg, sz, lo, hi,
                                      BLOCK: tl.constexpr):
        offs, mask, is_real, is_reset, a_, g_, z_ = _load_inputs(a, g, z, real, reset, N, D, sa, sg, sz, BLOCK)
        lg, _ = _log_gamma(a_, lo, hi)
        lg = tl.where(is_real, lg, 0.0)
        gate = 1.0 / (1.0 + tl.exp(-g_))
        tl.store(x + offs, -_expm1(lg) * gate * z_, mask=mask)
        tl.store(carry + offs, tl.where(is_reset, float("-inf"), lg), mask=mask)

    @triton.jit
    def _recurrence_inputs_bwd_kernel(a, g, z, real, reset, d_x, d_carry, d_a, d_g, d_z, N, D: tl.constexpr,
                                      sa, sg, sz, lo, hi, BLOCK: tl.constexpr):
        offs, mask, is_real, is_reset, a_, g_, z_ = _load_inputs(a, g, z, real, reset, N, D, sa, sg, sz, BLOCK)
        dx = tl.load(d_x + offs, mask=mask, other=0.0).to(tl.float32)
        dc = tl.load(d_carry + offs, mask=mask, other=0.0).to(tl.float32)
        lg, ls = _log_gamma(a_, lo, hi)
        lg = tl.where(is_real, lg, 0.0)
        gamma = tl.exp(lg)
        one_minus_gamma = -_expm1(lg)
        gate = 1.0 / (1.0 + tl.exp(-g_))
        d_lg = tl.where(is_reset, 0.0, dc) - dx * gamma * gate * z_
        inside = (ls >= lo) & (ls <= hi) & is_real
        sig_neg = 1.0 / (1.0 + tl.exp(a_))  # d logsigmoid(a) / da = sigmoid(-a)
        tl.store(d_a + offs, tl.where(inside, d_lg * sig_neg, 0.0).to(d_a.dtype.element_ty), mask=mask)
        tl.store(d_g + offs, (dx * one_minus_gamma * z_ * gate * (1.0 - gate)).to(d_g.dtype.element_ty), mask=mask)
        tl.store(d_z + offs, (dx * one_minus_gamma * gate).to(d_z.dtype.element_ty), mask=mask)


def _flags(t: Tensor) -> Tensor:
    return t.to(torch.int8).contiguous()


def token_rows(t: Tensor) -> Tensor:
    """t [B, T, d] itself where its tokens are evenly spaced rows of adjacent channels (a contiguous
    tensor, or a slice of a wider projection's last axis), else a contiguous copy."""
    B, T, _ = t.shape
    if t.stride(2) == 1 and (B == 1 or t.stride(0) == T * t.stride(1)):
        return t
    return t.contiguous()


def recurrence_inputs_fwd(a: Tensor, g: Tensor, z: Tensor, real: Tensor, reset: Tensor, lo: float,
                          hi: float) -> Tuple[Tensor, Tensor]:
    """a, g, z: [B, T, d] as ``token_rows`` returns them; real, reset: [B, T] bool.
    Returns (x, carry) fp32 [B, T, d]."""
    x = torch.empty(a.shape, dtype=torch.float32, device=a.device)
    carry = torch.empty_like(x)
    N, D = a.numel(), a.shape[-1]
    _recurrence_inputs_fwd_kernel[(triton.cdiv(N, BLOCK),)](
        a, g, z, _flags(real), _flags(reset), x, carry, N, D, a.stride(1), g.stride(1), z.stride(1), lo, hi, BLOCK=BLOCK)
    return x, carry


def recurrence_inputs_bwd(a: Tensor, g: Tensor, z: Tensor, real: Tensor, reset: Tensor, d_x: Tensor, d_carry: Tensor,
                          lo: float, hi: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``recurrence_inputs_fwd`` for a, g, z (in their dtypes, contiguous)."""
    d_a, d_g, d_z = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (a, g, z))
    N, D = a.numel(), a.shape[-1]
    _recurrence_inputs_bwd_kernel[(triton.cdiv(N, BLOCK),)](
        a, g, z, _flags(real), _flags(reset), d_x.contiguous(), d_carry.contiguous(), d_a, d_g, d_z, N, D,
        a.stride(1), g.stride(1), z.stride(1), lo, hi, BLOCK=BLOCK)
    return d_a, d_g, d_z


# ----------------------------------------------------------------------------- the state gate's loop
