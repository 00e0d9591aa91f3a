"""The short convolution of a block (docs/ARCHITECTURE.md section 1).

A per-channel (depthwise) causal convolution of width K = ``config.short_conv_size`` over the
previous K - 1 real tokens of the same document and the current one. It reads C channels
(``conv_inputs``): the block's normed input u before the fused projection (C = d,
``short_conv_inputs="all"``), or the projections that feed the recurrence, z, g~ and p, after
it (C = d [+ d] + pe_dim, ``"recurrence"``). With u standing for whatever it reads:

    c_t = sum_{j<K} w[:, j] * u_(t-j)        u_(t-j): the j-th previous real token of t's document
                                             (0 where there is none)

Padding is invisible (the window skips it) and a document start (packed rows) empties the
window, so the result is the same however the stream is split, padded or packed. The carried
state is the last K - 1 real u's, oldest first ([B, K-1, C], float32; zeros before the
stream's or the document's start).

Both paths work on a compacted sequence per row, E = [state, this call's real u's in order]:
the token of real rank r reads E[r + K-1 - j]. Without padding or document starts
(``layout.dense``, the common training case) E is just [state, u] and no index is needed.
Otherwise the real tokens are gathered to the front, the window runs on E with the entries
before each document start masked, and the results are gathered back. Both paths add the same
products in the same order, so they agree bit for bit. On CUDA (``backend`` resolving to Triton,
eager) the dense path runs as one kernel each way (conv_triton.py) and keeps no float32 E.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor, nn

from .hem import projection_layout
from .positions import TokenLayout
from .scan import resolve_backend

RECURRENCE_INPUTS = ("z", "g", "p")  # the HEM slices "recurrence" convolves, in channel order


def conv_inputs(config) -> List[Tuple[str, int]]:
    """(name, width) of what the short convolution reads, in channel order: [("u", d)] with
    ``short_conv_inputs="all"``; with "recurrence" the HEM slices z, g (the "input" gate only)
    and p. The one statement of the conv's channels (its kernel's rows, its state's last axis).
    Without a convolution (short_conv_size=0) it reads nothing, and the empty state keeps d."""
    if getattr(config, "short_conv_inputs", "all") == "all" or not getattr(config, "short_conv_size", 0):
        return [("u", config.hidden_size)]
    return [(name, width) for name, width in projection_layout(config) if name in RECURRENCE_INPUTS]


def conv_channels(config) -> int:
    """C: the number of channels the short convolution reads and carries ([B, K-1, C] state)."""
    return sum(width for _, width in conv_inputs(config))


class ShortConv(nn.Module):
    """Depthwise causal convolution over real tokens. ``weight`` [C, K]: column j weighs the
    j-th previous real token; initialised to the identity (w[:, 0] = 1, the rest 0), so a fresh
    block computes what it computes without the convolution. ``backend``: the scan's choices
    (``config.kernel_backend``), for the dense path."""

    def __init__(self, channels: int, kernel_size: int, backend: str = "auto"):
        super().__init__()
        self.kernel_size = kernel_size
        self.backend = backend
        self.weight = nn.Parameter(identity_kernel(channels, kernel_size))

    def forward(self, u: Tensor, layout: TokenLayout, state: Tensor) -> Tuple[Tensor, Tensor]:
        """u: [B, T, C]; state: [B, K-1, C] float32, the previous K - 1 real u's (oldest first).
        Returns (c [B, T, C] in u's dtype, the state after this call [B, K-1, C] float32).
        At padding c is finite and meaningless."""
        K, T = self.kernel_size, u.shape[1]
        dtype = torch.promote_types(u.dtype, torch.float32)
        w = self.weight.to(dtype)
        if layout.dense:  # every token real, no document start: E = [state, u]
            if resolve_backend(self.backend, u.device) == "triton" and not torch.compiler.is_compiling():
                return _DenseWindow.apply(u, state.to(dtype), w)
            E = torch.cat([state.to(dtype), u.to(dtype)], 1)
            return _window_sum(E, w, T).to(u.dtype), E[:, T:].float()
        index = _compaction(layout, K)
        order = index["order"][..., None].expand_as(u)
        E = torch.cat([state.to(dtype), u.to(dtype).gather(1, order)], 1)  # [B, K-1+T, C]
        c = _window_sum(E, w, T, index["keep"]).gather(1, index["rank"][..., None].expand_as(u))  # token order
        new_state = E.gather(1, index["tail"][..., None].expand_as(state)) * index["tail_keep"]
        return c.to(u.dtype), new_state.float()


def _window_sum(E: Tensor, w: Tensor, T: int, keep=None) -> Tensor:
    """sum_j w[:, j] * E[:, r + K-1 - j] (* keep[j]) for r < T: K shifted slices of E [B, K-1+T, C]
    (views: the backward keeps E alone), in the same order in both paths. keep: [K, B, T, 1] or None."""
    K = w.shape[1]
    c = None
    for j in range(K):
        term = w[:, j] * E[:, K - 1 - j:K - 1 - j + T]
        if keep is not None:
            term = term * keep[j]
        c = term if c is None else c + term
    return c


class _DenseWindow(torch.autograd.Function):
    """The dense path, (_window_sum([state, u], w, T) in u's dtype, E's last K - 1 rows as float32),
    as one node: conv_triton.py's kernels, which read E's rows from u and state, so the node saves
    u, state and w alone. state, w: in the compute dtype."""

    @staticmethod
    def forward(ctx, u, state, w):
        from .conv_triton import short_conv_fwd

        ctx.save_for_backward(u, state, w)
        T, window = u.shape[1], state.shape[1]
        tail = torch.cat([state, u[:, max(T - window, 0):].to(state.dtype)], 1)[:, min(T, window):]  # E[:, T:]
        return short_conv_fwd(u, state, w), tail.float()

    @staticmethod
    def backward(ctx, d_c, d_new):
        from .conv_triton import short_conv_bwd

        u, state, w = ctx.saved_tensors
        d_c = torch.zeros_like(u) if d_c is None else d_c
        d_new = torch.zeros_like(state) if d_new is None else d_new
        return short_conv_bwd(u, state, w, d_c, d_new)


def is_conv_kernel(parameter_name: str) -> bool:
    """Whether a parameter is a short convolution's kernel. Optimisers leave it out of weight decay:
    it starts at the identity and, like a norm's weight, is a per-channel scale that decay would
    pull off it."""
    return parameter_name.endswith("short_conv.weight")


def identity_kernel(channels: int, kernel_size: int) -> Tensor:
    """[C, K]: ones in column 0, zeros elsewhere (c_t = u_t)."""
    weight = torch.zeros(channels, kernel_size)
    weight[:, 0] = 1.0
    return weight


def _compaction(layout: TokenLayout, K: int) -> dict:
    """The gather indices and masks of the general path, shared by every layer (memoised on the
    layout). All [B, T] unless said:
      order: the token index of each compacted slot (real tokens first, in order, then padding);
      rank: each token's slot (the real rank; a padding token reads its previous real token's);
      keep [K, B, T, 1]: slot r's entry j (E[r + K-1 - j]) lies in r's document;
      tail [B, K-1], tail_keep [B, K-1, 1]: E's entries of the new state, and which of them
      lie in the row's last document."""
    key = ("short_conv", K)
    if key in layout.memo:
        return layout.memo[key]
    real, reset = layout.real, layout.reset
    B, T = real.shape
    slots = torch.arange(T, device=real.device)
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
    rank = (real.long().cumsum(1) - 1).clamp(min=0)
    # the slot of the current document's first token; -(K-1): the document began before this call
    start = torch.where(reset.gather(1, order), slots, -(K - 1)).cummax(1).values
    shifts = torch.arange(K, device=real.device)[:, None, None]
    keep = (slots - shifts >= start).to(torch.float32)[..., None]
    count = real.sum(1, keepdim=True)
    tail = count + torch.arange(K - 1, device=real.device)  # E-index of the last K - 1 real u's
    tail_keep = (tail - (K - 1) >= start[:, -1:]).to(torch.float32)[..., None]
    layout.memo[key] = index = {"order": order, "rank": rank, "keep": keep, "tail": tail, "tail_keep": tail_keep}
    return index
