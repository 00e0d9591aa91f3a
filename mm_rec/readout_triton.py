"""Triton kernels for the block's gated readout on CUDA (block.py, the default output_gate with gate_memory):

    r = (GroupRMSNorm_H(h) * w + m) * silu(og)

h: the recurrence's state [R, d] (float32); w: the norm's weight [d]; m: the memory's read and og: the output gate's
pre-activation, [R, d] in the compute dtype (bfloat16 under autocast), og a slice of the fused projection (any row
stride). In PyTorch this is seven elementwise kernels forward (a float32 copy and the norm, two casts, the scaling, the
sum, the silu, the product) and more backward. Here one program holds a tile of rows of one head's channels: the
forward reads h, m and og once and writes r; the backward recomputes the norm from h and writes the gradients of h,
m and og, and each program's partial sums of w's gradient (summed over programs by PyTorch: deterministic). Every
rounding of the PyTorch path to the compute dtype is made at the same place, so the two agree to the last bit
where the norm does (the interpreter rounds float32 to bfloat16 toward zero, CUDA and PyTorch to nearest: interpreted,
bfloat16 results may differ by one unit in the last place).

Importing this module never fails: without Triton, AVAILABLE is False and block.py takes the PyTorch path.
"""

from typing import Tuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # CPU-only machines load the model without Triton
    AVAILABLE = False

BLOCK_T = 32  # rows per program

