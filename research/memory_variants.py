"""Prototypes of the memory's write rule for the long-context study, applied to a built MM-Rec (not product config).

A prototype replaces how a layer's finished segments fold into its long-term slots
(``MultiMemoryAttention._segment_slots``, the parallel path) and adds its own parameters, so the study
can train and score it without a field in ``MMRecConfig``. Only the parallel forward changes: a
prototype is for training and for scoring whole rows from a fresh state; the cache it returns still
carries the model's own EMA fold, so continuing a stream from it (chunked forward, decoding) is not
exact. One that measures better on the long tasks moves into ``mm_rec`` with every path (chunked,
decode, its kernels) and the exactness tests.

``write-gate``: a learned write strength per block, beta_i = sigmoid(w . k_i + b). Slot j, with blocks
i_1 .. i_m routed to it (the model's argmax routing), becomes
    prod_r (1 - beta_(i_r)) K_j + sum_r beta_(i_r) prod_(r' > r) (1 - beta_(i_r')) k_(i_r),
the EMA with a per-block rate: with beta = 1 - memory_decay everywhere it is the model's fold. A block
with beta near 1 replaces its slot; near 0 it is not written. b starts at logit(0.1) (ten times the
default's rate), w at zero.

``address``: the model's EMA fold, but each block routes to argmax_j <K^L_j, k_i> against the layer's
learned slot keys K^L (fixed addresses) instead of the slots as the earlier folds left them. The routes
then no longer depend on the fold history: every segment's routing is one batched product and the
whole fold one scan, with no sequential step (issue 27's alternative to the per-segment routing
kernels). ``address-gate``: the same routes with the write-gate's per-block strengths.

``window``: level 1 reads two segments. With blocks of one token a segment's first tokens see no
earlier token of the stream exactly (only h, the slots and the convolution), which shows as a rise of
the loss at every segment start. Here each token also attends to every block of the previous segment
of its document (none at a row's first segment or where its segment starts a document): entries
[slots, previous segment's blocks, this segment's earlier blocks]. The fold is the model's. A decode
state for it would carry the previous segment's C summaries beside the current ones (still a fixed
size); the prototype has none, so only whole rows from a fresh state are exact.
"""

from __future__ import annotations

import math
import types
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm_rec.scan import scan


def routes(block_keys: Tensor, addresses: Tensor) -> Tensor:
    """The one-hot route [..., C, S] of each block [..., C, d] to its argmax_j <addresses_j, k_i> (ties to the
    lowest j), addresses [..., S, d]; no gradient."""
    with torch.no_grad():
        scores = torch.einsum("...cd,...sd->...cs", block_keys, addresses)
        return F.one_hot(scores.argmax(-1), addresses.shape[-2]).to(block_keys.dtype)


def gated_weights(route: Tensor, beta: Tensor) -> Tuple[Tensor, Tensor]:
    """The fold with per-block write strengths as weights: route [..., C, S] one-hot, beta [..., C] in (0, 1) ->
    (weight [..., C, S], log_keep [..., S]) with new slots = exp(log_keep) * slots + weight^T @ blocks (as
    ``fold_weights``, whose keep is exp(log_keep)). The log, which the scan takes, rather than keep: a slot
    written at nearly full strength keeps exp(-large), which underflows to 0 in float32."""
    beta = beta.clamp(max=1.0 - 1e-6)  # a saturated sigmoid: log(1 - beta) stays finite
    log_kept = route * torch.log1p(-beta)[..., None]  # log(1 - beta) on the routed slot
    later = log_kept.flip(-2).cumsum(-2).flip(-2) - log_kept  # sum over the later blocks of the same slot
    return route * beta[..., None] * torch.exp(later), log_kept.sum(-2)


def gated_fold(slots: Tensor, summaries: Tensor, beta: Tensor, keys_width: int) -> Tensor:
    """One segment's fold with per-block write strengths. slots: [B, S, 2d] (keys | values) at the segment's
    start; summaries: [B, C, 2d]; beta: [B, C] in (0, 1). Routing as the model's (argmax against the slot keys,
    ties to the lowest, no gradient). Returns the slots after the fold [B, S, 2d]."""
    d = keys_width
    weight, log_keep = gated_weights(routes(summaries[..., :d], slots[..., :d]), beta)
    return torch.exp(log_keep)[..., None] * slots + torch.einsum("bcs,bce->bse", weight, summaries)


def _write_gated_segment_slots(self, summaries: Tensor, state, restart: Tensor) -> Tensor:
    """``MultiMemoryAttention._segment_slots`` with ``gated_fold``: a loop over segments, in PyTorch."""
    B, K, _, width = summaries.shape
    d = width // 2
    start = torch.cat([state.slot_keys, state.slot_values], -1)
    if K == 1 or not self.folds:
        return start[:, None].expand(B, K, -1, width)
    summaries = summaries.float()  # blocks of one token arrive in the compute dtype
    beta = torch.sigmoid(summaries[..., :d] @ self.write_weight.float() + self.write_bias.float())  # [B, K, C]
    learned = torch.cat(self.learned_slots(), -1)
    slots, out = start, [start]
    for s in range(1, K):
        slots = torch.where(restart[:, s, None, None], learned, gated_fold(slots, summaries[:, s - 1], beta[:, s - 1], d))
        out.append(slots)
    return torch.stack(out, 1)


