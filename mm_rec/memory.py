"""Multi-memory attention over the hierarchical memory (ARCHITECTURE.md section 2).

A token at position p attends, per head, over
  * the S long-term slots as they stand for p's segment, and
  * the level-1 summaries (mean k, mean v) of the blocks of p's segment completed before p.
At a segment boundary the segment's summaries fold into the slots (``fold_into_slots``);
at a document start (packed rows) the memory returns to the layer's learned slots.

The input is processed in windows of whole segments (``window_length`` tokens) carrying a
``LayerState``, so the attention is [window x (slots + summaries)], never [T x T]. Inside a
window, a row's tokens fall into "local segments" (runs between boundaries); local segment
0 continues the carried state. Everything below is vectorised over rows with masks, since
rows of a batch sit at different positions (left padding, caches of other lengths).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import LayerState
from .positions import TokenLayout

CUDA_WINDOW_TOKENS = 2048


def fold_into_slots(
    slot_keys: Tensor, slot_values: Tensor, block_keys: Tensor, block_values: Tensor,
    selected: Tensor, decay: float,
) -> Tuple[Tensor, Tensor]:
    """Fold the selected block summaries, in order, into the slots (closed form of the EMA).

    slot_*: [B, S, d]; block_*: [B, E, d]; selected: [B, E] bool.
    Block i routes to j(i) = argmax_j <K_j, k_i> with the slots as given (ties: lowest j);
    slot j with routed blocks i_1..i_m becomes lam^m K_j + (1 - lam) sum_r lam^(m-r) k_(i_r).
    """
    S = slot_keys.shape[1]
    scores = torch.einsum("bed,bsd->bes", block_keys, slot_keys)
    route = F.one_hot(scores.argmax(-1), S).to(slot_keys.dtype) * selected[..., None]  # [B, E, S]
    count = route.sum(1)  # m_j: [B, S]
    rank = (route.cumsum(1) * route).sum(-1)  # r of each block among its slot's blocks (1-based)
    m_of_block = (route * count[:, None]).sum(-1)
    weight = (1.0 - decay) * decay ** (m_of_block - rank) * selected  # [B, E]
    keep = decay ** count[..., None]  # [B, S, 1]
    new_keys = keep * slot_keys + torch.einsum("bes,be,bed->bsd", route, weight, block_keys)
    new_values = keep * slot_values + torch.einsum("bes,be,bed->bsd", route, weight, block_values)
    return new_keys, new_values


def _gather_sum(index: Tensor, size: int, *sources: Tensor) -> Tuple[Tensor, ...]:
    """out[b, i] = sum of src[b, t] over t with index[b, t] == i, for each src [B, T, ...];
    index: [B, T] in [0, size], where index == size drops the row. A one-hot batched matmul:
    deterministic, and cheap on tensor cores (size is the number of blocks in a window)."""
    onehot = F.one_hot(index, size + 1)[..., :size].transpose(1, 2)  # [B, size, T]
    return tuple(torch.bmm(onehot.to(src.dtype), src.flatten(2)).view(src.shape[0], size, *src.shape[2:])
                 for src in sources)


def _add_to_first(blocks: Tensor, carried: Tensor) -> Tensor:
    """blocks[:, 0] + carried, out of place (autograd-safe)."""
    return torch.cat([blocks[:, :1] + carried[:, None], blocks[:, 1:]], 1)


def _scatter_max_rows(index: Tensor, src: Tensor, size: int, fill: int) -> Tensor:
    out = src.new_full((src.shape[0], size + 1), fill)
    return out.scatter_reduce_(1, index, src, reduce="amax")[:, :size]


class MultiMemoryAttention(nn.Module):
    """Holds the layer's learned long-term slots K^L, V^L: [S, d]."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.block_size = config.memory_block_size
        self.segment_length = config.memory_segment_length
        self.blocks_per_segment = config.blocks_per_segment
        self.decay = float(config.memory_decay)
        # Tokens per parallel step (whole segments); None: by device, see window_length_for.
        self.window_length = None
        self.slot_keys = nn.Parameter(torch.randn(config.num_memory_slots, config.hidden_size))
        self.slot_values = nn.Parameter(torch.randn(config.num_memory_slots, config.hidden_size))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, layout: TokenLayout, state: LayerState) -> Tuple[Tensor, LayerState]:
        """q, k, v: [B, T, d]; returns (m [B, T, d] in q.dtype, the state after the last token)."""
        if q.shape[1] == 1:
            return self._decode_step(q, k, v, layout, state)
        # split (not slicing) so that autograd's backward is one cat, not a zero-filled [B, T, d] per window
        length = self.window_length or self.window_length_for(q.device)
        windows = zip(*(t.split(length, dim=1) for t in (q, k, v, layout.position, layout.real, layout.reset)))
        outputs = []
        for q_w, k_w, v_w, pos_w, real_w, reset_w in windows:
            m, state = self._window(q_w, k_w, v_w, TokenLayout(pos_w, real_w, reset_w), state)
            outputs.append(m)
        return torch.cat(outputs, dim=1), state

    def window_length_for(self, device: torch.device) -> int:
        """The result does not depend on the window (every mask is by position). One window step
        is ~100 small kernels: on CUDA their launch cost dominates, so windows span several
        segments (about CUDA_WINDOW_TOKENS); on CPU the [window x entries] attention dominates,
        so a window is one segment."""
        if device.type != "cuda":
            return self.segment_length
        return self.segment_length * max(1, CUDA_WINDOW_TOKENS // self.segment_length)

    def _attend(self, q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        """Per-head softmax attention. q: [B, W, d]; keys, values: [B, E, d]; mask: [B, 1, W, E]."""
        heads = lambda t: t.to(q.dtype).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # noqa: E731
        m = F.scaled_dot_product_attention(heads(q), heads(keys), heads(values), attn_mask=mask)
        return m.transpose(1, 2).flatten(2)

    def _decode_step(self, q: Tensor, k: Tensor, v: Tensor, layout: TokenLayout, state: LayerState):
        """The lean path for one token per row (decoding): O((S + C) d), no window bookkeeping."""
        B = q.shape[0]
        N, L, C = self.block_size, self.segment_length, self.blocks_per_segment
        pos, real, reset = layout.position[:, 0], layout.real[:, 0], layout.reset[:, 0]
        slot_keys, slot_values = state.slot_keys, state.slot_values
        block_keys, block_values, block_count = state.block_keys, state.block_values, state.block_count
        open_k, open_v, open_n = state.open_key_sum, state.open_value_sum, state.open_count
        summaries = torch.arange(C, device=q.device)[None] < block_count[:, None]  # [B, C]

        fold = real & ~reset & (pos % L == 0) & (pos > 0)
        # Asking the host whether any row folds or resets is a sync on CUDA, but a decode step is
        # launch-bound: on an H100, always running both updates under torch.where was slower
        # (12 vs 8 ms/token at d=256, 23 vs 16 ms at d=2048), so the checks stay everywhere.
        if bool(fold.any()):
            folded_k, folded_v = fold_into_slots(slot_keys, slot_values, block_keys, block_values, summaries, self.decay)
            slot_keys = torch.where(fold[:, None, None], folded_k, slot_keys)
            slot_values = torch.where(fold[:, None, None], folded_v, slot_values)
        if bool(reset.any()):
            slot_keys = torch.where(reset[:, None, None], self.slot_keys.float(), slot_keys)
            slot_values = torch.where(reset[:, None, None], self.slot_values.float(), slot_values)
            open_n = open_n.masked_fill(reset, 0)
            open_k = open_k.masked_fill(reset[:, None], 0.0)
            open_v = open_v.masked_fill(reset[:, None], 0.0)
        block_count = block_count.masked_fill(fold | reset, 0)
        summaries = summaries & ~(fold | reset)[:, None]

        S = slot_keys.shape[1]
        mask = torch.cat([summaries.new_ones(B, S), summaries], 1)[:, None, None]  # [B, 1, 1, S + C]
        m = self._attend(q, torch.cat([slot_keys, block_keys], 1), torch.cat([slot_values, block_values], 1), mask)

        open_k = open_k + k[:, 0].float() * real[:, None]
        open_v = open_v + v[:, 0].float() * real[:, None]
        open_n = open_n + real.long()
        closes = open_n == N
        at = block_count.clamp(max=C - 1)
        write = F.one_hot(at, C).bool() & closes[:, None]  # [B, C]
        block_keys = torch.where(write[..., None], (open_k / N)[:, None], block_keys)
        block_values = torch.where(write[..., None], (open_v / N)[:, None], block_values)
        new_state = LayerState(
            h=state.h,
            open_key_sum=open_k.masked_fill(closes[:, None], 0.0),
            open_value_sum=open_v.masked_fill(closes[:, None], 0.0),
            open_count=open_n.masked_fill(closes, 0),
            block_keys=block_keys, block_values=block_values, block_count=block_count + closes.long(),
            slot_keys=slot_keys, slot_values=slot_values,
        )
        return m, new_state

    def _window(self, q: Tensor, k: Tensor, v: Tensor, layout: TokenLayout, state: LayerState):
        B, W, d = q.shape
        N, L, C = self.block_size, self.segment_length, self.blocks_per_segment
        pos, real, reset = layout.position, layout.real, layout.reset
        rows = torch.arange(B, device=q.device)

        # Local segments: a new one starts at a document start or a segment boundary.
        boundary = real & (reset | ((pos % L == 0) & (pos > 0)))
        local_seg = boundary.long().cumsum(1)  # [B, W]
        num_local = int(local_seg.max()) + 1

        # Blocks: local block 0 continues the carried open block.
        local_block = (real & (pos % N == 0)).long().cumsum(1)
        num_blocks = int(local_block[:, -1].max()) + 1
        index = local_block.masked_fill(~real, num_blocks)
        key_sum, value_sum, count = _gather_sum(index, num_blocks, k.float(), v.float(), real[..., None].float())
        count = count[..., 0].round().long()
        key_sum = _add_to_first(key_sum, state.open_key_sum)
        value_sum = _add_to_first(value_sum, state.open_value_sum)
        count = _add_to_first(count, state.open_count)
        complete = count == N
        block_visible_from = _scatter_max_rows(index, torch.where(real, pos + 1, 0), num_blocks, 0)
        block_local_seg = _scatter_max_rows(index, local_seg, num_blocks, 0)

        # Level-1 entries: the carried summaries (local segment 0), then this window's blocks.
        entry_keys = torch.cat([state.block_keys, key_sum / N], 1)  # [B, E, d]
        entry_values = torch.cat([state.block_values, value_sum / N], 1)
        carried = torch.arange(C, device=q.device)[None] < state.block_count[:, None]
        entry_valid = torch.cat([carried, complete], 1)
        entry_seg = torch.cat([torch.zeros_like(state.block_count)[:, None].expand(B, C), block_local_seg], 1)
        entry_from = torch.cat([torch.full_like(carried, -1, dtype=torch.long), block_visible_from], 1)

        # Long-term slots for each local segment: fold at a boundary, re-initialise at a reset.
        starts_with_reset = torch.zeros(B, num_local, dtype=torch.bool, device=q.device)
        starts_with_reset[rows[:, None].expand(B, W)[boundary], local_seg[boundary]] = reset[boundary]
        slot_keys, slot_values = [state.slot_keys], [state.slot_values]
        init_keys = self.slot_keys.float()[None].expand(B, -1, -1)
        init_values = self.slot_values.float()[None].expand(B, -1, -1)
        for seg in range(1, num_local):
            folded_k, folded_v = fold_into_slots(
                slot_keys[-1], slot_values[-1], entry_keys, entry_values,
                entry_valid & (entry_seg == seg - 1), self.decay,
            )
            fresh = starts_with_reset[:, seg, None, None]
            slot_keys.append(torch.where(fresh, init_keys, folded_k))
            slot_values.append(torch.where(fresh, init_values, folded_v))
        slot_keys, slot_values = torch.stack(slot_keys, 1), torch.stack(slot_values, 1)  # [B, K, S, d]

        # Attention over [slots of every local segment | entries], masked per token.
        S = slot_keys.shape[2]
        slot_owner = torch.arange(num_local, device=q.device).repeat_interleave(S)
        sees_slot = local_seg[..., None] == slot_owner
        sees_entry = (
            entry_valid[:, None] & (entry_seg[:, None] == local_seg[..., None]) & (entry_from[:, None] <= pos[..., None])
        )
        mask = torch.cat([sees_slot, sees_entry], -1)[:, None]  # [B, 1, W, K*S + E]
        m = self._attend(q, torch.cat([slot_keys.flatten(1, 2), entry_keys], 1),
                         torch.cat([slot_values.flatten(1, 2), entry_values], 1), mask)

        # The state after the window, per row: its last local segment and last block.
        last_seg = local_seg[:, -1]
        keep = entry_valid & (entry_seg == last_seg[:, None])
        slot = keep.long().cumsum(1) - 1
        target = slot.masked_fill(~keep, C)  # compacted, in order; capacity C
        compacted_keys, compacted_values = _gather_sum(target, C, entry_keys, entry_values)
        last_block = local_block[:, -1]
        open_done = complete[rows, last_block]
        zero = torch.zeros((), device=q.device)
        new_state = LayerState(
            h=state.h,
            open_key_sum=torch.where(open_done[:, None], zero, key_sum[rows, last_block]),
            open_value_sum=torch.where(open_done[:, None], zero, value_sum[rows, last_block]),
            open_count=torch.where(open_done, 0, count[rows, last_block]),
            block_keys=compacted_keys,
            block_values=compacted_values,
            block_count=keep.sum(1),
            slot_keys=slot_keys[rows, last_seg],
            slot_values=slot_values[rows, last_seg],
        )
        return m, new_state
