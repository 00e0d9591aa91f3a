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
"""

from __future__ import annotations

import math
import types
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gated_fold(slots: Tensor, summaries: Tensor, beta: Tensor, keys_width: int) -> Tensor:
    """One segment's fold with per-block write strengths. slots: [B, S, 2d] (keys | values) at the segment's
    start; summaries: [B, C, 2d]; beta: [B, C] in (0, 1). Routing as the model's (argmax against the slot keys,
    ties to the lowest, no gradient). Returns the slots after the fold [B, S, 2d]."""
    d, S = keys_width, slots.shape[1]
    beta = beta.clamp(max=1.0 - 1e-6)  # a saturated sigmoid: log(1 - beta) stays finite
    with torch.no_grad():
        route = F.one_hot(torch.einsum("bcd,bsd->bcs", summaries[..., :d], slots[..., :d]).argmax(-1), S)
    log_kept = route.to(slots.dtype) * torch.log1p(-beta)[..., None]  # [B, C, S]: log(1 - beta) on the routed slot
    later = log_kept.flip(1).cumsum(1).flip(1) - log_kept  # sum over the later blocks of the same slot
    weight = route * beta[..., None] * torch.exp(later)
    keep = torch.exp(log_kept.sum(1))  # [B, S]
    return keep[..., None] * slots + torch.einsum("bcs,bce->bse", weight, summaries)


def _write_gated_segment_slots(self, summaries: Tensor, state, restart: Tensor) -> Tensor:
    """``MultiMemoryAttention._segment_slots`` with ``gated_fold``: a loop over segments, in PyTorch."""
    B, K, _, width = summaries.shape
    d = width // 2
    start = torch.cat([state.slot_keys, state.slot_values], -1)
    if K == 1 or not self.folds:
        return start[:, None].expand(B, K, -1, width)
    beta = torch.sigmoid(summaries[..., :d] @ self.write_weight.float() + self.write_bias.float())  # [B, K, C]
    learned = torch.cat(self.learned_slots(), -1)
    slots, out = start, [start]
    for s in range(1, K):
        slots = torch.where(restart[:, s, None, None], learned, gated_fold(slots, summaries[:, s - 1], beta[:, s - 1], d))
        out.append(slots)
    return torch.stack(out, 1)


def write_gate(model: nn.Module, initial_rate: float = 0.1) -> nn.Module:
    """Give every memory of ``model`` (an MMRecForCausalLM) the ``write-gate`` fold, in place; returns it."""
    if not 0.0 < initial_rate < 1.0:
        raise ValueError(f"initial_rate must be in (0, 1), got {initial_rate}")
    memories = [layer.memory for layer in model.model.layers if layer.memory is not None]
    if not memories:
        raise ValueError("write_gate: the model has no memory (memory_levels='none')")
    for memory in memories:
        d = memory.slot_keys.shape[1]
        device, dtype = memory.slot_keys.device, memory.slot_keys.dtype
        memory.write_weight = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))
        memory.write_bias = nn.Parameter(torch.tensor(math.log(initial_rate / (1.0 - initial_rate)), device=device,
                                                      dtype=dtype))
        memory._segment_slots = types.MethodType(_write_gated_segment_slots, memory)
    return model


PROTOTYPES: Dict[str, Callable[[nn.Module], nn.Module]] = {"write-gate": write_gate}