def _addressed_segment_slots(self, summaries: Tensor, state, restart: Tensor) -> Tensor:
    """``MultiMemoryAttention._segment_slots`` with the routes taken against the learned slot keys: every
    segment's weights at once, then the model's scan (no loop over segments). With ``self.write_weight``
    (``address-gate``) the weights are the write gate's, else the model's EMA."""
    B, K, C, width = summaries.shape
    d, S = width // 2, self.slot_keys.shape[0]
    start = torch.cat([state.slot_keys, state.slot_values], -1)
    if K == 1 or not self.folds:
        return start[:, None].expand(B, K, S, width)
    learned = self.learned_slots()
    blocks = summaries[:, :-1].float()  # [B, K-1, C, 2d]: segment s - 1 folds into segment s
    if hasattr(self, "write_weight"):
        beta = torch.sigmoid(blocks[..., :d] @ self.write_weight.float() + self.write_bias.float())
    else:  # the EMA: every block at the model's constant rate
        beta = blocks.new_full(blocks.shape[:-1], 1.0 - self.decay)
    weight, log_keep = gated_weights(routes(blocks[..., :d], learned[0]), beta)
    fresh = restart[:, 1:, None, None]
    inputs = torch.where(fresh, torch.cat(learned, -1), torch.einsum("bkcs,bkce->bkse", weight, blocks))
    log_keep = log_keep[..., None].masked_fill(fresh, float("-inf")).expand(-1, -1, -1, width)
    later, _ = scan(inputs.flatten(2), log_keep.flatten(2), start.flatten(1), backend=self.kernel_backend)
    return torch.cat([start[:, None], later.view(B, K - 1, S, width)], 1)


def _windowed_segment_slots(self, summaries: Tensor, state, restart: Tensor) -> Tensor:
    """The model's own ``_segment_slots``; it also keeps the segment layout (rows, segments, which segments
    start a document) for ``_attend_tokens_windowed``, which sees the segments flattened into one axis."""
    self._window_layout = (summaries.shape[0], summaries.shape[1], restart)
    return type(self)._segment_slots(self, summaries, state, restart)


def _attend_tokens_windowed(self, q: Tensor, slots: Tensor, blocks: Tensor) -> Tensor:
    """``_attend_tokens`` over [slots, the previous segment's C blocks, this segment's blocks 0 .. C - 2]: the token
    at offset j sees every slot, every block of the previous segment of its document, and the blocks c < j.
    q: [G, L, d]; slots: [G, S, 2d]; blocks: [G, C, 2d], G = B * K segments, in order."""
    B, K, restart = self._window_layout
    G, L, d = q.shape
    S, C = slots.shape[1], blocks.shape[1]
    per_row = blocks.view(B, K, C, -1)
    previous = torch.cat([torch.zeros_like(per_row[:, :1]), per_row[:, :-1]], 1).view(G, C, -1)
    has_previous = torch.ones(B, K, dtype=torch.bool, device=q.device)
    has_previous[:, 0] = False
    has_previous &= ~restart  # a segment that starts a document reads nothing of the one before
    entries = torch.cat([slots.to(q.dtype), previous.to(q.dtype), blocks[:, :-1].to(q.dtype)], 1)
    E = entries.shape[1]
    columns = torch.ones(G, E, dtype=torch.bool, device=q.device)
    columns[:, S:S + C] = has_previous.view(G, 1)
    causal = torch.ones(L, E, dtype=torch.bool, device=q.device).tril(E - L)  # the token at j sees e < E - L + j
    return self._attend(q, entries[..., :d], entries[..., d:], (causal & columns[:, None])[:, None])


def window(model: nn.Module) -> nn.Module:
    """Give every memory of ``model`` a level 1 of two segments (``window``), in place; returns it."""
    if model.config.memory_block_size != 1:
        raise ValueError(f"window: needs memory_block_size=1 (blocks of one token), got {model.config.memory_block_size}")
    for memory in _memories(model, "window"):
        memory._segment_slots = types.MethodType(_windowed_segment_slots, memory)
        memory._attend_tokens = types.MethodType(_attend_tokens_windowed, memory)
    return model


def _memories(model: nn.Module, prototype: str) -> list:
    memories = [layer.memory for layer in model.model.layers if layer.memory is not None]
    if not memories:
        raise ValueError(f"{prototype}: the model has no memory (memory_levels='none')")
    return memories


def _add_gate(memory: nn.Module, initial_rate: float) -> None:
    if not 0.0 < initial_rate < 1.0:
        raise ValueError(f"initial_rate must be in (0, 1), got {initial_rate}")
    d = memory.slot_keys.shape[1]
    device, dtype = memory.slot_keys.device, memory.slot_keys.dtype
    memory.write_weight = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))
    memory.write_bias = nn.Parameter(torch.tensor(math.log(initial_rate / (1.0 - initial_rate)), device=device,
                                                  dtype=dtype))


def write_gate(model: nn.Module, initial_rate: float = 0.1) -> nn.Module:
    """Give every memory of ``model`` (an MMRecForCausalLM) the ``write-gate`` fold, in place; returns it."""
    for memory in _memories(model, "write_gate"):
        _add_gate(memory, initial_rate)
        memory._segment_slots = types.MethodType(_write_gated_segment_slots, memory)
    return model


def address(model: nn.Module) -> nn.Module:
    """Give every memory of ``model`` the ``address`` fold (routes against the learned slot keys), in place."""
    for memory in _memories(model, "address"):
        memory._segment_slots = types.MethodType(_addressed_segment_slots, memory)
    return model


def address_gate(model: nn.Module, initial_rate: float = 0.1) -> nn.Module:
    """``address`` with the write gate's per-block strengths, in place."""
    for memory in _memories(model, "address_gate"):
        _add_gate(memory, initial_rate)
        memory._segment_slots = types.MethodType(_addressed_segment_slots, memory)
    return model


PROTOTYPES: Dict[str, Callable[[nn.Module], nn.Module]] = {"write-gate": write_gate, "address": address,
                                                           "address-gate": address_gate, "window": window}