if AVAILABLE:

    @triton.jit
    def _tile(h, w, m, og, rows, cols, in_row, in_group, D, G, s_m, s_og, eps, dt: tl.constexpr):
        """The forward's values on one tile, float32: (norm n, its rstd, rounded weight, a = n w, gate s, t = a + m)."""
        mask = in_row[:, None] & in_group[None, :]
        x = tl.load(h + rows[:, None] * D + cols[None, :], mask=mask, other=0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / G + eps)
        n = x * rstd[:, None]
        wv = tl.load(w + cols, mask=in_group, other=0.0).to(dt).to(tl.float32)
        a = (n.to(dt).to(tl.float32) * wv[None, :]).to(dt).to(tl.float32)
        g = tl.load(og + rows[:, None] * s_og + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = (g * tl.sigmoid(g)).to(dt).to(tl.float32)
        mv = tl.load(m + rows[:, None] * s_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        t = (a + mv).to(dt).to(tl.float32)
        return n, rstd, wv, g, s, t

    @triton.jit
    def _readout_fwd_kernel(h, w, m, og, r, R, D, G, s_m, s_og, eps, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        offsets = tl.arange(0, BLOCK_G)
        cols = tl.program_id(1) * G + offsets
        in_row, in_group = rows < R, offsets < G
        dt = r.dtype.element_ty
        _, _, _, _, s, t = _tile(h, w, m, og, rows, cols, in_row, in_group, D, G, s_m, s_og, eps, dt)
        tl.store(r + rows[:, None] * D + cols[None, :], (t * s).to(dt), mask=in_row[:, None] & in_group[None, :])

    @triton.jit
    def _readout_bwd_kernel(h, w, m, og, dr, dh, dm, dog, dw_part, R, D, G, s_m, s_og, eps, BLOCK_T: tl.constexpr,
                            BLOCK_G: tl.constexpr):
        block = tl.program_id(0)
        rows = (block * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        offsets = tl.arange(0, BLOCK_G)
        cols = tl.program_id(1) * G + offsets
        in_row, in_group = rows < R, offsets < G
        mask = in_row[:, None] & in_group[None, :]
        dt = dm.dtype.element_ty
        n, rstd, wv, g, s, t = _tile(h, w, m, og, rows, cols, in_row, in_group, D, G, s_m, s_og, eps, dt)
        grad = tl.load(dr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        d_t = (grad * s).to(dt).to(tl.float32)  # the gradient of t = a + m, so of a and of m
        d_s = (grad * t).to(dt).to(tl.float32)
        sig = tl.sigmoid(g)
        tl.store(dog + rows[:, None] * D + cols[None, :], (d_s * sig * (1.0 + g * (1.0 - sig))).to(dt), mask=mask)
        tl.store(dm + rows[:, None] * D + cols[None, :], d_t.to(dt), mask=mask)
        # a = round(n) * round(w): the weight's share, rounded per element as PyTorch's product is, summed in float32
        n_round = n.to(dt).to(tl.float32)
        d_w = tl.where(mask, (d_t * n_round).to(dt).to(tl.float32), 0.0)
        tl.store(dw_part + block * D + cols, tl.sum(d_w, 0), mask=in_group)
        d_n = (d_t * wv[None, :]).to(dt).to(tl.float32)
        d_n = tl.where(mask, d_n, 0.0)
        d_x = rstd[:, None] * (d_n - n * (tl.sum(d_n * n, 1) / G)[:, None])
        tl.store(dh + rows[:, None] * D + cols[None, :], d_x, mask=mask)


def _launch(h: Tensor, num_groups: int) -> Tuple[int, int, int, tuple]:
    R, D = h.shape
    G = D // num_groups
    return R, D, G, (triton.cdiv(R, BLOCK_T), num_groups)


def _readout_forward(h: Tensor, weight: Tensor, m: Tensor, og: Tensor, num_groups: int, eps: float) -> Tensor:
    R, D, G, grid = _launch(h, num_groups)
    r = torch.empty(R, D, dtype=m.dtype, device=h.device)
    _readout_fwd_kernel[grid](h, weight, m, og, r, R, D, G, m.stride(0), og.stride(0), eps, BLOCK_T=BLOCK_T,
                              BLOCK_G=triton.next_power_of_2(G))
    return r


def _readout_backward(h: Tensor, weight: Tensor, m: Tensor, og: Tensor, dr: Tensor, num_groups: int,
                      eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    R, D, G, grid = _launch(h, num_groups)
    dh = torch.empty_like(h)
    dm = torch.empty(R, D, dtype=m.dtype, device=h.device)
    dog = torch.empty(R, D, dtype=og.dtype, device=h.device)
    dw_part = torch.empty(grid[0], D, dtype=torch.float32, device=h.device)
    _readout_bwd_kernel[grid](h, weight, m, og, dr.contiguous(), dh, dm, dog, dw_part, R, D, G, m.stride(0),
                              og.stride(0), eps, BLOCK_T=BLOCK_T, BLOCK_G=triton.next_power_of_2(G))
    # PyTorch sums the weight's gradient in the compute dtype, then casts it to the parameter's
    return dh, dw_part.sum(0).to(m.dtype).to(weight.dtype), dm, dog


class _GatedReadout(torch.autograd.Function):
    """Eagerly: the kernels under a plain autograd.Function, without the library ops' dispatch on the host."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, m: Tensor, og: Tensor, num_groups: int, eps: float) -> Tensor:
        ctx.save_for_backward(h, weight, m, og)
        ctx.num_groups, ctx.eps = num_groups, eps
        return _readout_forward(h, weight, m, og, num_groups, eps)

    @staticmethod
    def backward(ctx, dr: Tensor):
        return *_readout_backward(*ctx.saved_tensors, dr, ctx.num_groups, ctx.eps), None, None


if AVAILABLE:
    # Traced (torch.compile, torch.export), both directions are torch.library ops: opaque calls with known output
    # shapes (the compiler neither traces the launches nor re-fuses them).
    _readout_op = torch.library.custom_op("mm_rec::gated_readout", mutates_args=())(_readout_forward)
    _readout_backward_op = torch.library.custom_op("mm_rec::gated_readout_backward", mutates_args=())(_readout_backward)

    @_readout_op.register_fake
    def _(h, weight, m, og, num_groups, eps):
        return m.new_empty(h.shape)

    @_readout_backward_op.register_fake
    def _(h, weight, m, og, dr, num_groups, eps):
        return torch.empty_like(h), torch.empty_like(weight), m.new_empty(h.shape), og.new_empty(h.shape)

    def _setup(ctx, inputs, output):
        h, weight, m, og, ctx.num_groups, ctx.eps = inputs
        ctx.save_for_backward(h, weight, m, og)

    def _backward(ctx, dr):
        return *_readout_backward_op(*ctx.saved_tensors, dr, ctx.num_groups, ctx.eps), None, None

    _readout_op.register_autograd(_backward, setup_context=_setup)


def gated_readout(h: Tensor, weight: Tensor, m: Tensor, og: Tensor, num_groups: int, eps: float) -> Tensor:
    """(GroupRMSNorm(h) * weight + m) * silu(og) as block.py computes it, in two kernels (forward, backward).
    h: [..., d] float32; weight: [d] float32; m, og: [..., d] in the compute dtype, rows of stride-1 channels.
    Returns [..., d] in m's dtype."""
    shape, d = m.shape, m.shape[-1]
    flat = [t.reshape(-1, d) for t in (h, m, og)]
    if any(t.stride(-1) != 1 for t in flat):
        raise ValueError("gated_readout: h, m and og need stride-1 channels")
    readout = _readout_op if torch.compiler.is_compiling() else _GatedReadout.apply
    return readout(flat[0].contiguous(), weight.contiguous(), flat[1], flat[2], num_groups, eps).view(shape)
