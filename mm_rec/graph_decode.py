"""Decoding one token per row from a CUDA graph (docs/ARCHITECTURE.md section 3).

A decode step is hundreds of small kernels whose launch cost, not their arithmetic, sets the
time per token. ``GraphDecoder`` captures the whole step (embedding, every layer, the head's
logits) once per batch size in a CUDA graph over static buffers and replays it. The step is
free of host synchronisation (folds and resets are selected by masks), so the replay runs
the very kernels the eager step runs: the same logits, bit for bit.

The static state buffers are handed to the cache the step returns, so consecutive steps copy
nothing. A cache that does not hold them is copied in with one multi-tensor copy; a cache
that held them before and would otherwise see them overwritten first gets its own copies.
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .cache import LayerState, MMRecCache

_NAMES = LayerState.names()


def _state(cache) -> List[Tensor]:
    return [t for layer in cache.layers for t in layer.tensors().values()] + [cache.position]


def _set_state(cache, tensors: List[Tensor]) -> None:
    n = len(_NAMES)
    cache.layers = [LayerState.from_tensors(dict(zip(_NAMES, tensors[i * n:(i + 1) * n])))
                    for i in range(len(tensors) // n)]
    cache.position = tensors[-1]


class _Captured:
    def __init__(self, model, cache, batch_size: int, cache_field: str):
        self.cache_field = cache_field
        device = cache.position.device
        self.input_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.attention_mask = torch.ones(batch_size, 1, dtype=torch.long, device=device)
        self.state = [t.clone() for t in _state(cache)]
        self.graph = torch.cuda.CUDAGraph()
        self.logits: Optional[Tensor] = None
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the capture (allocations, library handles)
            for _ in range(2):
                self._step(model, copy_back=False)
        torch.cuda.current_stream(device).wait_stream(side)
        with torch.cuda.graph(self.graph):
            self.logits = self._step(model, copy_back=True)

    def _step(self, model, copy_back: bool) -> Tensor:
        shadow = MMRecCache([], self.state[-1])  # a cache object of its own: the forward replaces its tensors
        _set_state(shadow, list(self.state))
        out = model(input_ids=self.input_ids, attention_mask=self.attention_mask, use_cache=True, logits_to_keep=1,
                    **{self.cache_field: shadow})
        if copy_back:
            torch._foreach_copy_(self.state, _state(getattr(out, self.cache_field)))
        return out.logits


class GraphDecoder:
    """Replays a captured decode step for ``model`` (an MMRecForCausalLM in eval mode on CUDA)."""

    def __init__(self):
        self._captured: Dict[Tuple, _Captured] = {}
        self._owner: Dict[Tuple, weakref.ref] = {}

    def __deepcopy__(self, memo):  # graphs belong to one model's buffers: a copy captures its own
        return GraphDecoder()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def step(self, model, input_ids: Tensor, attention_mask: Optional[Tensor], cache, cache_field: str) -> Tensor:
        """input_ids: [B, 1]; attention_mask: [B, 1] or None; cache: the MMRecCache to continue
        (afterwards it holds the state after the token). Returns the logits [B, 1, vocab] fp32."""
        B = input_ids.shape[0]
        weight = model.get_input_embeddings().weight
        key = (B, weight.device, weight.dtype, weight.data_ptr(), model.lm_head.weight.data_ptr())
        captured = self._captured.get(key)
        if captured is None:
            captured = self._captured[key] = _Captured(model, cache, B, cache_field)
        static, current = captured.state, _state(cache)
        if any(a.data_ptr() != b.data_ptr() for a, b in zip(static, current)):
            owner = self._owner.get(key)
            holder = owner() if owner is not None else None
            if holder is not None and holder is not cache and _state(holder)[0].data_ptr() == static[0].data_ptr():
                _set_state(holder, [t.clone() for t in static])  # keep an earlier stream's state
            torch._foreach_copy_(static, current)
        captured.input_ids.copy_(input_ids)
        if attention_mask is None:
            captured.attention_mask.fill_(1)
        else:
            captured.attention_mask.copy_(attention_mask)
        captured.graph.replay()
        _set_state(cache, list(static))
        self._owner[key] = weakref.ref(cache)
        return captured.logits.clone()
