"""Triton kernels behind memory.py's ``route_segments`` on CUDA (docs/ARCHITECTURE.md section 2).

Importing this module never fails: without Triton, AVAILABLE is False and memory.py runs
``route_segments_torch``.

The fold's routing is the only sequential step of the memory: which slot each block of a
segment goes to depends on the slots at that segment's start, which depend on every earlier
fold. The sequential part is only the [S, d] slot keys carried from one segment to the next,
so each segment is two launches that spread its work over the GPU:

* ``_route_kernel``, one program per (row, chunk of BC blocks): the scores of the chunk's block
  summaries against the row's slot keys (fp32 products and sums, so the argmax agrees with the
  PyTorch reference) and their argmax (ties to the lowest slot).
* ``_fold_kernel``, one program per (row, slice of BD channels): the per-slot counts and each
  block's rank among its slot's blocks from the routes, the closed-form EMA weights, and the
  new slot keys of its channel slice (the learned ones where a document starts). The program
  of slice 0 also writes the weights and the per-slot decays.

It writes only the weights and the per-slot decays; memory.py turns them into the
differentiable slot trajectory with the scan op. Nothing here needs a gradient: the routing is
an argmax.
"""

import math
from typing import Tuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # CPU-only machines load the model without Triton
    AVAILABLE = False


if AVAILABLE:

    @triton.jit
    def _route_kernel(blocks, stride_b, stride_c, keys, best_at, C, S, D,
                      BC: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr):
        """blocks: one segment's summaries [B, C, D] (strides stride_b, stride_c, 1), keys [B, S, D]
        -> best_at [B, C] int32: the slot of each block."""
        b = tl.program_id(0).to(tl.int64)
        c0 = tl.program_id(1) * BC
        o_c = c0 + tl.arange(0, BC)
        o_s = tl.arange(0, BS)
        o_d = tl.arange(0, BD)
        mask_c = o_c < C
        mask_s = o_s < S
        scores = tl.zeros([BC, BS], dtype=tl.float32)
        for d0 in range(0, D, BD):
            mask_d = d0 + o_d < D
            k_tile = tl.load(keys + (b * S + o_s[:, None]) * D + d0 + o_d[None, :],
                             mask=mask_s[:, None] & mask_d[None, :], other=0.0)
            b_tile = tl.load(blocks + b * stride_b + o_c[:, None] * stride_c + d0 + o_d[None, :],
                             mask=mask_c[:, None] & mask_d[None, :], other=0.0)
            scores += tl.sum(b_tile[:, None, :] * k_tile[None, :, :], axis=2)
        scores = tl.where(mask_s[None, :], scores, float("-inf"))
        best = tl.argmax(scores, axis=1, tie_break_left=True)
        tl.store(best_at + b * C + o_c, best.to(tl.int32), mask=mask_c)

    @triton.jit
    def _chunk_routes(best_at, b, c0, o_c, o_s, C):
        """The one-hot routes [BC, BS] of blocks c0 .. c0 + BC (zero rows past C)."""
        mask_c = c0 + o_c < C
        best = tl.load(best_at + b * C + c0 + o_c, mask=mask_c, other=-1)
        return (o_s[None, :] == best[:, None]).to(tl.float32)

    @triton.jit
    def _fold_kernel(blocks, stride_b, stride_c, keys, init_keys, restart, best_at, weight, keep, C, S, D,
                     log2_decay, one_minus_decay, BC: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr):
        """From the routes best_at [B, C]: weight [B, C, S] and keep [B, S] of this fold (written by
        slice 0), and the new slot keys of channels d0 .. d0 + BD, in place in keys [B, S, D]
        (init_keys [S, D] where restart [B] is set)."""
        b = tl.program_id(0).to(tl.int64)
        d0 = tl.program_id(1) * BD
        o_c = tl.arange(0, BC)
        o_s = tl.arange(0, BS)
        o_d = d0 + tl.arange(0, BD)
        mask_s = o_s < S
        mask_d = o_d < D
        count = tl.zeros([BS], dtype=tl.float32)
        for c0 in range(0, C, BC):  # the per-slot counts m_j
            count += tl.sum(_chunk_routes(best_at, b, c0, o_c, o_s, C), axis=0)
        kept = tl.exp2(log2_decay * count)
        tile_mask = mask_s[:, None] & mask_d[None, :]
        at = (b * S + o_s[:, None]) * D + o_d[None, :]
        new = kept[:, None] * tl.load(keys + at, mask=tile_mask, other=0.0)
        before = tl.zeros([BS], dtype=tl.float32)  # blocks routed to each slot in earlier chunks
        for c0 in range(0, C, BC):  # the weights (1 - lam) lam^(m_j - rank) and the new keys
            mask_c = c0 + o_c < C
            route = _chunk_routes(best_at, b, c0, o_c, o_s, C)
            rank = tl.sum((tl.cumsum(route, axis=0) + before[None, :]) * route, axis=1)
            before += tl.sum(route, axis=0)
            m_of_block = tl.sum(route * count[None, :], axis=1)
            w = route * (one_minus_decay * tl.exp2(log2_decay * (m_of_block - rank)))[:, None]
            if d0 == 0:
                tl.store(weight + (b * C + c0 + o_c[:, None]) * S + o_s[None, :], w,
                         mask=mask_c[:, None] & mask_s[None, :])
            b_tile = tl.load(blocks + b * stride_b + (c0 + o_c[:, None]) * stride_c + o_d[None, :],
                             mask=mask_c[:, None] & mask_d[None, :], other=0.0)
            new += tl.sum(w[:, :, None] * b_tile[:, None, :], axis=0)
        if d0 == 0:
            tl.store(keep + b * S + o_s, kept, mask=mask_s)
        if tl.load(restart + b) != 0:  # a document starts: the learned slots again
            new = tl.load(init_keys + o_s[:, None] * D + o_d[None, :], mask=tile_mask, other=0.0)
        tl.store(keys + at, new, mask=tile_mask)


