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
    def _load_inputs(a, g, z, real, reset, N, D: tl.constexpr, BLOCK: tl.constexpr):
        """This program's BLOCK elements: (offsets, mask, is_real, is_reset, a, g, z in fp32)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        row = offs // D
        is_real = tl.load(real + row, mask=mask, other=0) != 0
        is_reset = tl.load(reset + row, mask=mask, other=0) != 0
        a_ = tl.load(a + offs, mask=mask, other=0.0).to(tl.float32)
        g_ = tl.load(g + offs, mask=mask, other=0.0).to(tl.float32)
        z_ = tl.load(z + offs, mask=mask, other=0.0).to(tl.float32)
        return offs, mask, is_real, is_reset, a_, g_, z_

    @triton.jit
    def _recurrence_inputs_fwd_kernel(a, g, z, real, reset, x, carry, N, D: tl.constexpr, lo, hi,
                                      BLOCK: tl.constexpr):
        offs, mask, is_real, is_reset, a_, g_, z_ = _load_inputs(a, g, z, real, reset, N, D, BLOCK)
        lg, _ = _log_gamma(a_, lo, hi)
        lg = tl.where(is_real, lg, 0.0)
        gate = 1.0 / (1.0 + tl.exp(-g_))
        tl.store(x + offs, -_expm1(lg) * gate * z_, mask=mask)
        tl.store(carry + offs, tl.where(is_reset, float("-inf"), lg), mask=mask)

    @triton.jit
    def _recurrence_inputs_bwd_kernel(a, g, z, real, reset, d_x, d_carry, d_a, d_g, d_z, N, D: tl.constexpr, lo, hi,
                                      BLOCK: tl.constexpr):
        offs, mask, is_real, is_reset, a_, g_, z_ = _load_inputs(a, g, z, real, reset, N, D, BLOCK)
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


def recurrence_inputs_fwd(a: Tensor, g: Tensor, z: Tensor, real: Tensor, reset: Tensor, lo: float,
                          hi: float) -> Tuple[Tensor, Tensor]:
    """a, g, z: [B, T, d] contiguous; real, reset: [B, T] bool. Returns (x, carry) fp32 [B, T, d]."""
    x = torch.empty(a.shape, dtype=torch.float32, device=a.device)
    carry = torch.empty_like(x)
    N, D = a.numel(), a.shape[-1]
    _recurrence_inputs_fwd_kernel[(triton.cdiv(N, BLOCK),)](
        a, g, z, _flags(real), _flags(reset), x, carry, N, D, lo, hi, BLOCK=BLOCK)
    return x, carry


def recurrence_inputs_bwd(a: Tensor, g: Tensor, z: Tensor, real: Tensor, reset: Tensor, d_x: Tensor, d_carry: Tensor,
                          lo: float, hi: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``recurrence_inputs_fwd`` for a, g, z (in their dtypes)."""
    d_a, d_g, d_z = torch.empty_like(a), torch.empty_like(g), torch.empty_like(z)
    N, D = a.numel(), a.shape[-1]
    _recurrence_inputs_bwd_kernel[(triton.cdiv(N, BLOCK),)](
        a, g, z, _flags(real), _flags(reset), d_x.contiguous(), d_carry.contiguous(), d_a, d_g, d_z, N, D, lo, hi,
        BLOCK=BLOCK)
    return d_a, d_g, d_z


# ----------------------------------------------------------------------------- the state gate's loop
#
# recurrence_gate="state": h_t = gamma_t h'_t + s_t (1 - gamma_t) z_t, s_t = sigmoid(W h'_t + b),
# h'_t = keep_t h_(t-1). Each step needs all of h_(t-1), so one program walks one row's tokens in
# order, the matrix-vector product in [BJ, BK] tiles of W read from L2 each step. The row's
# previous state is read back from H (written by the same program a step earlier, hence the
# barrier, the L1-bypassing loads and no software pipelining of the loop). The backward walks t in
# reverse the same way with W^T.

STATE_BJ, STATE_BK, STATE_WARPS = 64, 128, 4

