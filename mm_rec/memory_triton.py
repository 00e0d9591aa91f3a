"""Triton kernel behind memory.py's ``route_segments`` on CUDA (docs/ARCHITECTURE.md section 2).

Importing this module never fails: without Triton, AVAILABLE is False and memory.py runs
``route_segments_torch``.

The fold's routing is the only sequential step of the memory: which slot each block of a
segment goes to depends on the slots at that segment's start, which depend on every
earlier fold. One program per row walks the segments in order, with the row's slot keys
[S, d] in a working buffer: scores of the segment's C block summaries against the slots (fp32
products and sums, so the argmax agrees with the PyTorch reference), the argmax (ties to the
lowest slot), the closed-form EMA weights, and the updated slots. It writes only the
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
    def _route_segments_kernel(
        block_keys, keys, init_keys, restart, weight, keep,
        K, log2_decay, one_minus_decay,
        C: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
        BC: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
    ):
        """block_keys [B, K, C, D], keys [B, S, D] (the slots of segment 0, updated in place),
        init_keys [S, D], restart [B, K] int8 -> weight [B, K - 1, C, S], keep [B, K - 1, S]; fp32.

        The slot keys live in ``keys`` (L2-resident) and are read in [S, BD] slices, so every
        product and reduction is spread over the whole program rather than one warp's dot."""
        b = tl.program_id(0).to(tl.int64)
        o_c = tl.arange(0, BC)
        o_s = tl.arange(0, BS)
        o_d = tl.arange(0, BD)
        mask_c, mask_s = o_c < C, o_s < S
        row_keys = keys + b * S * D
        for s in range(1, K):
            blocks_at = block_keys + ((b * K + s - 1) * C) * D
            scores = tl.zeros([BC, BS], dtype=tl.float32)
            for d0 in range(0, D, BD):
                mask_d = d0 + o_d < D
                k_tile = tl.load(row_keys + o_s[:, None] * D + d0 + o_d[None, :],
                                 mask=mask_s[:, None] & mask_d[None, :], other=0.0)
                b_tile = tl.load(blocks_at + o_c[:, None] * D + d0 + o_d[None, :],
                                 mask=mask_c[:, None] & mask_d[None, :], other=0.0)
                scores += tl.sum(b_tile[:, None, :] * k_tile[None, :, :], axis=2)
            scores = tl.where(mask_s[None, :], scores, float("-inf"))
            best = tl.argmax(scores, axis=1, tie_break_left=True)  # [BC]
            route = ((o_s[None, :] == best[:, None]) & mask_c[:, None]).to(tl.float32)
            count = tl.sum(route, axis=0)  # [BS]
            rank = tl.sum(tl.cumsum(route, axis=0) * route, axis=1)  # [BC], 1-based
            m_of_block = tl.sum(route * count[None, :], axis=1)
            w = route * (one_minus_decay * tl.exp2(log2_decay * (m_of_block - rank)))[:, None]
            kept = tl.exp2(log2_decay * count)
            out = (b * (K - 1) + s - 1)
            tl.store(weight + out * C * S + o_c[:, None] * S + o_s[None, :], w, mask=mask_c[:, None] & mask_s[None, :])
            tl.store(keep + out * S + o_s, kept, mask=mask_s)
            fresh = tl.load(restart + b * K + s) != 0  # a document starts: the learned slots again
            tl.debug_barrier()  # every thread has read the keys before any is overwritten
            for d0 in range(0, D, BD):
                mask_d = d0 + o_d < D
                tile_mask = mask_s[:, None] & mask_d[None, :]
                at = o_s[:, None] * D + d0 + o_d[None, :]
                k_tile = tl.load(row_keys + at, mask=tile_mask, other=0.0)
                b_tile = tl.load(blocks_at + o_c[:, None] * D + d0 + o_d[None, :],
                                 mask=mask_c[:, None] & mask_d[None, :], other=0.0)
                new = kept[:, None] * k_tile + tl.sum(w[:, :, None] * b_tile[:, None, :], axis=0)
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
    _route_segments_kernel[(B,)](
        block_keys, keys, init_keys, restart.to(torch.int8).contiguous(), weight, keep,
        K, math.log2(decay), 1.0 - decay,
        C=C, S=S, D=D, BC=triton.next_power_of_2(C), BS=triton.next_power_of_2(S), BD=64, num_warps=8,
    )
    return weight, keep
