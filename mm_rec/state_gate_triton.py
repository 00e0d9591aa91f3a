"""Triton kernels behind state_gate.py's walk over tokens on CUDA (recurrence_gate="state").

Importing this module never fails: without Triton, AVAILABLE is False and state_gate.py walks
the tokens in a PyTorch loop.
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
