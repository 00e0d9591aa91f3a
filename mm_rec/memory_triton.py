"""Triton kernels behind memory.py's ``route_segments`` on CUDA (docs/ARCHITECTURE.md section 2).

Importing this module never fails: without Triton, AVAILABLE is False and memory.py runs
``route_segments_torch``.

The fold's routing is the only sequential step of the memory: which slot each block of a
segment goes to depends on the slots at that segment's start, which depend on every earlier
fold. The sequential part is only the [S, d] slot keys carried from one segment to the next.
Each segment has two phases, each spread over many programs of a row:

* routing, per chunk of blocks (``_route_chunk``): the scores of the chunk's block summaries
  against the row's slot keys (fp32 products, so the argmax agrees with the PyTorch reference)
  and their argmax (ties to the lowest slot);
* fold, per slice of channels (``_fold_slice``): the per-slot counts and each block's rank among
  its slot's blocks from the routes, the closed-form EMA weights, and the new slot keys of its
  channel slice (the learned ones where a document starts). The slice at channel 0 also writes
  the weights and the per-slot decays.

On CUDA one launch does every segment (``_routing_kernel``): a row's programs run a phase, wait
for one another at a barrier in global memory, and go on, so a 32k-token row of 64 segments is
one launch a layer instead of 126 (at batch 1 their launch times, not their work, set the cost).
It needs every program of the grid resident at once, so it runs when the grid fits on the SMs;
more rows than that, and the interpreter, take two launches a segment (``_route_kernel``,
``_fold_kernel``) over all rows.

It writes only the weights and the per-slot decays; memory.py turns them into the
differentiable slot trajectory with the scan op. Nothing here needs a gradient: the routing is
an argmax.

``decode_step_triton`` is the state update of one decode step (``MultiMemoryAttention._decode_step``)
in one launch instead of dozens of small PyTorch kernels a layer, whose launches, not their work,
set a decoded token's time: one program per (row, slice of channels) applies the fold or restart
to the slots, routes the block the token closes (each program scores it over every channel, so no
program waits for another) and takes the fold's EMA step, and copies the summaries with the closed
block written, into one [B, S + C, d] buffer per keys and values that is the attention's entries and,
as views, the new state. It runs without gradients (generation), the PyTorch step otherwise.
"""

