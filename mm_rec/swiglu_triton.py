"""Triton kernels for the elementwise part of the FFN's SwiGLU on CUDA (block.py's ``_SwiGLUDown``, down(silu(a) * b)):

    p = silu(a) * b;   backward: da = silu_backward(dp * b, a),  db = dp * silu(a),  and p again

a, b: the gate's and the up projection's outputs [R, F] (F the intermediate size) in the compute dtype (bfloat16
under autocast, or float32), rows of any stride; dp: the product's gradient (the down projection's input gradient).
``_SwiGLUDown`` keeps a, b and the weight instead of silu(a) and p, so its backward recomputes them. In PyTorch that
is two elementwise kernels forward (silu, the product) and five backward (silu, the product for the weight's
gradient, dp * b, silu_backward, dp * silu(a)). Here it is one kernel each way: the forward reads a and b and writes
p; the backward reads dp, a and b once and writes da, db and p, so the backward is that kernel and the two GEMMs.

Every value is computed in float32 and rounded to the compute dtype where PyTorch's operations round it: silu(a)
before the product and before dp * silu(a), dp * b before silu_backward. silu is a / (1 + exp(-a)) and silu_backward
dy * s * (1 + a * (1 - s)) with s = 1 / (1 + exp(-a)), as PyTorch's CUDA kernels write them; compiled, exp is CUDA's
expf (libdevice, where tl.exp is an approximation) and the divisions round as IEEE's (Triton's ``/`` is an
approximate division on CUDA), so the kernels aim at PyTorch's bits on a GPU. Interpreted (TRITON_INTERPRET=1, the
CPU tests), exp is NumPy's, which can differ from PyTorch's CPU exp in the last float32 bit (a float32 result then
differs by an ulp or two, a bfloat16 or float16 one only where that bit decides the rounding), and since the
interpreter rounds float32 to bfloat16 toward zero, bfloat16 is rounded to nearest even on the bits there, as
PyTorch and CUDA round it (readout_triton.py and conv_triton.py leave the interpreter's truncation: their
interpreted bfloat16 results may differ by an ulp).

Importing this module never fails: without Triton, AVAILABLE is False and block.py takes the PyTorch path.
"""

from typing import Tuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    AVAILABLE = True
except ImportError:  # CPU-only machines load the model without Triton
    AVAILABLE = False

BLOCK_R = 16  # rows per program
BLOCK_F = 128  # channels per program (fewer for a narrower F: the next power of two)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)

