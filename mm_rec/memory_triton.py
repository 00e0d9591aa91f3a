"""Triton kernel behind memory.py's ``route_segments`` on CUDA (docs/ARCHITECTURE.md section 2).

Importing this module never fails: without Triton, AVAILABLE is False and memory.py runs
``route_segments_torch``.

The fold's routing is the only sequential step of the memory: which slot each block of a
segment goes to depends on the slots at that segment's start, which depend on every
earlier fold. One program per row walks the segments in order, with the row's slot keys
[S, d] in a working buffer: scores of the segment's C block summaries against the slots (fp32
products and sums, so the argmax agrees with the PyTorch reference), the argmax (ties to the
lowest slot), the closed-form EMA weights, and the updated slots. The blocks go by in chunks
of BC, so the program's registers do not grow with C (C = 512 with blocks of one token). It writes only the
weights and the per-slot decays; memory.py turns them into the differentiable slot
trajectory with the scan op. Nothing here needs a gradient: the routing is an argmax.
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
    def _chunk_weights(best_at, rank_at, count, row_c, c0, o_c, o_s, log2_decay, one_minus_decay, C: tl.constexpr):
        """The fold weights [BC, BS] of blocks c0 .. c0 + BC (zero past C), from their stored slot and
        rank and the segment's per-slot counts: (1 - lam) lam^(m_j - rank) at the block's slot j."""
        mask_c = c0 + o_c < C
        best = tl.load(best_at + row_c + c0 + o_c, mask=mask_c, other=-1)
        rank = tl.load(rank_at + row_c + c0 + o_c, mask=mask_c, other=0.0)
        route = (o_s[None, :] == best[:, None]).to(tl.float32)
        m_of_block = tl.sum(route * count[None, :], axis=1)
        return route * (one_minus_decay * tl.exp2(log2_decay * (m_of_block - rank)))[:, None]

    @triton.jit
    def _route_segments_kernel(
        block_keys, keys, init_keys, restart, weight, keep, best_at, rank_at,
        K, log2_decay, one_minus_decay,
        C: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
        BC: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
    ):
        """block_keys [B, K, C, D], keys [B, S, D] (the slots of segment 0, updated in place),
        init_keys [S, D], restart [B, K] int8 -> weight [B, K - 1, C, S], keep [B, K - 1, S]; fp32.
        best_at, rank_at [B, C]: scratch (each block's slot, and its 1-based rank among that slot's blocks).

        Per segment, two passes over the blocks in chunks of BC (so the [BC, BS, BD] products stay
        small whatever C is): scores, argmax and running per-slot counts; then, the counts known,
        the EMA weights and the new slot keys, one [S, BD] slice of them at a time."""
        b = tl.program_id(0).to(tl.int64)
        o_c = tl.arange(0, BC)
        o_s = tl.arange(0, BS)
        o_d = tl.arange(0, BD)
        mask_s = o_s < S
        row_keys = keys + b * S * D
        for s in range(1, K):
            blocks_at = block_keys + ((b * K + s - 1) * C) * D
            count = tl.zeros([BS], dtype=tl.float32)
            for c0 in range(0, C, BC):  # pass 1: routes and ranks
                mask_c = c0 + o_c < C
                scores = tl.zeros([BC, BS], dtype=tl.float32)
                for d0 in range(0, D, BD):
                    mask_d = d0 + o_d < D
                    k_tile = tl.load(row_keys + o_s[:, None] * D + d0 + o_d[None, :],
                                     mask=mask_s[:, None] & mask_d[None, :], other=0.0)
                    b_tile = tl.load(blocks_at + (c0 + o_c[:, None]) * D + d0 + o_d[None, :],
                                     mask=mask_c[:, None] & mask_d[None, :], other=0.0)
                    scores += tl.sum(b_tile[:, None, :] * k_tile[None, :, :], axis=2)
                scores = tl.where(mask_s[None, :], scores, float("-inf"))
                best = tl.argmax(scores, axis=1, tie_break_left=True)  # [BC]
                route = ((o_s[None, :] == best[:, None]) & mask_c[:, None]).to(tl.float32)
                rank = tl.sum((tl.cumsum(route, axis=0) + count[None, :]) * route, axis=1)
                count += tl.sum(route, axis=0)
                tl.store(best_at + b * C + c0 + o_c, best.to(tl.int32), mask=mask_c)
                tl.store(rank_at + b * C + c0 + o_c, rank, mask=mask_c)
            kept = tl.exp2(log2_decay * count)
            out = (b * (K - 1) + s - 1)
            tl.store(keep + out * S + o_s, kept, mask=mask_s)
            tl.debug_barrier()  # the routes are stored before pass 2 reads them in another layout
            for c0 in range(0, C, BC):  # pass 2a: the weights
                mask_c = c0 + o_c < C
                w = _chunk_weights(best_at, rank_at, count, b * C, c0, o_c, o_s, log2_decay, one_minus_decay, C)
                tl.store(weight + (out * C + c0 + o_c[:, None]) * S + o_s[None, :], w,
                         mask=mask_c[:, None] & mask_s[None, :])
            fresh = tl.load(restart + b * K + s) != 0  # a document starts: the learned slots again
            for d0 in range(0, D, BD):  # pass 2b: the new slot keys, slice by slice
                mask_d = d0 + o_d < D
                tile_mask = mask_s[:, None] & mask_d[None, :]
                at = o_s[:, None] * D + d0 + o_d[None, :]
                new = kept[:, None] * tl.load(row_keys + at, mask=tile_mask, other=0.0)
                for c0 in range(0, C, BC):
                    mask_c = c0 + o_c < C
                    w = _chunk_weights(best_at, rank_at, count, b * C, c0, o_c, o_s, log2_decay, one_minus_decay, C)
                    b_tile = tl.load(blocks_at + (c0 + o_c[:, None]) * D + d0 + o_d[None, :],
                                     mask=mask_c[:, None] & mask_d[None, :], other=0.0)
                    new += tl.sum(w[:, :, None] * b_tile[:, None, :], axis=0)
                if fresh:
                    new = tl.load(init_keys + at, mask=tile_mask, other=0.0)
                tl.store(row_keys + at, new, mask=tile_mask)
            tl.debug_barrier()  # the new keys are stored before the next segment reads them


def route_segments_triton(block_keys: Tensor, slot_keys: Tensor, init_keys: Tensor, restart: Tensor,
                          decay: float) -> Tuple[Tensor, Tensor]:
    """Same contract as memory.route_segments_torch: block_keys [B, K, C, d], slot_keys [B, S, d],
    init_keys [S, d] (fp32), restart [B, K] bool -> (weight [B, K-1, C, S], keep [B, K-1, S])."""
    B, K, C, D = block_keys.shape
    S = slot_keys.shape[1]
    block_keys = block_keys.float().contiguous()
    slot_keys = slot_keys.float().contiguous()
    init_keys = init_keys.float().contiguous()
    weight = torch.empty(B, K - 1, C, S, dtype=torch.float32, device=block_keys.device)
    keep = torch.empty(B, K - 1, S, dtype=torch.float32, device=block_keys.device)
    keys = slot_keys.clone()  # the kernel's working copy of the slot keys
    best = torch.empty(B, C, dtype=torch.int32, device=block_keys.device)
    rank = torch.empty(B, C, dtype=torch.float32, device=block_keys.device)
    BS = triton.next_power_of_2(S)
    BC = min(triton.next_power_of_2(C), max(1, 256 // BS))  # chunks of blocks: [BC, BS, BD] stays 16k values
    _route_segments_kernel[(B,)](
        block_keys, keys, init_keys, restart.to(torch.int8).contiguous(), weight, keep, best, rank,
        K, math.log2(decay), 1.0 - decay,
        C=C, S=S, D=D, BC=BC, BS=BS, BD=64, num_warps=8,
    )
    return weight, keep
