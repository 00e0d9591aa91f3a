"""Multi-memory attention over the hierarchical memory (docs/ARCHITECTURE.md section 2).

A token at position p attends, per head, over
  * the S long-term slots as they stand for p's segment, and
  * the level-1 summaries (mean k, mean v) of the blocks of p's segment completed before p.
At a segment boundary the segment's summaries fold into the slots (``fold_weights``); at a
document start (packed rows) the memory returns to the layer's learned slots.

The parallel path has no loop over tokens, windows or segments and does not wait for the
host (packed rows, whose documents add segments, read the layout's size once per forward).
Every real token is placed by its position into a *segment layout* [B, K, L]: layout
segment 0 is the segment the carried state belongs to, and each later one is the next
segment of the stream (or, after a document start, the new document's first segment).
Because visibility depends only on a token's offset j = p mod L inside its segment, the
attention is one batched call over all B * K segments against their own S + C entries,
with one static [L, S + C] mask. The only sequential step is the fold from one segment to
the next: its routing (an argmax, no gradient) runs as one small kernel per row
(``memory_triton.py`` on CUDA, a loop over segments elsewhere; ``config.kernel_backend``
chooses), and the slot trajectory it implies is a diagonal linear recurrence over segments,
computed by the scan op, which gives its gradients.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.bias import causal_lower_right

from .positions import TokenLayout
from .scan import resolve_backend, scan


@dataclass
class MemoryState:
    """The memory of one layer for B rows, owned by ``MultiMemoryAttention``: float32 but the
    counts (long). d = hidden_size, C = blocks per segment, S = slots."""

    open_key_sum: Tensor  # [B, d] running sums of the open block
    open_value_sum: Tensor  # [B, d]
    open_count: Tensor  # [B]
    block_keys: Tensor  # [B, C, d] completed block summaries of the current segment
    block_values: Tensor  # [B, C, d]
    block_count: Tensor  # [B] how many of the C summaries are filled
    slot_keys: Tensor  # [B, S, d] long-term memory
    slot_values: Tensor  # [B, S, d]
    # The fold of the completed summaries into the slots, accumulated as each block closes, so that a
    # decode step never refolds the whole segment: at the segment's end the slots become
    # fold_keep * slots + fold_sum. A function of the fields above (``pending_fold``).
    fold_key_sum: Tensor  # [B, S, d]
    fold_value_sum: Tensor  # [B, S, d]
    fold_keep: Tensor  # [B, S]: lam^m, m the blocks routed to the slot so far

    @staticmethod
    def shapes(B: int, d: int, C: int, S: int) -> Dict[str, tuple]:
        return {"open_key_sum": (B, d), "open_value_sum": (B, d), "open_count": (B,),
                "block_keys": (B, C, d), "block_values": (B, C, d), "block_count": (B,),
                "slot_keys": (B, S, d), "slot_values": (B, S, d),
                "fold_key_sum": (B, S, d), "fold_value_sum": (B, S, d), "fold_keep": (B, S)}

    def tensors(self) -> Dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def zeros(cls, B: int, d: int, C: int, S: int, device) -> "MemoryState":
        """No blocks, zero slots and nothing to fold (fold_keep 1)."""
        return cls(**{name: (torch.ones if name == "fold_keep" else torch.zeros)(
            shape, dtype=torch.long if name.endswith("count") else torch.float32, device=device)
            for name, shape in cls.shapes(B, d, C, S).items()})


# ---------------------------------------------------------------------------------------
# The fold rule
# ---------------------------------------------------------------------------------------

def fold_weights(slot_keys: Tensor, block_keys: Tensor, selected: Tensor, decay: float) -> Tuple[Tensor, Tensor]:
    """The fold of a segment's block summaries into the slots, as weights (closed form of the EMA).

    slot_keys: [B, S, d] (the slots at the segment start); block_keys: [B, C, d];
    selected: [B, C] bool. Block i routes to j(i) = argmax_j <K_j, k_i> (ties: lowest j);
    slot j with routed blocks i_1..i_m becomes lam^m K_j + (1 - lam) sum_r lam^(m-r) k_(i_r).
    Returns (weight [B, C, S]: block i's weight in slot j, keep [B, S]: lam^m_j), so that
    new_slots = keep[..., None] * slots + weight^T @ blocks, for keys and values alike.
    """
    S = slot_keys.shape[1]
    scores = torch.einsum("bcd,bsd->bcs", block_keys, slot_keys)
    route = F.one_hot(scores.argmax(-1), S).to(slot_keys.dtype) * selected[..., None]  # [B, C, S]
    count = route.sum(1)  # m_j: [B, S]
    rank = (route.cumsum(1) * route).sum(-1)  # r of each block among its slot's blocks (1-based)
    m_of_block = (route * count[:, None]).sum(-1)
    weight = (1.0 - decay) * decay ** (m_of_block - rank) * selected  # [B, C]
    return route * weight[..., None], decay ** count


def apply_fold(weight: Tensor, keep: Tensor, slots: Tensor, blocks: Tensor) -> Tensor:
    """keep * slots + weight^T @ blocks. weight: [B, C, S]; keep: [B, S]; slots: [B, S, e]; blocks: [B, C, e]."""
    return keep[..., None] * slots + torch.einsum("bcs,bce->bse", weight, blocks)


def fold_into_slots(
    slot_keys: Tensor, slot_values: Tensor, block_keys: Tensor, block_values: Tensor,
    selected: Tensor, decay: float,
) -> Tuple[Tensor, Tensor]:
    """Fold the selected block summaries [B, C, d], in order, into the slots [B, S, d]."""
    weight, keep = fold_weights(slot_keys, block_keys, selected, decay)
    return apply_fold(weight, keep, slot_keys, block_keys), apply_fold(weight, keep, slot_values, block_values)


def memory_folds(memory_levels: str) -> bool:
    """Whether a memory of these ``config.memory_levels`` folds finished segments into its slots."""
    return memory_levels in ("slots+blocks", "slots")


def pending_fold(slot_keys: Tensor, block_keys: Tensor, block_values: Tensor, block_count: Tensor,
                 decay: float, folds: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    """The fold of the first ``block_count`` [B] summaries [B, C, d] into the slots [B, S, d], not yet
    applied: (fold_key_sum, fold_value_sum [B, S, d], fold_keep [B, S]), the ``MemoryState`` fields;
    nothing to fold (0, 0, 1) where ``folds`` is False."""
    B, S, d = slot_keys.shape
    if not folds:
        zeros = slot_keys.new_zeros(B, S, d)
        return zeros, zeros, slot_keys.new_ones(B, S)
    selected = torch.arange(block_keys.shape[1], device=block_keys.device)[None] < block_count[:, None]
    with torch.no_grad():  # the routing and its weights carry no gradient: autograd keeps no copy of the keys
        weight, keep = fold_weights(slot_keys.detach(), block_keys.detach(), selected, decay)
    blocks = torch.einsum("bcs,bce->bse", weight, torch.cat([block_keys, block_values], -1))
    return blocks[..., :d], blocks[..., d:], keep


def with_pending_fold(state: MemoryState, decay: float, folds: bool = True) -> MemoryState:
    """``state`` with its fold fields recomputed from the slots and summaries it holds (for a cache
    written before those fields existed)."""
    fold_k, fold_v, fold_keep = pending_fold(state.slot_keys, state.block_keys, state.block_values, state.block_count,
                                             decay, folds)
    return dataclasses.replace(state, fold_key_sum=fold_k, fold_value_sum=fold_v, fold_keep=fold_keep)


def route_segments_torch(block_keys: Tensor, slot_keys: Tensor, init_keys: Tensor, restart: Tensor,
                         decay: float) -> Tuple[Tensor, Tensor]:
    """The routing of every segment transition, one segment after another (no gradient).

    block_keys: [B, K, C, d] fp32, the summaries of each layout segment; slot_keys: [B, S, d]
    fp32, the slots of segment 0; init_keys: [S, d], the learned slots; restart: [B, K] bool,
    segment s starts a document (its slots are the learned ones). Returns the fold into each
    segment s = 1..K-1 as (weight [B, K-1, C, S], keep [B, K-1, S]), views of segment-major tensors.
    """
    B, K, C, _ = block_keys.shape
    selected = torch.ones(B, C, dtype=torch.bool, device=block_keys.device)
    weights, keeps = [], []
    keys = slot_keys
    for s in range(1, K):
        weight, keep = fold_weights(keys, block_keys[:, s - 1], selected, decay)
        keys = torch.where(restart[:, s, None, None], init_keys, apply_fold(weight, keep, keys, block_keys[:, s - 1]))
        weights.append(weight)
        keeps.append(keep)
    # laid out segment-major, as the Triton kernel writes them (the traced op's strides are one statement)
    return torch.stack(weights, 0).transpose(0, 1), torch.stack(keeps, 0).transpose(0, 1)


def _route_segments(block_keys: Tensor, slot_keys: Tensor, init_keys: Tensor, restart: Tensor,
                    decay: float, backend: str) -> Tuple[Tensor, Tensor]:
    if resolve_backend(backend, block_keys.device) == "triton":
        from .memory_triton import route_segments_triton

        return route_segments_triton(block_keys, slot_keys, init_keys, restart, decay)
    return route_segments_torch(block_keys, slot_keys, init_keys, restart, decay)


_route_segments_op = torch.library.custom_op("mm_rec::route_segments", mutates_args=())(_route_segments)


@_route_segments_op.register_fake
def _(block_keys, slot_keys, init_keys, restart, decay, backend):
    B, K, C, _ = block_keys.shape
    S = slot_keys.shape[1]
    return block_keys.new_empty(K - 1, B, C, S).transpose(0, 1), block_keys.new_empty(K - 1, B, S).transpose(0, 1)


def route_segments(block_keys: Tensor, slot_keys: Tensor, init_keys: Tensor, restart: Tensor,
                   decay: float, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """``route_segments_torch``, or one Triton kernel per row where ``backend`` (the scan's choices,
    ``config.kernel_backend``) resolves to Triton. Traced (torch.compile,
    torch.export), it is the ``torch.library`` op, one opaque call; eager, the function itself
    (a second copy of this code, e.g. a checkpoint's, re-registers the op)."""
    op = _route_segments_op if torch.compiler.is_compiling() else _route_segments
    with torch.no_grad():
        return op(block_keys.detach(), slot_keys.detach(), init_keys.detach(), restart, float(decay), backend)


# ---------------------------------------------------------------------------------------
# Where each token sits in the segment layout (computed once per forward, shared by layers)
# ---------------------------------------------------------------------------------------

@dataclass
class SegmentLayout:
    """Real tokens placed by position into [B, K, L] (K layout segments of L positions)."""

    num_segments: int  # K
    gather_index: Tensor  # [B * K * L] long: the flat token (b * T + t) at each layout place, B * T if empty
    scatter_index: Tensor  # [B * T] long: the flat layout place of each token, B * K * L for padding
    restart: Tensor  # [B, K] bool: layout segment s begins a document (packed rows)
    has_real: Tensor  # [B] bool
    last_segment: Tensor  # [B] long: the layout segment of the row's last real token
    last_position: Tensor  # [B] long: the position of the row's last real token
    identity: bool = False  # every token sits at its own index: the relayout is a reshape


def _last_real_at(real: Tensor) -> Tensor:
    """[B, T] long: the index of the last real token at or before t (-1 before the first)."""
    steps = torch.arange(real.shape[1], device=real.device)
    return torch.where(real, steps, -1).cummax(dim=1).values


def _segment_index(position: Tensor, real: Tensor, reset: Tensor, offset: Tensor, segment_length: int) -> Tensor:
    """[B, T] long: each token's layout segment (meaningless at padding)."""
    L = segment_length
    last_real_at = _last_real_at(real)
    before = torch.cat([last_real_at.new_full((real.shape[0], 1), -1), last_real_at[:, :-1]], 1)
    previous = torch.where(before >= 0, position.gather(1, before.clamp(min=0)), offset[:, None] - 1)
    crossed = torch.where(reset, 1, (position // L - previous.clamp(min=0) // L).clamp(min=0))
    return (crossed * real).cumsum(1)


_segment_index_op = torch.library.custom_op("mm_rec::segment_index", mutates_args=())(_segment_index)


@_segment_index_op.register_fake
def _(position, real, reset, offset, segment_length):
    return torch.empty_like(position)


def _segment_places(segment: Tensor, position: Tensor, real: Tensor, reset: Tensor, offset: Tensor,
                    segment_length: int, num_segments: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The index maps and per-row facts of ``SegmentLayout`` (integer bookkeeping, no gradient;
    one opaque op for torch.compile and torch.export)."""
    L, K = segment_length, num_segments
    B, T = position.shape
    device = position.device
    place = segment * L + position % L  # [B, T] inside the row's K * L layout
    rows = torch.arange(B, device=device)[:, None]
    scatter_index = torch.where(real, rows * (K * L) + place, B * K * L).flatten()
    tokens = (rows * T + torch.arange(T, device=device)).expand(B, T)
    gather_index = torch.full((B * K * L + 1,), B * T, dtype=torch.long, device=device)
    gather_index = gather_index.scatter(0, scatter_index, tokens.flatten())[:-1]
    restart = torch.zeros(B, K + 1, dtype=torch.bool, device=device)
    restart = restart.scatter(1, torch.where(real & reset, segment, K), True)[:, :K].contiguous()
    has_real = real.any(1)
    last = _last_real_at(real)[:, -1].clamp(min=0)[:, None]
    last_segment = torch.where(has_real, segment.gather(1, last)[:, 0], 0)
    last_position = torch.where(has_real, position.gather(1, last)[:, 0], offset - 1)
    return gather_index, scatter_index, restart, has_real, last_segment, last_position


_segment_places_op = torch.library.custom_op("mm_rec::segment_places", mutates_args=())(_segment_places)


@_segment_places_op.register_fake
def _(segment, position, real, reset, offset, segment_length, num_segments):
    B, T = position.shape
    K, L = num_segments, segment_length
    long = dict(dtype=torch.long, device=position.device)
    return (torch.empty(B * K * L, **long), torch.empty(B * T, **long),
            torch.empty(B, K, dtype=torch.bool, device=position.device), torch.empty(B, dtype=torch.bool, device=position.device),
            torch.empty(B, **long), torch.empty(B, **long))


def segment_layout(layout: TokenLayout, segment_length: int) -> SegmentLayout:
    """Layout segment of a token: 0 for the segment the carried state is in (that of position
    offset - 1), then one more per segment boundary crossed and one more per document start.
    Without position_ids a row spans at most ceil(T / L) + 1 segments (ceil(T / L) from a fresh
    state), a bound known on the host; with them (packed rows) documents add segments, and K
    is read from the device once per forward."""
    key = ("segments", segment_length)
    if key in layout.memo:
        return layout.memo[key]
    L, T = segment_length, layout.position.shape[1]
    args = (layout.position, layout.real, layout.reset, layout.offset)
    traced = torch.compiler.is_compiling()  # traced: the opaque ops; eager: the functions themselves
    segment = (_segment_index_op if traced else _segment_index)(*args, L)
    if layout.has_resets:
        K = int(segment.max()) + 1
    else:  # a fresh stream starts at position 0: its T tokens fill ceil(T / L) segments
        K = (T + L - 1) // L + (0 if layout.fresh else 1)
    result = SegmentLayout(K, *(_segment_places_op if traced else _segment_places)(segment, *args, L, K))
    # Rows that start fresh, fill whole segments and hold no padding sit in the layout as they
    # are: the relayout is then a reshape. (Where the caller does not know the rows are dense,
    # checking the mask reads it on the host: free on CPU only.)
    no_padding = layout.dense or (not torch.compiler.is_compiling() and layout.real.device.type == "cpu"
                                  and bool(layout.real.all()))
    result.identity = layout.fresh and not layout.has_resets and T == K * L and no_padding
    layout.memo[key] = result
    return result


class _Relayout(torch.autograd.Function):
    """out[i] = x[index[i]] over flattened rows, x padded with a zero row; ``inverse`` maps
    back, so the backward is a gather too (a one-to-one map between real tokens and layout
    places: no scatter-add, deterministic)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        ctx.rows = x.shape[0]
        return torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return torch.cat([grad, grad.new_zeros(1, grad.shape[1])]).index_select(0, inverse), None, None


def relayout(x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
    """x: [R, e] -> [len(index), e]; index in [0, R] (R: a zero row); inverse: the map back."""
    return _Relayout.apply(x, index, inverse)


# ---------------------------------------------------------------------------------------
# The attention
# ---------------------------------------------------------------------------------------

class MultiMemoryAttention(nn.Module):
    """Holds the layer's learned long-term slots K^L, V^L: [S, d]."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.block_size = config.memory_block_size
        self.segment_length = config.memory_segment_length
        self.blocks_per_segment = config.blocks_per_segment
        self.decay = float(config.memory_decay)
        self.kernel_backend = config.kernel_backend
        # memory_levels (ablations): "slots" hides the block summaries from the attention, "blocks"
        # never folds (the slots stay the learned ones)
        self.reads_blocks = config.memory_levels in ("slots+blocks", "blocks")
        self.folds = memory_folds(config.memory_levels)
        # initialised by MMRecPreTrainedModel._init_weights
        self.slot_keys = nn.Parameter(torch.empty(config.num_memory_slots, config.hidden_size))
        self.slot_values = nn.Parameter(torch.empty(config.num_memory_slots, config.hidden_size))

    def fresh_state(self, batch_size: int) -> MemoryState:
        """The memory before any token: no blocks, and the learned slots."""
        (S, d), B = self.slot_keys.shape, batch_size
        state = MemoryState.zeros(B, d, self.blocks_per_segment, S, self.slot_keys.device)
        keys, values = self.learned_slots()
        state.slot_keys, state.slot_values = keys.expand(B, S, d), values.expand(B, S, d)
        return state

    def learned_slots(self) -> Tuple[Tensor, Tensor]:
        """The slots a stream or document starts from (a reset): keys, values [S, d] float32."""
        return self.slot_keys.float(), self.slot_values.float()

    def close_blocks(self, sums: Tensor) -> Tensor:
        """A completed block's summary: the mean of its N keys (values) from their fp32 sums."""
        return sums / self.block_size if self.block_size > 1 else sums

    def forward(self, q: Tensor, kv: Tensor, layout: TokenLayout, state: MemoryState) -> Tuple[Tensor, MemoryState]:
        """q: [B, T, d]; kv: [B, T, 2d], keys then values (HEM's adjacent k, v slices, one view: the layout
        takes them as they are, with no concatenation); returns (m [B, T, d] in q.dtype, the memory after
        the last token)."""
        if q.shape[1] == 1:
            d = q.shape[-1]
            return self._decode_step(q, kv[..., :d], kv[..., d:], layout, state)
        return self._parallel(q, kv, layout, state)

    def _attend(self, q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        """Per-head softmax attention. q: [..., W, d]; keys, values: [..., E, d]; mask broadcasts to [..., W, E]
        (a bool tensor, or a CausalBias)."""
        heads = lambda t: t.to(q.dtype).unflatten(-1, (self.num_heads, -1)).transpose(-3, -2)  # noqa: E731
        if q.requires_grad:  # q on its own: a saved view would keep the whole fused projection (7 slices)
            q = q.contiguous()
        m = F.scaled_dot_product_attention(heads(q), heads(keys), heads(values), attn_mask=mask)
        return m.transpose(-3, -2).flatten(-2)

    def _attend_tokens(self, q: Tensor, slots: Tensor, blocks: Tensor) -> Tensor:
        """``_attend`` with blocks of one token, without the [L, S + C] mask: the token at offset j sees
        every slot and the blocks c < j, i.e. entry e < S + j of [slots, blocks 0 .. C - 2] (block C - 1
        is seen by no token of its segment). That is a causal mask aligned to the lower right, which
        SDPA runs in its fused (flash) kernels eagerly; traced, it is a tensor mask.
        q: [G, L, d]; slots: [G, S, 2d]; blocks: [G, C, 2d]."""
        L, d = q.shape[1], q.shape[-1]
        entries = torch.cat([slots.to(q.dtype), blocks[:, :-1].to(q.dtype)], 1)  # [G, S + C - 1, 2d]
        E = entries.shape[1]
        if torch.compiler.is_compiling():  # CausalBias does not trace; the same mask as a tensor
            mask = torch.ones(L, E, dtype=torch.bool, device=q.device).tril(E - L)
        else:
            mask = causal_lower_right(L, E)
        return self._attend(q, *entries.split(d, -1), mask)  # split: the backward is one concatenation

    def _visible(self, device: torch.device) -> Tensor:
        """[L, S + C] bool: the token at offset j of a segment sees every slot, and block c iff (c + 1) N <= j."""
        offsets = torch.arange(self.segment_length, device=device)[:, None]
        sees_block = (torch.arange(self.blocks_per_segment, device=device)[None] + 1) * self.block_size <= offsets
        sees_block &= self.reads_blocks
        sees_slot = torch.ones(self.segment_length, self.slot_keys.shape[0], dtype=torch.bool, device=device)
        return torch.cat([sees_slot, sees_block], 1)

    def _parallel(self, q: Tensor, kv: Tensor, layout: TokenLayout, state: MemoryState):
        B, T, d = q.shape
        N, L, C_full = self.block_size, self.segment_length, self.blocks_per_segment
        S = self.slot_keys.shape[0]
        seg = segment_layout(layout, L)
        K = seg.num_segments
        # A fresh stream shorter than a segment fills only its first T offsets: the layout keeps
        # the first W = T rounded up to whole blocks, the rest of the segment being padding that no
        # token reads (the attention is causal within the segment). The state keeps its shapes.
        W = min(L, N * -(-T // N)) if layout.fresh and not layout.has_resets and K == 1 else L
        C = W // N

        def to_layout(x: Tensor) -> Tensor:
            if seg.identity:
                return x.reshape(B, K, L, -1)
            out = relayout(x.reshape(B * T, -1), seg.gather_index, seg.scatter_index).view(B, K, L, -1)
            return out if W == L else out[:, :, :W]

        q_l = to_layout(q)
        kv_l = to_layout(kv)  # [B, K, L, 2d]
        # Block sums (fp32); segment 0 continues the carried state: its first block_count
        # summaries are carried, and the open block's sums add to block block_count.
        block = torch.arange(C, device=q.device)[None]
        if layout.fresh and N == 1:  # a block is its token: the summaries are k, v as they are (the fold
            sums = summaries = kv_l  # reads them as float32, which is exact), with no float32 copy to attend to
        elif layout.fresh:  # no cache: the carried state holds no summaries and no open block
            sums = kv_l.view(B, K, C, N, 2 * d).sum(3, dtype=torch.float32)  # [B, K, C, 2d]
            summaries = self.close_blocks(sums)
        else:
            sums = kv_l.view(B, K, C, N, 2 * d).sum(3, dtype=torch.float32)
            carried = block < state.block_count[:, None]  # [B, C]
            at_open = (block == state.block_count[:, None]).float()[..., None]
            open_sums = torch.cat([state.open_key_sum, state.open_value_sum], -1)[:, None]
            first_sums = sums[:, 0] + at_open * open_sums
            sums = torch.cat([first_sums[:, None], sums[:, 1:]], 1)
            carried_summaries = torch.cat([state.block_keys, state.block_values], -1)[:, :C]
            first = torch.where(carried[..., None], carried_summaries, self.close_blocks(first_sums))
            summaries = torch.cat([first[:, None], self.close_blocks(sums[:, 1:])], 1)  # [B, K, C, 2d]

        with torch.autocast(q.device.type, enabled=False):  # the memory state is float32
            slots = self._segment_slots(summaries, state, seg.restart)  # [B, K, S, 2d]

        if N == 1 and self.reads_blocks:
            # reshape: without folds (memory_levels="blocks") the slots are the learned ones, expanded
            m_l = self._attend_tokens(q_l.view(B * K, W, d), slots.reshape(B * K, S, 2 * d),
                                      summaries.view(B * K, C, 2 * d))
        else:
            entries = torch.cat([slots, summaries], 2).view(B * K, S + C, 2 * d)
            visible = self._visible(q.device)[:W, :S + C]
            m_l = self._attend(q_l.view(B * K, W, d), *entries.split(d, -1), visible)
        if W < L:
            m_l = F.pad(m_l.view(B * K, W, d), (0, 0, 0, L - W))
        if seg.identity:
            m = m_l.reshape(B, T, d)
        else:
            m = relayout(m_l.reshape(B * K * L, d), seg.scatter_index, seg.gather_index).view(B, T, d)

        if not layout.keeps_state:  # nobody continues the state (training): it is not computed
            return m, state
        # The state after the row's last real token (unchanged for a row of padding only).
        rows = torch.arange(B, device=q.device)
        last_seg, p = seg.last_segment, seg.last_position
        filled = (p % L + 1) // N  # completed blocks of the last segment (C: folds lazily)
        open_count = (p + 1) % N
        open_block = ((p % L) // N).clamp(max=C - 1)
        last_slots = slots[rows, last_seg]
        last_summaries = summaries[rows, last_seg] * (block < filled[:, None]).float()[..., None]
        if C < C_full:
            last_summaries = F.pad(last_summaries, (0, 0, 0, C_full - C))
        last_open = sums[rows, last_seg, open_block] * (open_count > 0).float()[:, None]
        with torch.autocast(q.device.type, enabled=False):
            fold_k, fold_v, fold_keep = pending_fold(last_slots[..., :d], last_summaries[..., :d],
                                                     last_summaries[..., d:], filled, self.decay, self.folds)
        keep_old = ~seg.has_real
        pick = lambda old, new: torch.where(keep_old.view(-1, *[1] * (new.dim() - 1)), old, new)  # noqa: E731
        new_state = MemoryState(
            open_key_sum=pick(state.open_key_sum, last_open[:, :d]),
            open_value_sum=pick(state.open_value_sum, last_open[:, d:]),
            open_count=pick(state.open_count, open_count),
            block_keys=pick(state.block_keys, last_summaries[..., :d]),
            block_values=pick(state.block_values, last_summaries[..., d:]),
            block_count=pick(state.block_count, filled),
            slot_keys=pick(state.slot_keys, last_slots[..., :d]),
            slot_values=pick(state.slot_values, last_slots[..., d:]),
            fold_key_sum=pick(state.fold_key_sum, fold_k),
            fold_value_sum=pick(state.fold_value_sum, fold_v),
            fold_keep=pick(state.fold_keep, fold_keep),
        )
        return m, new_state

    def _segment_slots(self, summaries: Tensor, state: MemoryState, restart: Tensor) -> Tensor:
        """The slots of every layout segment [B, K, S, 2d] (keys | values), fp32: the routing (no
        gradient), then the linear recurrence it defines, by the scan:
        slots_s = keep_s * slots_(s-1) + weight_s^T @ summaries_(s-1), or the learned slots where
        segment s begins a document. summaries: [B, K, C, 2d]; restart: [B, K] bool."""
        B, K, _, width = summaries.shape
        d, S = width // 2, self.slot_keys.shape[0]
        start = torch.cat([state.slot_keys, state.slot_values], -1)  # [B, S, 2d]
        if K == 1 or not self.folds:
            return start[:, None].expand(B, K, S, width)
        summaries = summaries.float()
        learned = self.learned_slots()
        weight, keep = route_segments(summaries[..., :d], state.slot_keys, learned[0], restart, self.decay,
                                      self.kernel_backend)
        fresh = restart[:, 1:, None, None]
        init = torch.cat(learned, -1)  # [S, 2d]
        # weight_s^T @ summaries_(s-1) for s = 1..K-1, as one batched product over all K segments with a zero
        # weight after the last: the product then reads the summaries as they lie (a slice [:, :-1] is copied
        # for the batched product, forward and backward)
        weight = torch.cat([weight, weight.new_zeros(B, 1, *weight.shape[2:])], 1)  # [B, K, C, S]
        folded = torch.matmul(weight.transpose(-1, -2), summaries)[:, :-1]  # [B, K - 1, S, 2d]
        inputs = torch.where(fresh, init, folded)
        log_keep = torch.log(keep)[..., None].masked_fill(fresh, float("-inf")).expand(-1, -1, -1, width)
        later, _ = scan(inputs.flatten(2), log_keep.flatten(2), start.flatten(1), backend=self.kernel_backend)
        return torch.cat([start[:, None], later.view(B, K - 1, S, width)], 1)

    def _decode_step(self, q: Tensor, k: Tensor, v: Tensor, layout: TokenLayout, state: MemoryState):
        """One token per row (decoding): O((S + C) d). A fold applies the fold accumulated as the
        segment's blocks closed; folds and resets are computed and selected per row, so the step
        never asks the device a question (CUDA-graph safe)."""
        B = q.shape[0]
        N, C = self.block_size, self.blocks_per_segment
        pos, real, reset = layout.position[:, 0], layout.real[:, 0], layout.reset[:, 0]
        if self._decodes_in_one_kernel(k, v, state):
            return self._decode_step_triton(q, k, v, pos, real, reset, state)
        block = torch.arange(C, device=q.device)[None]
        summaries = block < state.block_count[:, None]  # [B, C]

        boundary = (real & ~reset & (pos % self.segment_length == 0) & (pos > 0))[:, None, None]  # a new segment
        fold = boundary & self.folds
        restart = reset[:, None, None]
        emptied = (boundary | restart)[:, 0]  # [B, 1]
        slot_keys, slot_values = state.slot_keys, state.slot_values
        fold_k, fold_v, fold_keep = state.fold_key_sum, state.fold_value_sum, state.fold_keep
        # On CPU, asking whether any row folds or resets costs nothing and skips this on most steps; on
        # CUDA the step never asks (it stays sync-free and graph-capturable).
        if q.device.type != "cpu" or torch.compiler.is_compiling() or bool(emptied.any()):
            learned_k, learned_v = self.learned_slots()
            folded_k = torch.addcmul(fold_k, fold_keep[..., None], slot_keys)  # fold_keep * slots + fold_sum
            folded_v = torch.addcmul(fold_v, fold_keep[..., None], slot_values)
            slot_keys = torch.where(restart, learned_k, torch.where(fold, folded_k, slot_keys))
            slot_values = torch.where(restart, learned_v, torch.where(fold, folded_v, slot_values))
            fold_k = fold_k.masked_fill(emptied[..., None], 0.0)
            fold_v = fold_v.masked_fill(emptied[..., None], 0.0)
            fold_keep = fold_keep.masked_fill(emptied, 1.0)
        summaries = summaries & ~emptied
        block_count = state.block_count.masked_fill(emptied[:, 0], 0)
        open_k = state.open_key_sum.masked_fill(restart[:, 0], 0.0)
        open_v = state.open_value_sum.masked_fill(restart[:, 0], 0.0)
        open_n = state.open_count.masked_fill(reset, 0)

        S = slot_keys.shape[1]
        mask = torch.cat([summaries.new_ones(B, S), summaries & self.reads_blocks], 1)[:, None, None]  # [B, 1, 1, S + C]
        m = self._attend(q, torch.cat([slot_keys, state.block_keys], 1), torch.cat([slot_values, state.block_values], 1),
                         mask)

        open_k = open_k + k[:, 0].float() * real[:, None]
        open_v = open_v + v[:, 0].float() * real[:, None]
        open_n = open_n + real.long()
        closes = open_n == N
        closed_k, closed_v = self.close_blocks(open_k), self.close_blocks(open_v)
        if self.folds:  # the closed block routes to its slot (argmax against this segment's slot keys): an EMA step
            with torch.autocast(q.device.type, enabled=False):
                scores = torch.einsum("bcd,bsd->bcs", closed_k[:, None], slot_keys)[:, 0]
            # weight 1 - lam on the routed slot of a row whose block closed, 0 elsewhere: fold <- fold + w (k - fold)
            weight = F.one_hot(scores.argmax(-1), S).to(fold_keep.dtype) * ((1.0 - self.decay) * closes[:, None])
            fold_keep = fold_keep - fold_keep * weight
            fold_k = torch.lerp(fold_k, closed_k[:, None], weight[..., None])
            fold_v = torch.lerp(fold_v, closed_v[:, None], weight[..., None])
        write = ((block == block_count.clamp(max=C - 1)[:, None]) & closes[:, None])[..., None]  # [B, C, 1]
        new_state = MemoryState(
            open_key_sum=open_k.masked_fill(closes[:, None], 0.0),
            open_value_sum=open_v.masked_fill(closes[:, None], 0.0),
            open_count=open_n.masked_fill(closes, 0),
            block_keys=torch.where(write, closed_k[:, None], state.block_keys),
            block_values=torch.where(write, closed_v[:, None], state.block_values),
            block_count=block_count + closes.long(),
            slot_keys=slot_keys, slot_values=slot_values,
            fold_key_sum=fold_k, fold_value_sum=fold_v, fold_keep=fold_keep,
        )
        return m, new_state

    def _decodes_in_one_kernel(self, k: Tensor, v: Tensor, state: MemoryState) -> bool:
        """The step's state update runs as one Triton kernel (``memory_triton.decode_step_triton``) where the
        backend resolves to Triton, eagerly and without gradients (the kernel has no backward)."""
        if torch.compiler.is_compiling() or resolve_backend(self.kernel_backend, k.device) != "triton":
            return False
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in (k, v, *state.tensors().values())))

    def _decode_step_triton(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, real: Tensor, reset: Tensor,
                            state: MemoryState):
        """``_decode_step`` with its state update in one launch, which writes the attention's entries
        [slots, summaries] in one buffer per keys and values; the new state's slots and summaries are views of it."""
        from .memory_triton import decode_step_triton

        S, C = self.slot_keys.shape[0], self.blocks_per_segment
        learned_k, learned_v = self.learned_slots()
        keys, values, visible, fields = decode_step_triton(state, k[:, 0], v[:, 0], pos, real, reset, learned_k,
                                                           learned_v, self.block_size, self.segment_length, self.decay,
                                                           self.folds)
        sees = torch.arange(C, device=q.device)[None] < visible[:, None]  # the summaries completed before this token
        if not self.reads_blocks:
            sees = torch.zeros_like(sees)
        mask = torch.cat([sees.new_ones(q.shape[0], S), sees], 1)[:, None, None]  # [B, 1, 1, S + C]
        m = self._attend(q, keys, values, mask)
        return m, MemoryState(slot_keys=keys[:, :S], slot_values=values[:, :S], block_keys=keys[:, S:],
                              block_values=values[:, S:], **fields)
