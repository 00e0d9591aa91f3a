"""Triton kernels behind scan.py's backend="triton" (docs/ARCHITECTURE.md section 4).

Importing this module never fails: without Triton, AVAILABLE is False and scan.py
chooses the PyTorch reference.

Algorithm: one pass over the data, chunks chained through a carry buffer.
T is cut into chunks of BT steps; a program owns one tile (batch b, chunk c, BD channels).
It loads its tile once, scans it in registers from a zero state
(``tl.associative_scan`` of the pairs (gamma_t, x_t), linear space; the decay across a
whole chunk is exp of the sum of its log gammas), waits for the state
at the end of chunk c-1 that the program of chunk c-1 publishes, publishes its own end
state, then adds the carried state to its tile and writes h. So x and log_gamma are read
once and h written once; only the [B, D] carries cross programs, one chunk after another.

Chaining programs is safe only if a tile's predecessor is running or done: tiles are not
taken by program id but from a global counter (``atomic_add``), in chunk order, so every
tile a program waits on has already been claimed by a program that is resident.
A carry is published by storing it, a CTA barrier, then raising its flag with release
semantics; the consumer spins on the flag with acquire semantics (one scalar atomic, whose
result every thread shares) before it loads the carry.

The backward is the same chain run from the last chunk to the first: the gradient g that
reaches h_t obeys g_t = grad_h_t + gamma_{t+1} g_{t+1}, a reverse scan whose decays are
log_gamma shifted by one step.

The channel count D is a compile-time constant (one compile per model width): row offsets
become immediates instead of 64-bit addresses held in registers, which frees registers for
larger tiles.

Resets (log_gamma = -inf) need nothing special: gamma = exp(-inf) = 0 zeroes every product
that crosses them, and a chunk's sum of logs is -inf, which cuts the carried state too. All
arithmetic is float32.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # CPU-only machines load the model without Triton
    AVAILABLE = False


def _block_sizes(device: torch.device, backward: bool = False) -> Tuple[int, int, int]:
    """(BT steps, BD channels, num_warps) of one tile, for the forward and for the backward: the
    winners of research/bench_kernels.py's sweep of tile shapes (docs/ARCHITECTURE.md section 4
    says where it ran). The interpreter runs associative_scan's combine once per element in Python, so tiles
    stay small there."""
    if device.type != "cuda":
        return 16, 16, 1
    return (32, 32, 1) if backward else (64, 32, 1)


if AVAILABLE:

    @triton.jit
    def _linear_combine(a_prev, h_prev, a_next, h_next):
        """Compose two steps of h -> a * h + x: apply (a_prev, h_prev), then (a_next, h_next)."""
        return a_prev * a_next, h_next + a_next * h_prev

    @triton.jit
    def _claim_tile(flags, T, B, D, NT, BT: tl.constexpr, BD: tl.constexpr, REVERSE: tl.constexpr):
        """The next tile in chain order (flags[0] counts the tiles handed out) and where it
        lies: (chunk i_c, batch i_b, channel block i_d, rows [BT], steps t [BT], channels
        o_d [BD], mask_d [BD], mask [BT, BD], offsets [BT, BD] into a [B, T, D] tensor)."""
        n_d = tl.cdiv(D, BD)
        tile = tl.atomic_add(flags, 1)
        i_c = tile // (B * n_d)
        if REVERSE:
            i_c = NT - 1 - i_c
        i_b, i_d = (tile // n_d) % B, tile % n_d
        rows = tl.arange(0, BT)
        t = i_c * BT + rows
        o_d = i_d * BD + tl.arange(0, BD)
        mask_d = o_d < D
        mask = (t < T)[:, None] & mask_d[None, :]
        offs = (i_b.to(tl.int64) * T + t[:, None]) * D + o_d[None, :]
        return i_c, i_b, i_d, rows, t, o_d, mask_d, mask, offs

    @triton.jit
    def _wait_for_carry(carries, flags, slot, B, D, i_b, i_d, o_d, mask_d, BD: tl.constexpr):
        """Spin until the carry of chunk `slot` is published, and return it [BD] fp32.
        One flag per tile, not a sentinel per element: a [BD] vector can be replicated
        across threads, and a reduction over it checks only one copy of each element."""
        tile = (slot * B + i_b) * tl.cdiv(D, BD) + i_d
        while tl.atomic_add(flags + 1 + tile, 0, sem="acquire") == 0:
            pass
        return tl.load(carries + (slot * B + i_b).to(tl.int64) * D + o_d, mask=mask_d, other=0.0, volatile=True)

    @triton.jit
    def _publish_carry(carries, flags, slot, B, D, i_b, i_d, o_d, mask_d, carry, BD: tl.constexpr):
        tl.store(carries + (slot * B + i_b).to(tl.int64) * D + o_d, carry, mask=mask_d)
        tl.debug_barrier()  # every thread's part of the carry is stored before the flag is raised
        tile = (slot * B + i_b) * tl.cdiv(D, BD) + i_d
        tl.atomic_xchg(flags + 1 + tile, 1, sem="release")

    @triton.jit
    def _row(tile, rows, r):
        """Row r of a [BT, BD] tile, as [BD]."""
        return tl.sum(tl.where(rows[:, None] == r, tile, 0.0), axis=0)

    @triton.heuristics({
        "HAS_X": lambda args: args["x"] is not None,
        "USE_INITIAL_STATE": lambda args: args["h0"] is not None,
        "STORE_FINAL_STATE": lambda args: args["h_T"] is not None,
    })
    @triton.jit
    def _scan_fwd_kernel(
        x, log_gamma, h0, h, h_T, carries, flags,
        T, B, NT, D: tl.constexpr,
        BT: tl.constexpr, BD: tl.constexpr,
        HAS_X: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    ):
        """h_t = x_t + exp(log_gamma_t) h_{t-1} for one [BT, BD] tile (x = 0 if absent)."""
        i_c, i_b, i_d, rows, t, o_d, mask_d, mask, offs = _claim_tile(flags, T, B, D, NT, BT, BD, False)

        # rows past T get gamma = 1, x = 0: the tile's last row is then the chunk's end state
        log_g = tl.load(log_gamma + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_X:
            u = tl.load(x + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            u = tl.zeros([BT, BD], dtype=tl.float32)
        decay, h_local = tl.associative_scan((tl.exp(log_g), u), axis=0, combine_fn=_linear_combine)
        # the decay carried to the next chunk from the sum of logs: a gamma near 1 rounded to fp32
        # is off by up to half an ulp of 1, the same way at every step, and a product over the
        # whole sequence would sum that bias (T / 2 ulps); a sum of logs rounds once per chunk
        decay_end = tl.exp(tl.sum(log_g, axis=0))
        h_local_end = _row(h_local, rows, BT - 1)

        if i_c > 0:
            carry = _wait_for_carry(carries, flags, i_c - 1, B, D, i_b, i_d, o_d, mask_d, BD)
        elif USE_INITIAL_STATE:
            carry = tl.load(h0 + i_b * D + o_d, mask=mask_d, other=0.0).to(tl.float32)
        else:
            carry = tl.zeros([BD], dtype=tl.float32)
        carry_end = h_local_end + decay_end * carry
        _publish_carry(carries, flags, i_c, B, D, i_b, i_d, o_d, mask_d, carry_end, BD)
        if STORE_FINAL_STATE:
            if i_c == NT - 1:
                tl.store(h_T + i_b * D + o_d, carry_end, mask=mask_d)

        h_tile = h_local + decay * carry[None, :]
        tl.store(h + offs, h_tile.to(h.dtype.element_ty), mask=mask)

    @triton.heuristics({
        "USE_INITIAL_STATE": lambda args: args["h0"] is not None,
        "USE_FINAL_STATE_GRADIENT": lambda args: args["grad_h_T"] is not None,
    })
    @triton.jit
    def _scan_bwd_kernel(
        grad_h, grad_h_T, h, log_gamma, h0, d_x, d_log_gamma, d_h0, carries, flags,
        T, B, NT, D: tl.constexpr,
        BT: tl.constexpr, BD: tl.constexpr,
        USE_INITIAL_STATE: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr,
    ):
        """g_t = grad_h_t + gamma_{t+1} g_{t+1} for one tile, then d_x = g and
        d_log_gamma_t = g_t gamma_t h_{t-1}; chunks chain from the last to the first."""
        i_c, i_b, i_d, rows, t, o_d, mask_d, mask, offs = _claim_tile(flags, T, B, D, NT, BT, BD, True)

        # the decay of step t of the reverse scan is gamma_{t+1}; 1 past the end, where
        # grad_h_T enters as the carry
        mask_next = (t + 1 < T)[:, None] & mask_d[None, :]
        log_g_next = tl.load(log_gamma + offs + D, mask=mask_next, other=0.0).to(tl.float32)
        dh = tl.load(grad_h + offs, mask=mask, other=0.0).to(tl.float32)
        decay, g_local = tl.associative_scan((tl.exp(log_g_next), dh), axis=0, combine_fn=_linear_combine,
                                             reverse=True)
        decay_start = tl.exp(tl.sum(log_g_next, axis=0))  # as decay_end in the forward
        g_local_start = _row(g_local, rows, 0)

        if i_c < NT - 1:
            carry = _wait_for_carry(carries, flags, i_c + 1, B, D, i_b, i_d, o_d, mask_d, BD)
        elif USE_FINAL_STATE_GRADIENT:
            carry = tl.load(grad_h_T + i_b * D + o_d, mask=mask_d, other=0.0).to(tl.float32)
        else:
            carry = tl.zeros([BD], dtype=tl.float32)
        _publish_carry(carries, flags, i_c, B, D, i_b, i_d, o_d, mask_d, g_local_start + decay_start * carry, BD)

        g = g_local + decay * carry[None, :]
        tl.store(d_x + offs, g.to(d_x.dtype.element_ty), mask=mask)

        gamma = tl.exp(tl.load(log_gamma + offs, mask=mask, other=0.0).to(tl.float32))
        mask_prev = (t >= 1)[:, None] & mask
        h_prev = tl.load(h + offs - D, mask=mask_prev, other=0.0).to(tl.float32)
        if USE_INITIAL_STATE:
            h_start = tl.load(h0 + i_b * D + o_d, mask=mask_d, other=0.0).to(tl.float32)
            h_prev = tl.where((t == 0)[:, None], h_start[None, :], h_prev)
        # at a reset gamma = 0, so d_log_gamma is 0 there (h_prev is finite)
        g_gamma = g * gamma
        tl.store(d_log_gamma + offs, (g_gamma * h_prev).to(d_log_gamma.dtype.element_ty), mask=mask)
        if USE_INITIAL_STATE:
            if i_c == 0:
                tl.store(d_h0 + i_b * D + o_d, _row(g_gamma, rows, 0).to(d_h0.dtype.element_ty), mask=mask_d)


def _check(name: str, t: Tensor, shape: Tuple[int, ...]) -> None:
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name} must be float32, bfloat16 or float16 for the Triton scan, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _chain_buffers(n_chunks: int, B: int, D: int, BD: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    """The carries [n_chunks, B, D] fp32 and their flags: the tile counter, then one
    ready flag per (chunk, b, channel block)."""
    carries = torch.empty(n_chunks, B, D, dtype=torch.float32, device=device)
    flags = torch.zeros(1 + n_chunks * B * triton.cdiv(D, BD), dtype=torch.int32, device=device)
    return carries, flags


def _launch_fwd(x: Optional[Tensor], log_gamma: Tensor, h0: Optional[Tensor], h: Tensor, h_T: Optional[Tensor]) -> None:
    B, T, D = log_gamma.shape
    BT, BD, num_warps = _block_sizes(log_gamma.device)
    n_chunks = triton.cdiv(T, BT)
    carries, flags = _chain_buffers(n_chunks, B, D, BD, log_gamma.device)
    grid = (n_chunks * B * triton.cdiv(D, BD),)
    _scan_fwd_kernel[grid](
        x, log_gamma, h0, h, h_T, carries, flags, T, B, n_chunks, D=D, BT=BT, BD=BD, num_warps=num_warps
    )


def scan_fwd(x: Tensor, log_gamma: Tensor, h0: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """h_t = x_t + exp(log_gamma_t) * h_{t-1}, h_{-1} = h0 (zeros if None).

    x, log_gamma: [B, T, D] contiguous fp32/bf16/fp16 (dtypes may differ); h0: [B, D] fp32.
    Returns h [B, T, D] in x.dtype and h_T [B, D] fp32.
    """
    B, T, D = x.shape
    _check("x", x, (B, T, D))
    _check("log_gamma", log_gamma, (B, T, D))
    if h0 is not None:
        _check("h0", h0, (B, D))
    h = torch.empty_like(x)
    h_T = torch.empty(B, D, dtype=torch.float32, device=x.device)
    _launch_fwd(x, log_gamma, h0, h, h_T)
    return h, h_T


def scan_bwd(
    grad_h: Tensor, grad_h_T: Optional[Tensor], h: Tensor, log_gamma: Tensor, h0: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Gradients of scan_fwd. grad_h, h, log_gamma: [B, T, D]; grad_h_T, h0: [B, D] or None.

    Returns (d_x in grad_h.dtype, d_log_gamma in log_gamma.dtype, d_h0 in h0.dtype or None).
    """
    B, T, D = grad_h.shape
    for name, t in (("grad_h", grad_h), ("h", h), ("log_gamma", log_gamma)):
        _check(name, t, (B, T, D))
    for name, t in (("grad_h_T", grad_h_T), ("h0", h0)):
        if t is not None:
            _check(name, t, (B, D))
    d_x = torch.empty_like(grad_h)
    d_log_gamma = torch.empty_like(log_gamma)
    d_h0 = None if h0 is None else torch.empty_like(h0)
    BT, BD, num_warps = _block_sizes(grad_h.device, backward=True)
    n_chunks = triton.cdiv(T, BT)
    carries, flags = _chain_buffers(n_chunks, B, D, BD, grad_h.device)
    grid = (n_chunks * B * triton.cdiv(D, BD),)
    _scan_bwd_kernel[grid](
        grad_h, grad_h_T, h, log_gamma, h0, d_x, d_log_gamma, d_h0, carries, flags,
        T, B, n_chunks, D=D, BT=BT, BD=BD, num_warps=num_warps,
    )
    return d_x, d_log_gamma, d_h0


def cumprod_exp(gamma: Tensor) -> Tensor:
    """out_t = prod_{r<=t} gamma_r over dim 1, in log space: the scan with x = 0, h0 = 1
    and decays log(gamma). gamma: [B, T, D] in [0, 1]; returns fp32."""
    B, T, D = gamma.shape
    _check("gamma", gamma, (B, T, D))
    log_gamma = torch.log(gamma.float())
    out = torch.empty(B, T, D, dtype=torch.float32, device=gamma.device)
    ones = torch.ones(B, D, dtype=torch.float32, device=gamma.device)
    _launch_fwd(None, log_gamma, ones, out, None)
    return out