if AVAILABLE:

    @triton.jit
    def _state_gate_fwd_kernel(gamma, zo, keep, weight, bias, h0, H, S, T, D: tl.constexpr, DP: tl.constexpr,
                               BJ: tl.constexpr, BK: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        rows = b * T * D
        for t in range(0, T):
            keep_t = tl.load(keep + b * T + t)
            here = rows + t * D
            for j0 in tl.static_range(0, DP, BJ):
                j = j0 + tl.arange(0, BJ)
                jm = j < D
                acc = tl.load(bias + j, mask=jm, other=0.0)
                for k0 in tl.static_range(0, DP, BK):
                    k = k0 + tl.arange(0, BK)
                    km = k < D
                    prev = (tl.load(h0 + b * D + k, mask=km & (t == 0), other=0.0, cache_modifier=".cg")
                            + tl.load(H + here - D + k, mask=km & (t > 0), other=0.0, cache_modifier=".cg"))
                    w = tl.load(weight + j[:, None] * D + k[None, :], mask=jm[:, None] & km[None, :], other=0.0)
                    acc += tl.sum(w * (keep_t * prev)[None, :], axis=1)
                prev_j = (tl.load(h0 + b * D + j, mask=jm & (t == 0), other=0.0, cache_modifier=".cg")
                          + tl.load(H + here - D + j, mask=jm & (t > 0), other=0.0, cache_modifier=".cg"))
                s = 1.0 / (1.0 + tl.exp(-acc))
                g = tl.load(gamma + here + j, mask=jm, other=0.0)
                x = tl.load(zo + here + j, mask=jm, other=0.0)
                tl.store(S + here + j, s, mask=jm)
                tl.store(H + here + j, g * (keep_t * prev_j) + s * x, mask=jm)
            tl.debug_barrier()  # this step's h is whole before the next step reads it

    @triton.jit
    def _state_gate_bwd_kernel(grad_H, da_per_g, gamma, keep, weight, G, DA, carry, T, D: tl.constexpr,
                               DP: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr):
        # carry: [B, D] zeros on entry; dh_(t-1) during the walk, d h0 at the end
        b = tl.program_id(0).to(tl.int64)
        rows = b * T * D
        d = tl.arange(0, DP)
        dm = d < D
        for step in range(0, T):
            t = T - 1 - step
            here = rows + t * D
            g = tl.load(grad_H + here + d, mask=dm, other=0.0) + tl.load(carry + b * D + d, mask=dm, other=0.0,
                                                                         cache_modifier=".cg")
            tl.store(G + here + d, g, mask=dm)
            tl.store(DA + here + d, g * tl.load(da_per_g + here + d, mask=dm, other=0.0), mask=dm)
            tl.debug_barrier()  # DA[t] whole before W^T da reads it; carry read before it is overwritten
            keep_t = tl.load(keep + b * T + t)
            for j0 in tl.static_range(0, DP, BJ):
                j = j0 + tl.arange(0, BJ)
                jm = j < D
                acc = tl.zeros([BJ], dtype=tl.float32)
                for i0 in tl.static_range(0, DP, BK):
                    i = i0 + tl.arange(0, BK)
                    im = i < D
                    da = tl.load(DA + here + i, mask=im, other=0.0, cache_modifier=".cg")
                    w = tl.load(weight + i[:, None] * D + j[None, :], mask=im[:, None] & jm[None, :], other=0.0)
                    acc += tl.sum(w * da[:, None], axis=0)
                g_j = tl.load(G + here + j, mask=jm, other=0.0, cache_modifier=".cg")
                tl.store(carry + b * D + j, keep_t * (tl.load(gamma + here + j, mask=jm, other=0.0) * g_j + acc),
                         mask=jm)
            tl.debug_barrier()  # carry whole before the previous step reads it


def _state_gate_tiles(D: int) -> dict:
    """The kernels' padded width and tiles for d = D, and their launch options."""
    DP = triton.next_power_of_2(D)
    return dict(DP=DP, BJ=min(STATE_BJ, DP), BK=min(STATE_BK, DP), num_warps=STATE_WARPS, num_stages=1)


def state_gate_fwd(gamma: Tensor, zo: Tensor, keep: Tensor, weight: Tensor, bias: Tensor,
                   h0: Tensor) -> Tuple[Tensor, Tensor]:
    """gamma, zo = (1 - gamma) z: [B, T, d] fp32; keep: [B, T] fp32; weight [d, d], bias [d], h0 [B, d]
    fp32. Returns (H, S) [B, T, d] fp32: the states and the gate values."""
    B, T, D = gamma.shape
    H, S = torch.empty_like(gamma), torch.empty_like(gamma)
    _state_gate_fwd_kernel[(B,)](gamma.contiguous(), zo.contiguous(), keep.contiguous(), weight.contiguous(),
                                 bias.contiguous(), h0.contiguous(), H, S, T, D, **_state_gate_tiles(D))
    return H, S


def state_gate_bwd(grad_H: Tensor, da_per_g: Tensor, gamma: Tensor, keep: Tensor,
                   weight: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The backward walk. Returns (G, DA, d h0): G_t = dL/dh_t (incoming plus carried), DA_t = G_t *
    da_per_g_t (the gradient of W h'_t + b), and the gradient of h0."""
    B, T, D = gamma.shape
    G, DA = torch.empty_like(gamma), torch.empty_like(gamma)
    carry = gamma.new_zeros(B, D)
    _state_gate_bwd_kernel[(B,)](grad_H.contiguous(), da_per_g.contiguous(), gamma.contiguous(), keep.contiguous(),
                                 weight.contiguous(), G, DA, carry, T, D, **_state_gate_tiles(D))
    return G, DA, carry
