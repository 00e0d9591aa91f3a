"""Positions, padding and packing (docs/ARCHITECTURE.md section 5).

A position counts the real tokens of a row (attention_mask = 1) since the row's stream,
or its current document, began: p = offset + cumsum(mask) - 1. Memory block and segment
boundaries are functions of p only, so they fall in the same places whether a sequence is
fed whole, in chunks, token by token, or left-padded inside a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor


@dataclass
class TokenLayout:
    """Per-token bookkeeping shared by every layer. All tensors are [B, T]."""

    position: Tensor  # long; position of each real token (meaningless at padding)
    real: Tensor  # bool; attention_mask == 1
    reset: Tensor  # bool; a real token that starts a new document (packed rows)
    offset: Tensor  # [B] long; real tokens the row's stream saw before this call (the cache's count)
    has_resets: bool = False  # position_ids were given, so ``reset`` may hold True anywhere
    fresh: bool = False  # no cache: every row starts at position 0 (offset is all zeros)
    dense: bool = False  # every token is real and none starts a document (the short conv needs no index)
    keeps_state: bool = True  # the caller returns the state after the last token (use_cache): else the memory
    # does not compute its state after the call (nobody reads it) and returns the one it was given
    memo: dict = field(default_factory=dict, repr=False)  # per-forward values shared by all layers

    def next_position(self, offset: Tensor) -> Tensor:
        """[B] long: the position of each row's next real token (``offset`` where the row had none)."""
        T = self.real.shape[1]
        steps = torch.arange(1, T + 1, device=self.real.device)
        last = (self.real.long() * steps).argmax(dim=1)  # index of the last real token
        after_last = self.position.gather(1, last[:, None])[:, 0] + 1
        return torch.where(self.real.any(dim=1), after_last, offset)


def token_layout(
    attention_mask: Tensor, position_ids: Optional[Tensor], offset: Tensor, fresh: bool = False, dense: bool = False,
    keeps_state: bool = True,
) -> TokenLayout:
    """attention_mask: [B, T] (1 = real token); position_ids: [B, T] or None; offset: [B] long.

    Without position_ids, positions continue from ``offset`` (the cache's count). With them,
    they are taken as given and every real token at position 0 starts a new document.
    ``fresh``: the caller knows that ``offset`` is all zeros (no cache), which lets the memory
    size its layout without asking the device. ``dense``: the caller knows that every token is
    real; it holds only without position_ids. ``keeps_state``: the state after the last token is returned.
    """
    real = attention_mask.bool()
    if position_ids is None:
        position = offset[:, None] + real.long().cumsum(dim=1) - 1
        reset = torch.zeros_like(real)
    else:
        position = position_ids.long()
        reset = real & (position == 0)
    position = position.masked_fill(~real, 0)
    return TokenLayout(position=position, real=real, reset=reset, offset=offset, has_resets=position_ids is not None,
                       fresh=fresh, dense=dense and position_ids is None, keeps_state=keeps_state)