import math
from typing import Optional, Tuple

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
    def _route_chunk(blocks, stride_b, stride_c, keys, best_at, b, c0, C, S, D,
                     BC: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr):
        """The slots of blocks c0 .. c0 + BC of row b: their summaries (blocks [B, C, D], strides stride_b,
        stride_c, 1) against the slot keys [B, S, D], fp32 products (so the argmax agrees with the PyTorch
        reference), argmax with ties to the lowest slot -> best_at [B, C] int32. The keys are read past
        the SM's L1 (".cg"): in the one-launch routing another program wrote them."""
        o_c = c0 + tl.arange(0, BC)
        o_s = tl.arange(0, BS)
        o_d = tl.arange(0, BD)
        mask_c = o_c < C
        mask_s = o_s < S
        scores = tl.zeros([BC, BS], dtype=tl.float32)
        for d0 in range(0, D, BD):
            mask_d = d0 + o_d < D
            k_tile = tl.load(keys + (b * S + o_s[:, None]) * D + d0 + o_d[None, :],
                             mask=mask_s[:, None] & mask_d[None, :], other=0.0, cache_modifier=".cg")
            b_tile = tl.load(blocks + b * stride_b + o_c[:, None] * stride_c + d0 + o_d[None, :],
                             mask=mask_c[:, None] & mask_d[None, :], other=0.0)
            scores = tl.dot(b_tile, tl.trans(k_tile), scores, input_precision="ieee")
        scores = tl.where(mask_s[None, :], scores, float("-inf"))
        best = tl.argmax(scores, axis=1, tie_break_left=True)
        tl.store(best_at + b * C + o_c, best.to(tl.int32), mask=mask_c)

    @triton.jit
    def _chunk_routes(best_at, b, c0, o_c, o_s, C):
        """The one-hot routes [BC, BS] of blocks c0 .. c0 + BC (zero rows past C)."""
        mask_c = c0 + o_c < C
        best = tl.load(best_at + b * C + c0 + o_c, mask=mask_c, other=-1, cache_modifier=".cg")
        return (o_s[None, :] == best[:, None]).to(tl.float32)

    @triton.jit
    def _fold_slice(blocks, stride_b, stride_c, keys, init_keys, restart, best_at, weight, keep, b, d0, C, S, D,
                    log2_decay, one_minus_decay, BC: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr):
        """From the routes best_at [B, C]: weight [B, C, S] and keep [B, S] of this fold (written where
        d0 == 0), and the new slot keys of row b's channels d0 .. d0 + BD, in place in keys [B, S, D]
        (init_keys [S, D] where restart [B] is set)."""
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
        new = kept[:, None] * tl.load(keys + at, mask=tile_mask, other=0.0, cache_modifier=".cg")
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
            new = tl.dot(tl.trans(w), b_tile, new, input_precision="ieee")
        if d0 == 0:
            tl.store(keep + b * S + o_s, kept, mask=mask_s)
        if tl.load(restart + b) != 0:  # a document starts: the learned slots again
            new = tl.load(init_keys + o_s[:, None] * D + o_d[None, :], mask=tile_mask, other=0.0)
        tl.store(keys + at, new, mask=tile_mask)

    @triton.jit
    def _route_kernel(blocks, stride_b, stride_c, keys, best_at, C, S, D,
                      BC: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr):
        """One segment's routing, program (row, chunk of BC blocks)."""
        _route_chunk(blocks, stride_b, stride_c, keys, best_at, tl.program_id(0).to(tl.int64), tl.program_id(1) * BC,
                     C, S, D, BC, BS, BD)

    @triton.jit
    def _fold_kernel(blocks, stride_b, stride_c, keys, init_keys, restart, best_at, weight, keep, C, S, D,
                     log2_decay, one_minus_decay, BC: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr):
        """One segment's fold, program (row, slice of BD channels)."""
        _fold_slice(blocks, stride_b, stride_c, keys, init_keys, restart, best_at, weight, keep,
                    tl.program_id(0).to(tl.int64), tl.program_id(1) * BD, C, S, D, log2_decay, one_minus_decay,
                    BC, BS, BD)

    @triton.jit
    def _row_barrier(arrived, target):
        """Wait until the row's programs have all arrived here (``arrived`` reaches ``target``); what each
        wrote before is then visible to the others (release / acquire at GPU scope)."""
        tl.debug_barrier()  # every thread of this program has issued its stores
        tl.atomic_add(arrived, 1, sem="release", scope="gpu")
        while tl.atomic_add(arrived, 0, sem="acquire", scope="gpu") < target:
            pass
        tl.debug_barrier()

    @triton.jit
    def _routing_kernel(blocks, stride_b, stride_k, stride_c, keys, init_keys, restart, best_at, weight, keep,
                        arrived, B, K, C, S, D, log2_decay, one_minus_decay,
                        RC: tl.constexpr, RD: tl.constexpr, FC: tl.constexpr, FD: tl.constexpr, BS: tl.constexpr):
        """Every segment transition of row b in one launch: its P = num_programs(1) programs route a
        segment's blocks (chunks of RC, spread over the programs), wait for one another, fold it (slices of
        FD channels), wait again, and go on to the next segment. Launched only with every program resident
        (grid <= the SM count), so the waits cannot starve."""
        b = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1)
        P = tl.num_programs(1)
        row_arrived = arrived + b
        for s in range(1, K):
            before = tl.cast(s - 1, tl.int64)  # the segment that folds; offsets in int64 (long rows)
            segment = blocks + before * stride_k
            for c0 in range(p * RC, C, P * RC):
                _route_chunk(segment, stride_b, stride_c, keys, best_at, b, c0, C, S, D, RC, BS, RD)
            _row_barrier(row_arrived, (2 * s - 1) * P)
            for d0 in range(p * FD, D, P * FD):
                _fold_slice(segment, stride_b, stride_c, keys, init_keys, restart + (before + 1) * B, best_at,
                            weight + before * B * C * S, keep + before * B * S, b, d0, C, S, D,
                            log2_decay, one_minus_decay, FC, BS, FD)
            _row_barrier(row_arrived, 2 * s * P)


def _routing_tiles(C: int, S: int, D: int):
    """Tile sizes, each at least 16 (tl.dot's smallest): (blocks, channels) of a routing chunk, (blocks,
    channels) of a fold slice, slots. Small slices give a segment many programs: with blocks of one token
    (C = 512) and D = 768, 32 routing chunks and 48 fold slices (chosen by the tile sweep in
    docs/benchmarks/train_gpu.md)."""
    pow2 = triton.next_power_of_2
    return 16, max(16, min(128, pow2(D))), max(16, min(128, pow2(C))), 16, max(16, pow2(S))