def route_segments_triton(block_keys: Tensor, slot_keys: Tensor, init_keys: Tensor, restart: Tensor,
                          decay: float) -> Tuple[Tensor, Tensor]:
    """Same contract as memory.route_segments_torch: block_keys [B, K, C, d], slot_keys [B, S, d],
    init_keys [S, d] (fp32), restart [B, K] bool -> (weight [B, K-1, C, S], keep [B, K-1, S])."""
    B, K, C, D = block_keys.shape
    S = slot_keys.shape[1]
    device = block_keys.device
    blocks = block_keys.float()  # read in place, by strides (the model passes a slice of its summaries)
    if blocks.stride(-1) != 1:
        blocks = blocks.contiguous()
    keys = slot_keys.float().contiguous().clone()  # the working copy of the slot keys
    init_keys = init_keys.float().contiguous()
    restarts = restart.to(torch.int8).t().contiguous()  # [K, B]
    weight = torch.empty(K - 1, B, C, S, dtype=torch.float32, device=device)
    keep = torch.empty(K - 1, B, S, dtype=torch.float32, device=device)
    best = torch.empty(B, C, dtype=torch.int32, device=device)
    BS = triton.next_power_of_2(S)
    BC = min(triton.next_power_of_2(C), max(1, 256 // BS))  # [BC, BS, BD] products stay 16k values
    BD = min(64, triton.next_power_of_2(D))
    log2_decay, one_minus_decay = math.log2(decay), 1.0 - decay
    for s in range(1, K):
        segment = blocks[:, s - 1]  # [B, C, D], a view
        strides = (segment.stride(0), segment.stride(1))
        _route_kernel[(B, triton.cdiv(C, BC))](segment, *strides, keys, best, C, S, D, BC=BC, BS=BS, BD=BD,
                                               num_warps=4)
        _fold_kernel[(B, triton.cdiv(D, BD))](segment, *strides, keys, init_keys, restarts[s], best, weight[s - 1],
                                              keep[s - 1], C, S, D, log2_decay, one_minus_decay,
                                              BC=BC, BS=BS, BD=BD, num_warps=4)
    return weight.transpose(0, 1), keep.transpose(0, 1)