if AVAILABLE:

    @triton.jit
    def _exp_neg(x, INTERPRETED: tl.constexpr):
        """exp(-x) in float32: CUDA's expf compiled (libdevice), tl.exp interpreted (the interpreter has no libdevice)."""
        if INTERPRETED:
            return tl.exp(-x)
        return libdevice.exp(-x)

    @triton.jit
    def _round(x, dt: tl.constexpr, INTERPRETED: tl.constexpr):
        """x (float32) rounded to dt to nearest even, as PyTorch rounds, and returned in float32. Compiled, the
        conversion does it; the interpreter truncates float32 to bfloat16, so there the rounding is done on the bits."""
        if INTERPRETED and dt == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)  # finite values (a NaN may come out as an infinity here)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        return x.to(dt).to(tl.float32)

    @triton.jit
    def _tile(R, F, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
        """This program's rows (int64: R * stride may pass 2^31) and channels, and the tile's in-bounds mask."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        return rows.to(tl.int64), cols, (rows < R)[:, None] & (cols < F)[None, :]

    @triton.jit
    def _load(t, rows, cols, stride, mask):
        """The tile of t [R, F] (row stride ``stride``, stride-1 channels) in float32."""
        return tl.load(t + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _swiglu_fwd_kernel(a, b, p, R, F, s_a, s_b, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
                           INTERPRETED: tl.constexpr):
        rows, cols, mask = _tile(R, F, BLOCK_R, BLOCK_F)
        dt = p.dtype.element_ty
        x, y = _load(a, rows, cols, s_a, mask), _load(b, rows, cols, s_b, mask)
        act = _round(tl.fdiv(x, 1.0 + _exp_neg(x, INTERPRETED), ieee_rounding=True), dt, INTERPRETED)  # F.silu(a)
        tl.store(p + rows[:, None] * F + cols[None, :], _round(act * y, dt, INTERPRETED).to(dt), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(dp, a, b, da, db, p, R, F, s_dp, s_a, s_b, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
                           INTERPRETED: tl.constexpr):
        rows, cols, mask = _tile(R, F, BLOCK_R, BLOCK_F)
        dt = p.dtype.element_ty
        g = _load(dp, rows, cols, s_dp, mask)
        x, y = _load(a, rows, cols, s_a, mask), _load(b, rows, cols, s_b, mask)
        denom = 1.0 + _exp_neg(x, INTERPRETED)
        act = _round(tl.fdiv(x, denom, ieee_rounding=True), dt, INTERPRETED)  # F.silu(a), as PyTorch keeps it
        sig = tl.fdiv(1.0, denom, ieee_rounding=True)
        d_act = _round(g * y, dt, INTERPRETED)  # dp * b, the input of silu_backward
        out = rows[:, None] * F + cols[None, :]
        tl.store(da + out, _round(d_act * sig * (1.0 + x * (1.0 - sig)), dt, INTERPRETED).to(dt), mask=mask)
        tl.store(db + out, _round(g * act, dt, INTERPRETED).to(dt), mask=mask)
        tl.store(p + out, _round(act * y, dt, INTERPRETED).to(dt), mask=mask)


def _rows(t: Tensor) -> Tensor:
    """t as [R, F] rows of stride-1 channels: a view where reshape gives one (a slice of a wider row keeps its row
    stride), else a copy (a tensor whose channels are strided, or whose leading dimensions do not merge)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch(R: int, F: int) -> Tuple[tuple, dict]:
    block_f = min(BLOCK_F, triton.next_power_of_2(F))
    # rows on the grid's first axis (2^31 - 1 programs; the second allows 65535)
    grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(F, block_f))
    return grid, dict(BLOCK_R=BLOCK_R, BLOCK_F=block_f, INTERPRETED=_INTERPRETED)


def _check(name: str, *tensors: Tensor) -> None:
    first = tensors[0]
    if any(t.shape != first.shape or t.dtype != first.dtype for t in tensors) or first.dtype not in DTYPES:
        raise ValueError(f"{name}: tensors of one shape and one dtype of {DTYPES} expected, got "
                         f"{[(tuple(t.shape), t.dtype) for t in tensors]}")


def swiglu_forward(a: Tensor, b: Tensor) -> Tensor:
    """F.silu(a) * b in one kernel, rounded as PyTorch's two operations round it. a, b: [..., F] of one shape and
    dtype (bfloat16, float16, float32); read in place where their rows are stride-1 channels (of any row stride: a
    slice of a wider row), else copied so. Returns a contiguous [..., F]."""
    _check("swiglu_forward", a, b)
    p = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    if p.numel():
        a2, b2 = _rows(a), _rows(b)
        R, F = a2.shape
        grid, constants = _launch(R, F)
        _swiglu_fwd_kernel[grid](a2, b2, p, R, F, a2.stride(0), b2.stride(0), **constants)
    return p


def swiglu_backward(dp: Tensor, a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The gradients of p = F.silu(a) * b given dp (p's gradient), and p recomputed, in one kernel:
    (silu_backward(dp * b, a), dp * F.silu(a), F.silu(a) * b), rounded as PyTorch's operations round them.
    dp, a, b: [..., F] of one shape and dtype, as ``swiglu_forward`` reads them. Returns three contiguous [..., F]."""
    _check("swiglu_backward", dp, a, b)
    da, db, p = (torch.empty(a.shape, dtype=a.dtype, device=a.device) for _ in range(3))
    if p.numel():
        dp2, a2, b2 = _rows(dp), _rows(a), _rows(b)
        R, F = a2.shape
        grid, constants = _launch(R, F)
        _swiglu_bwd_kernel[grid](dp2, a2, b2, da, db, p, R, F, dp2.stride(0), a2.stride(0), b2.stride(0), **constants)
    return da, db, p


# Under TRITON_INTERPRET=1 triton.jit returns an interpreted function: no libdevice, and bfloat16 rounded by hand.
_INTERPRETED = AVAILABLE and not isinstance(_swiglu_fwd_kernel, triton.runtime.JITFunction)