def route_segments_triton(block_keys: Tensor, slot_keys: Tensor, init_keys: Tensor, restart: Tensor,
                          decay: float, programs_per_row: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Same contract as memory.route_segments_torch: block_keys [B, K, C, d], slot_keys [B, S, d],
    init_keys [S, d] (fp32), restart [B, K] bool -> (weight [B, K-1, C, S], keep [B, K-1, S]).

    On CUDA, one launch routes every segment (``_routing_kernel``) when the rows' programs fit on the
    SMs at once; otherwise (many rows, or the interpreter, whose programs run one after another) each
    segment is two launches, routing then fold, over every row. ``programs_per_row`` forces the one
    launch with that many programs a row (the tests: 1 runs under the interpreter, where a row's
    programs would otherwise wait for one another forever)."""
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
    RC, RD, FC, FD, BS = _routing_tiles(C, S, D)
    log2_decay, one_minus_decay = math.log2(decay), 1.0 - decay
    if programs_per_row is None and device.type == "cuda":
        resident = torch.cuda.get_device_properties(device).multi_processor_count // B  # a row's share of the SMs
        programs_per_row = min(max(triton.cdiv(C, RC), triton.cdiv(D, FD)), resident) or None
    if K > 1 and programs_per_row:
        arrived = torch.zeros(B, dtype=torch.int32, device=device)
        _routing_kernel[(B, programs_per_row)](
            blocks, blocks.stride(0), blocks.stride(1), blocks.stride(2), keys, init_keys, restarts, best, weight, keep,
            arrived, B, K, C, S, D, log2_decay, one_minus_decay, RC=RC, RD=RD, FC=FC, FD=FD, BS=BS, num_warps=4)
        return weight.transpose(0, 1), keep.transpose(0, 1)
    for s in range(1, K):
        segment = blocks[:, s - 1]  # [B, C, D], a view
        strides = (segment.stride(0), segment.stride(1))
        _route_kernel[(B, triton.cdiv(C, RC))](segment, *strides, keys, best, C, S, D, BC=RC, BS=BS, BD=RD,
                                               num_warps=4)
        _fold_kernel[(B, triton.cdiv(D, FD))](segment, *strides, keys, init_keys, restarts[s], best, weight[s - 1],
                                              keep[s - 1], C, S, D, log2_decay, one_minus_decay,
                                              BC=FC, BS=BS, BD=FD, num_warps=4)
    return weight.transpose(0, 1), keep.transpose(0, 1)


# ----------------------------------------------------------------------------- one decode step

if AVAILABLE:

    @triton.jit
    def _new_slot_tile(slots, s_sb, s_ss, fold, f_sb, f_ss, learned, b, o_s, o_d, mask, kept, is_fold, is_restart, D):
        """The slots [BS, BD] after this step's fold or restart: the learned ones at a document start,
        fold_keep * slots + fold_sum at a segment's first token, else as they were."""
        tile = tl.load(slots + b * s_sb + o_s[:, None] * s_ss + o_d[None, :], mask=mask, other=0.0)
        folded = kept[:, None] * tile + tl.load(fold + b * f_sb + o_s[:, None] * f_ss + o_d[None, :], mask=mask, other=0.0)
        tile = tl.where(is_fold, folded, tile)
        return tl.where(is_restart, tl.load(learned + o_s[:, None] * D + o_d[None, :], mask=mask, other=0.0), tile)

    @triton.jit
    def _decode_half(opened, new, stride_kb, slots, s_sb, s_ss, fold, f_sb, f_ss, blocks, b_sb, b_sc, learned,
                     out_open, out, out_fold, b, o_s, o_d, mask, mask_d, D, S, C, N, is_real, is_reset, is_fold,
                     emptied, closes, filled, folding, weight, BC: tl.constexpr):
        """The keys' (or the values') half of ``_decode_kernel`` for its channel slice o_d."""
        total = tl.where(is_reset, 0.0, tl.load(opened + b * D + o_d, mask=mask_d, other=0.0))
        total += tl.where(is_real, tl.load(new + b * stride_kb + o_d, mask=mask_d, other=0.0).to(tl.float32), 0.0)
        closed = total / N
        tl.store(out_open + b * D + o_d, tl.where(closes, 0.0, total), mask=mask_d)
        tile = _new_slot_tile(slots, s_sb, s_ss, fold, f_sb, f_ss, learned, b, o_s, o_d, mask, folding, is_fold,
                              is_reset, D)
        tl.store(out + (b * (S + C) + o_s[:, None]) * D + o_d[None, :], tile, mask=mask)
        pending = tl.load(fold + b * f_sb + o_s[:, None] * f_ss + o_d[None, :], mask=mask, other=0.0)
        pending = tl.where(emptied, 0.0, pending)
        pending += weight[:, None] * (closed[None, :] - pending)  # the EMA step of the routed slot
        tl.store(out_fold + (b * S + o_s[:, None]) * D + o_d[None, :], pending, mask=mask)
        at = tl.minimum(filled, C - 1)
        o_b = tl.arange(0, BC)
        for c0 in range(0, C, BC):  # the summaries, with the closed block written at `filled`
            rows = c0 + o_b
            bmask = (rows < C)[:, None] & mask_d[None, :]
            summaries = tl.load(blocks + b * b_sb + rows[:, None] * b_sc + o_d[None, :], mask=bmask, other=0.0)
            summaries = tl.where(((rows == at) & closes)[:, None], closed[None, :], summaries)
            tl.store(out + (b * (S + C) + S + rows[:, None]) * D + o_d[None, :], summaries, mask=bmask)

    @triton.jit
    def _decode_kernel(pos, real, reset, k, v, stride_kb,
                       open_k, open_v, open_n, count, keep,
                       slot_k, slot_v, s_sb, s_ss, fold_k, fold_v, f_sb, f_ss, block_k, block_v, b_sb, b_sc,
                       learned_k, learned_v,
                       out_open_k, out_open_v, out_open_n, out_count, out_visible, out_keep,
                       out_k, out_v, out_fold_k, out_fold_v,
                       D, S, C, N, L, one_minus_decay,
                       FOLDS: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr):
        """One decode step of the memory state for row b, channels d0 .. d0 + BD (program (b, slice)).
        out_k, out_v [B, S + C, D]: the slots after this step's fold or restart, then the block summaries
        with the block this token closes written (the attention's entries and the new state at once)."""
        b = tl.program_id(0).to(tl.int64)
        d0 = tl.program_id(1) * BD
        o_s = tl.arange(0, BS)
        o_dd = tl.arange(0, BD)
        o_d = d0 + o_dd
        mask_s = o_s < S
        mask_d = o_d < D
        p = tl.load(pos + b)
        is_real = tl.load(real + b) != 0
        is_reset = tl.load(reset + b) != 0
        boundary = is_real & (~is_reset) & (p % L == 0) & (p > 0)
        is_fold = boundary & FOLDS
        emptied = boundary | is_reset
        filled = tl.where(emptied, 0, tl.load(count + b))
        n = tl.where(is_reset, 0, tl.load(open_n + b)) + is_real.to(tl.int64)
        closes = n == N
        folding = tl.load(keep + b * S + o_s, mask=mask_s, other=1.0)  # lam^m of the fold this step may apply
        kept = tl.where(emptied, 1.0, folding)  # ... and of the fold that goes on accumulating
        weight = tl.zeros([BS], dtype=tl.float32)  # 1 - lam on the slot the closed block routes to
        if FOLDS:
            # the closed block's key over every channel against the new slot keys: its slot (ties to the lowest)
            scores = tl.zeros([BS], dtype=tl.float32)
            for c0 in range(0, D, BD):
                o_c = c0 + o_dd
                mask_c = o_c < D
                mask = mask_s[:, None] & mask_c[None, :]
                key = tl.where(is_reset, 0.0, tl.load(open_k + b * D + o_c, mask=mask_c, other=0.0))
                key = (key + tl.where(is_real, tl.load(k + b * stride_kb + o_c, mask=mask_c, other=0.0).to(tl.float32),
                                      0.0)) / N
                tile = _new_slot_tile(slot_k, s_sb, s_ss, fold_k, f_sb, f_ss, learned_k, b, o_s, o_c, mask, folding,
                                      is_fold, is_reset, D)
                scores += tl.sum(tile * key[None, :], axis=1)
            best = tl.argmax(tl.where(mask_s, scores, float("-inf")), axis=0, tie_break_left=True)
            weight = tl.where((o_s == best) & closes, one_minus_decay, 0.0)
        mask = mask_s[:, None] & mask_d[None, :]
        _decode_half(open_k, k, stride_kb, slot_k, s_sb, s_ss, fold_k, f_sb, f_ss, block_k, b_sb, b_sc, learned_k,
                     out_open_k, out_k, out_fold_k, b, o_s, o_d, mask, mask_d, D, S, C, N, is_real, is_reset, is_fold,
                     emptied, closes, filled, folding, weight, BC)
        _decode_half(open_v, v, stride_kb, slot_v, s_sb, s_ss, fold_v, f_sb, f_ss, block_v, b_sb, b_sc, learned_v,
                     out_open_v, out_v, out_fold_v, b, o_s, o_d, mask, mask_d, D, S, C, N, is_real, is_reset, is_fold,
                     emptied, closes, filled, folding, weight, BC)
        if d0 == 0:
            tl.store(out_open_n + b, tl.where(closes, 0, n))
            tl.store(out_count + b, filled + closes.to(tl.int64))
            tl.store(out_visible + b, filled)
            tl.store(out_keep + b * S + o_s, kept * (1.0 - weight), mask=mask_s)


def decode_step_triton(state, k: Tensor, v: Tensor, position: Tensor, real: Tensor, reset: Tensor,
                       learned_keys: Tensor, learned_values: Tensor, block_size: int, segment_length: int,
                       decay: float, folds: bool):
    """The state update of ``MultiMemoryAttention._decode_step`` in one launch: k, v [B, d] (the token's, any
    float dtype, rows of stride k.stride(0)); position [B] long; real, reset [B] bool; learned_* [S, d] fp32.
    Returns (keys, values [B, S + C, d] fp32: the attention's entries, slots then summaries; visible [B]
    long: the summaries the token sees; the new state's fields as a dict)."""
    B, D = k.shape
    S, C = state.slot_keys.shape[1], state.block_keys.shape[1]
    device = k.device
    f32 = dict(dtype=torch.float32, device=device)
    out_k, out_v = torch.empty(B, S + C, D, **f32), torch.empty(B, S + C, D, **f32)
    fields = {"open_key_sum": torch.empty(B, D, **f32), "open_value_sum": torch.empty(B, D, **f32),
              "open_count": torch.empty(B, dtype=torch.long, device=device),
              "block_count": torch.empty(B, dtype=torch.long, device=device),
              "fold_keep": torch.empty(B, S, **f32), "fold_key_sum": torch.empty(B, S, D, **f32),
              "fold_value_sum": torch.empty(B, S, D, **f32)}
    visible = torch.empty(B, dtype=torch.long, device=device)
    slot_k, slot_v = state.slot_keys, state.slot_values
    fold_k, fold_v = state.fold_key_sum, state.fold_value_sum
    block_k, block_v = state.block_keys, state.block_values
    # the kernel reads each pair with one set of strides: make them agree (states from a step or a cache file do)
    if slot_k.stride() != slot_v.stride() or slot_k.stride(-1) != 1:
        slot_k, slot_v = slot_k.contiguous(), slot_v.contiguous()
    if fold_k.stride() != fold_v.stride() or fold_k.stride(-1) != 1:
        fold_k, fold_v = fold_k.contiguous(), fold_v.contiguous()
    if block_k.stride() != block_v.stride() or block_k.stride(-1) != 1:
        block_k, block_v = block_k.contiguous(), block_v.contiguous()
    if k.stride(-1) != 1 or v.stride() != k.stride():
        k, v = k.contiguous(), v.contiguous()
    BD = min(64, triton.next_power_of_2(D))
    _decode_kernel[(B, triton.cdiv(D, BD))](
        position.contiguous(), real.to(torch.int8), reset.to(torch.int8), k, v, k.stride(0),
        state.open_key_sum.contiguous(), state.open_value_sum.contiguous(), state.open_count.contiguous(),
        state.block_count.contiguous(), state.fold_keep.contiguous(),
        slot_k, slot_v, slot_k.stride(0), slot_k.stride(1), fold_k, fold_v, fold_k.stride(0), fold_k.stride(1),
        block_k, block_v, block_k.stride(0), block_k.stride(1), learned_keys.contiguous(), learned_values.contiguous(),
        fields["open_key_sum"], fields["open_value_sum"], fields["open_count"], fields["block_count"], visible,
        fields["fold_keep"], out_k, out_v, fields["fold_key_sum"], fields["fold_value_sum"],
        D, S, C, block_size, segment_length, 1.0 - decay,
        FOLDS=folds, BS=triton.next_power_of_2(S), BD=BD, BC=32, num_warps=4)
    return out_k, out_v, visible, fields
