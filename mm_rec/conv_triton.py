"""Triton kernels behind conv.py's dense path (every token real, no document start) on CUDA.

Importing this module never fails: without Triton, AVAILABLE is False and conv.py sums the window
as K shifted PyTorch products.

    c[r] = sum_{j<K} w[:, j] * E[r + K-1 - j],   E = [state, u]: [B, K-1 + T, C]

One program holds a [BLOCK_T, BLOCK_C] tile of one row. Its K shifted reads of E are K loads of
u (of state for the rows before u's first), served by the caches, so E is never built, forward or
backward, and the backward needs u, state and w alone. The forward adds the terms j = 0, 1, ... as
conv._window_sum does, each product rounded (no FMA contraction), so its float32 sums equal the
PyTorch path's bit for bit. (The interpreter rounds float32 to bfloat16 toward zero, where CUDA and
torch round to nearest even: interpreted, bfloat16 outputs may differ by one ulp.)
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

BLOCK_T, BLOCK_C = 64, 128

if AVAILABLE:

    @triton.jit
    def _window(u, state, s, cols, cmask, T, C, stride_t, K: tl.constexpr):
        """E[s] ([BLOCK_T, BLOCK_C], the compute dtype, 0 outside E) of one row: u[s - (K-1)] or state[s]."""
        in_u = (s >= K - 1) & (s < K - 1 + T)
        in_state = (s >= 0) & (s < K - 1)
        x = tl.load(u + (s - (K - 1))[:, None] * stride_t + cols[None, :], mask=in_u[:, None] & cmask[None, :], other=0.0)
        y = tl.load(state + s[:, None] * C + cols[None, :], mask=in_state[:, None] & cmask[None, :], other=0.0)
        return tl.where(in_u[:, None], x.to(state.dtype.element_ty), y)

    @triton.jit
    def _short_conv_fwd_kernel(u, state, weight, c, T, C, su_b, su_t, K: tl.constexpr, BLOCK_T: tl.constexpr,
                               BLOCK_C: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        u += b * su_b
        state += b * (K - 1) * C
        x = _window(u, state, rows + K - 1, cols, cmask, T, C, su_t, K)  # j = 0: the token itself
        acc = tl.load(weight + cols, mask=cmask, other=0.0)[None, :] * x
        for j in tl.static_range(1, K):
            w = tl.load(weight + j * C + cols, mask=cmask, other=0.0)
            acc = acc + w[None, :] * _window(u, state, rows + K - 1 - j, cols, cmask, T, C, su_t, K)
        tl.store(c + b * T * C + rows[:, None] * C + cols[None, :], acc.to(c.dtype.element_ty),
                 mask=(rows < T)[:, None] & cmask[None, :])

    @triton.jit
    def _short_conv_bwd_kernel(u, state, weight, dc, d_new, du, d_state, d_weight, T, C, su_b, su_t, sg_b, sg_t,
                               K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        # The tile's rows are E's rows s for dE (d_state below K - 1, du from there) and tokens r for d_weight.
        b = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1)
        rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        u += b * su_b
        dc += b * sg_b
        state += b * (K - 1) * C
        d_state += b * (K - 1) * C
        # dE[s] = sum_j w[:, j] dc[s - (K-1) + j] + d_new[s - T]: every output that read E[s], and the new state
        i = rows - T
        acc = tl.load(d_new + b * (K - 1) * C + i[:, None] * C + cols[None, :],
                      mask=((i >= 0) & (i < K - 1))[:, None] & cmask[None, :], other=0.0).to(state.dtype.element_ty)
        for j in tl.static_range(K):
            r = rows - (K - 1) + j
            g = tl.load(dc + r[:, None] * sg_t + cols[None, :], mask=((r >= 0) & (r < T))[:, None] & cmask[None, :],
                        other=0.0)
            acc += tl.load(weight + j * C + cols, mask=cmask, other=0.0)[None, :] * g.to(state.dtype.element_ty)
        s = rows[:, None]
        tl.store(d_state + s * C + cols[None, :], acc, mask=(s < K - 1) & cmask[None, :])
        tl.store(du + b * T * C + (s - (K - 1)) * C + cols[None, :], acc.to(du.dtype.element_ty),
                 mask=(s >= K - 1) & (s < K - 1 + T) & cmask[None, :])
        # d_weight[:, j] over this tile's tokens: sum_r dc[r] E[r + K-1 - j], summed over tiles and rows in torch
        g = tl.load(dc + rows[:, None] * sg_t + cols[None, :], mask=(rows < T)[:, None] & cmask[None, :],
                    other=0.0).to(state.dtype.element_ty)
        partial = d_weight + ((b * tl.num_programs(1) + tile) * K) * C + cols
        for j in tl.static_range(K):
            tl.store(partial + j * C, tl.sum(g * _window(u, state, rows + K - 1 - j, cols, cmask, T, C, su_t, K), axis=0),
                     mask=cmask)


def _tiles(T: int, C: int) -> Tuple[int, int]:
    return min(BLOCK_T, triton.next_power_of_2(max(T, 1))), min(BLOCK_C, triton.next_power_of_2(C))


def _rows_strided(t: Tensor) -> Tensor:
    """t itself where its channels are adjacent (any batch and row strides), else a contiguous copy."""
    return t if t.stride(2) == 1 else t.contiguous()


def short_conv_fwd(u: Tensor, state: Tensor, weight: Tensor) -> Tensor:
    """u: [B, T, C] (any float dtype); state: [B, K-1, C] and weight: [C, K] in the compute dtype
    (float32; float64 for float64 u), which accumulates. Returns c [B, T, C] in u's dtype."""
    B, T, C = u.shape
    K = weight.shape[1]
    u, state = _rows_strided(u), state.contiguous()
    c = torch.empty(B, T, C, dtype=u.dtype, device=u.device)
    bt, bc = _tiles(T, C)
    _short_conv_fwd_kernel[(B, triton.cdiv(T, bt), triton.cdiv(C, bc))](
        u, state, weight.t().contiguous(), c, T, C, u.stride(0), u.stride(1), K=K, BLOCK_T=bt, BLOCK_C=bc,
        enable_fp_fusion=False)
    return c


def short_conv_bwd(u: Tensor, state: Tensor, weight: Tensor, d_c: Tensor, d_new: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``short_conv_fwd`` and of the new state (E's last K - 1 rows; its gradient
    ``d_new`` [B, K-1, C]) for u (u's dtype), state and weight (the compute dtype). d_weight: per
    tile partial sums added up in torch, so the result does not depend on the order programs run."""
    B, T, C = u.shape
    K = weight.shape[1]
    u, d_c, state = _rows_strided(u), _rows_strided(d_c), state.contiguous()
    bt, bc = _tiles(T, C)
    tiles = triton.cdiv(T + K - 1, bt)
    du, d_state = torch.empty_like(u, memory_format=torch.contiguous_format), torch.empty_like(state)
    partial = torch.empty(B, tiles, K, C, dtype=weight.dtype, device=u.device)
    _short_conv_bwd_kernel[(B, tiles, triton.cdiv(C, bc))](
        u, state, weight.t().contiguous(), d_c, d_new.contiguous(), du, d_state, partial, T, C,
        u.stride(0), u.stride(1), d_c.stride(0), d_c.stride(1), K=K, BLOCK_T=bt, BLOCK_C=bc)
    return du, d_state, partial.sum((0, 1)).t()
