"""Triton kernels behind scan.py's backend="triton" (ARCHITECTURE.md section 4).

Importing this module never fails: without Triton, AVAILABLE is False and scan.py
chooses the PyTorch reference.

Algorithm: one pass over the data, super-chunks chained through a carry buffer.
T is cut into chunks of BT steps, and K consecutive chunks form a super-chunk. A program
owns one super-chunk of one batch row and BD channels, and works in three phases:

1. For each of its chunks it loads the [BT, BD] tile, scans it in registers from a zero
   state (``tl.associative_scan`` of the pairs (gamma_t, x_t), linear space), and folds
   the chunk's end row (total decay, end state) into the super-chunk's own transition.
2. It waits for the state at the end of super-chunk s-1, which that super-chunk's program
   publishes, and publishes its own end state (one multiply-add away).
3. It walks its chunks again with the carried state: reloads each tile (it is still in
   L2; the last chunk's scan is still in registers), adds the carry and writes h.

So x and log_gamma are read from memory once and h written once, and only the [B, D]
carries cross programs. The hand-off between programs is the serial part of the kernel
(a few L2 round trips per super-chunk), so K chunks per program make that chain K times
shorter than one chunk per program would, while a tile of BT rows keeps registers small.

Chaining programs is safe only if a super-chunk's predecessor is running or done: tiles
are not taken by program id but from a global counter (``atomic_add``), in super-chunk
order, so every tile a program waits on has already been claimed by a resident program.
A carry is published by storing it, a CTA barrier, then raising its flag with release
semantics; the consumer spins on the flag with acquire semantics (one scalar atomic, whose
result every thread shares) before it loads the carry.

The backward is the same chain run from the last super-chunk to the first (chunks in
reverse order too): the gradient g that reaches h_t obeys g_t = grad_h_t + gamma_{t+1}
g_{t+1}, a reverse scan whose decays are log_gamma shifted by one step.

Resets (log_gamma = -inf) need nothing special: gamma = exp(-inf) = 0 zeroes every product
that crosses them, the carried state included. All arithmetic is float32.
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


def _block_sizes(device: torch.device, backward: bool) -> Tuple[int, int, int, int]:
    """(BT steps, BD channels, K chunks per program, num_warps) of the forward or backward.
    On an H100 (B=8, T=4096, D=2048, bf16) small one-warp tiles, several per program, ran
    fastest of the configurations swept. The interpreter runs associative_scan's combine
    once per element in Python, so tiles stay small there too (and K = 2 keeps the
    tests on the multi-chunk path)."""
    if device.type != "cuda":
        return 16, 16, 2, 1
    return (32, 32, 4, 1) if backward else (32, 32, 4, 1)


if AVAILABLE:

    @triton.jit
    def _linear_combine(a_prev, h_prev, a_next, h_next):
        """Compose two steps of h -> a * h + x: apply (a_prev, h_prev), then (a_next, h_next)."""
        return a_prev * a_next, h_next + a_next * h_prev

    @triton.jit
    def _claim_tile(flags, B, D, NS, BD: tl.constexpr, REVERSE: tl.constexpr):
        """The next tile in chain order: (super-chunk, batch, channel block). flags[0]
        counts the tiles handed out."""
        n_d = tl.cdiv(D, BD)
        tile = tl.atomic_add(flags, 1)
        i_s = tile // (B * n_d)
        if REVERSE:
            i_s = NS - 1 - i_s
        return i_s, (tile // n_d) % B, tile % n_d

    @triton.jit
    def _wait_for_carry(carries, flags, slot, B, D, i_b, i_d, o_d, mask_d, BD: tl.constexpr):
        """Spin until the carry of super-chunk `slot` is published, and return it [BD] fp32.
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

    @triton.jit
    def _tile(i_b, t0, T, D, o_d, mask_d, BT: tl.constexpr):
        """Rows t0 .. t0+BT-1 of batch i_b: (steps [BT], offsets [BT, BD], mask [BT, BD])."""
        t = t0 + tl.arange(0, BT)
        mask = (t < T)[:, None] & mask_d[None, :]
        return t, (i_b.to(tl.int64) * T + t[:, None]) * D + o_d[None, :], mask

    @triton.jit
    def _fwd_chunk(x, log_gamma, i_b, t0, T, D, o_d, mask_d, BT: tl.constexpr, BD: tl.constexpr, HAS_X: tl.constexpr):
        """Scan of the chunk starting at t0 from a zero state: (offsets, mask, decay,
        h_local), where h_t = h_local_t + decay_t * (state before the chunk)."""
        _, offs, mask = _tile(i_b, t0, T, D, o_d, mask_d, BT)
        # rows past T get gamma = 1, x = 0: the tile's last row is then the chunk's end state
        gamma = tl.exp(tl.load(log_gamma + offs, mask=mask, other=0.0).to(tl.float32))
        if HAS_X:
            u = tl.load(x + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            u = tl.zeros([BT, BD], dtype=tl.float32)
        decay, h_local = tl.associative_scan((gamma, u), axis=0, combine_fn=_linear_combine)
        return offs, mask, decay, h_local

    @triton.heuristics({
        "HAS_X": lambda args: args["x"] is not None,
        "USE_INITIAL_STATE": lambda args: args["h0"] is not None,
        "STORE_FINAL_STATE": lambda args: args["h_T"] is not None,
    })
    @triton.jit
    def _scan_fwd_kernel(
        x, log_gamma, h0, h, h_T, carries, flags,
        T, B, D, NS,
        BT: tl.constexpr, BD: tl.constexpr, K: tl.constexpr,
        HAS_X: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    ):
        """h_t = x_t + exp(log_gamma_t) h_{t-1} for one super-chunk of K [BT, BD] tiles
        (x = 0 if absent)."""
        i_s, i_b, i_d = _claim_tile(flags, B, D, NS, BD, False)
        rows = tl.arange(0, BT)
        o_d = i_d * BD + tl.arange(0, BD)
        mask_d = o_d < D
        t0 = i_s * (K * BT)

        # phase 1: the super-chunk's transition h -> total_decay * h + h_end
        total_decay = tl.full([BD], 1.0, dtype=tl.float32)
        h_end = tl.zeros([BD], dtype=tl.float32)
        for k in tl.static_range(K):
            offs, mask, decay, h_local = _fwd_chunk(x, log_gamma, i_b, t0 + k * BT, T, D, o_d, mask_d, BT, BD, HAS_X)
            decay_end = _row(decay, rows, BT - 1)
            h_end = _row(h_local, rows, BT - 1) + decay_end * h_end
            total_decay *= decay_end

        # phase 2: the chain
        if i_s > 0:
            carry = _wait_for_carry(carries, flags, i_s - 1, B, D, i_b, i_d, o_d, mask_d, BD)
        elif USE_INITIAL_STATE:
            carry = tl.load(h0 + i_b * D + o_d, mask=mask_d, other=0.0).to(tl.float32)
        else:
            carry = tl.zeros([BD], dtype=tl.float32)
        carry_end = h_end + total_decay * carry
        _publish_carry(carries, flags, i_s, B, D, i_b, i_d, o_d, mask_d, carry_end, BD)
        if STORE_FINAL_STATE:
            if i_s == NS - 1:
                tl.store(h_T + i_b * D + o_d, carry_end, mask=mask_d)

        # phase 3: h, chunk by chunk; the last chunk's scan is still in registers
        for k in tl.static_range(K - 1):
            offs_k, mask_k, decay_k, h_local_k = _fwd_chunk(
                x, log_gamma, i_b, t0 + k * BT, T, D, o_d, mask_d, BT, BD, HAS_X
            )
            h_tile = h_local_k + decay_k * carry[None, :]
            tl.store(h + offs_k, h_tile.to(h.dtype.element_ty), mask=mask_k)
            carry = _row(h_tile, rows, BT - 1)
        h_tile = h_local + decay * carry[None, :]
        tl.store(h + offs, h_tile.to(h.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_chunk(grad_h, log_gamma, i_b, t0, T, D, o_d, mask_d, BT: tl.constexpr):
        """Reverse scan of the chunk starting at t0 from a zero gradient: (steps, offsets,
        mask, decay, g_local), where g_t = g_local_t + decay_t * (gradient after the chunk)."""
        t, offs, mask = _tile(i_b, t0, T, D, o_d, mask_d, BT)
        # the decay of step t of the reverse scan is gamma_{t+1}; 1 past the end, where
        # grad_h_T enters as the carry
        mask_next = (t + 1 < T)[:, None] & mask_d[None, :]
        gamma_next = tl.exp(tl.load(log_gamma + offs + D, mask=mask_next, other=0.0).to(tl.float32))
        dh = tl.load(grad_h + offs, mask=mask, other=0.0).to(tl.float32)
        decay, g_local = tl.associative_scan((gamma_next, dh), axis=0, combine_fn=_linear_combine, reverse=True)
        return t, offs, mask, decay, g_local

    @triton.jit
    def _bwd_store(g, t, offs, mask, h, log_gamma, h0, d_x, d_log_gamma, d_h0, i_b, D, o_d, mask_d, rows,
                   USE_INITIAL_STATE: tl.constexpr):
        """Write one chunk's d_x = g and d_log_gamma_t = g_t gamma_t h_{t-1} (and d_h0 for
        the chunk at t = 0); return g at the chunk's first step, the carry of the chunk before."""
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
            if tl.min(t, axis=0) == 0:
                tl.store(d_h0 + i_b * D + o_d, _row(g_gamma, rows, 0).to(d_h0.dtype.element_ty), mask=mask_d)
        return _row(g, rows, 0)

    @triton.heuristics({
        "USE_INITIAL_STATE": lambda args: args["h0"] is not None,
        "USE_FINAL_STATE_GRADIENT": lambda args: args["grad_h_T"] is not None,
    })
    @triton.jit
    def _scan_bwd_kernel(
        grad_h, grad_h_T, h, log_gamma, h0, d_x, d_log_gamma, d_h0, carries, flags,
        T, B, D, NS,
        BT: tl.constexpr, BD: tl.constexpr, K: tl.constexpr,
        USE_INITIAL_STATE: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr,
    ):
        """g_t = grad_h_t + gamma_{t+1} g_{t+1} for one super-chunk, then d_x = g and
        d_log_gamma_t = g_t gamma_t h_{t-1}; super-chunks and their chunks run from the
        last to the first."""
        i_s, i_b, i_d = _claim_tile(flags, B, D, NS, BD, True)
        rows = tl.arange(0, BT)
        o_d = i_d * BD + tl.arange(0, BD)
        mask_d = o_d < D
        t0 = i_s * (K * BT)

        # phase 1: the super-chunk's transition g -> total_decay * g + g_start
        total_decay = tl.full([BD], 1.0, dtype=tl.float32)
        g_start = tl.zeros([BD], dtype=tl.float32)
        for j in tl.static_range(K):
            t, offs, mask, decay, g_local = _bwd_chunk(grad_h, log_gamma, i_b, t0 + (K - 1 - j) * BT, T, D, o_d, mask_d, BT)
            decay_start = _row(decay, rows, 0)
            g_start = _row(g_local, rows, 0) + decay_start * g_start
            total_decay *= decay_start

        # phase 2: the chain
        if i_s < NS - 1:
            carry = _wait_for_carry(carries, flags, i_s + 1, B, D, i_b, i_d, o_d, mask_d, BD)
        elif USE_FINAL_STATE_GRADIENT:
            carry = tl.load(grad_h_T + i_b * D + o_d, mask=mask_d, other=0.0).to(tl.float32)
        else:
            carry = tl.zeros([BD], dtype=tl.float32)
        _publish_carry(carries, flags, i_s, B, D, i_b, i_d, o_d, mask_d, g_start + total_decay * carry, BD)

        # phase 3: the gradients, chunk by chunk; the first chunk's scan is still in registers
        for j in tl.static_range(K - 1):
            t_k, offs_k, mask_k, decay_k, g_local_k = _bwd_chunk(
                grad_h, log_gamma, i_b, t0 + (K - 1 - j) * BT, T, D, o_d, mask_d, BT
            )
            carry = _bwd_store(g_local_k + decay_k * carry[None, :], t_k, offs_k, mask_k, h, log_gamma, h0,
                               d_x, d_log_gamma, d_h0, i_b, D, o_d, mask_d, rows, USE_INITIAL_STATE)
        _bwd_store(g_local + decay * carry[None, :], t, offs, mask, h, log_gamma, h0,
                   d_x, d_log_gamma, d_h0, i_b, D, o_d, mask_d, rows, USE_INITIAL_STATE)


def _check(name: str, t: Tensor, shape: Tuple[int, ...]) -> None:
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name} must be float32, bfloat16 or float16 for the Triton scan, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _launch(kernel, *args, T: int, B: int, D: int, device: torch.device, backward: bool) -> None:
    """Run a chained kernel over super-chunks, with its carries [NS, B, D] fp32 and flags
    (the tile counter, then one ready flag per (super-chunk, b, channel block))."""
    BT, BD, K, num_warps = _block_sizes(device, backward)
    n_super = triton.cdiv(T, K * BT)
    n_tiles = n_super * B * triton.cdiv(D, BD)
    carries = torch.empty(n_super, B, D, dtype=torch.float32, device=device)
    flags = torch.zeros(1 + n_tiles, dtype=torch.int32, device=device)
    kernel[(n_tiles,)](*args, carries, flags, T, B, D, n_super, BT=BT, BD=BD, K=K, num_warps=num_warps)


def _launch_fwd(x: Optional[Tensor], log_gamma: Tensor, h0: Optional[Tensor], h: Tensor, h_T: Optional[Tensor]) -> None:
    B, T, D = log_gamma.shape
    _launch(_scan_fwd_kernel, x, log_gamma, h0, h, h_T, T=T, B=B, D=D, device=log_gamma.device, backward=False)


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
    _launch(
        _scan_bwd_kernel, grad_h, grad_h_T, h, log_gamma, h0, d_x, d_log_gamma, d_h0,
        T=T, B=B, D=D, device=grad_h.device, backward=True,
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
