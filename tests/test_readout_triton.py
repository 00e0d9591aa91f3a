"""mm_rec/readout_triton.py: the gated readout's kernels, (GroupRMSNorm(h) * w + m) * silu(og), forward and backward
against the definition (float64), and in bfloat16 against the PyTorch path of the block; og read as a slice of a wider
tensor (the fused projection's row stride), rows not a multiple of the kernel's tile, heads of a width that is no power
of two. The whole model's Triton and PyTorch backends are compared in test_modeling_mmrec.py."""

import pytest
import torch
import torch.nn.functional as F

from mm_rec.norms import GroupRMSNorm
from mm_rec.readout_triton import BLOCK_T, gated_readout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels: interpreted on CPU (conftest)


def definition(h, w, m, og, heads, eps):
    grouped = h.unflatten(-1, (heads, -1))
    normed = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return (normed.flatten(-2) * w + m) * F.silu(og)


def inputs(seed, dtype, B=2, T=BLOCK_T + 5, d=24, wide=40):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, d, generator=g) * 3.0
    w = 1.0 + 0.5 * torch.randn(d, generator=g)
    m = torch.randn(B, T, d, generator=g).to(dtype)
    projection = torch.randn(B, T, wide, generator=g).to(dtype)  # og: channels 8 .. 8 + d of a wider row
    return h, w, m, projection


@pytest.mark.parametrize("heads", [2, 4])  # heads of 12 and 6 channels
def test_forward_and_gradients_equal_the_definition_in_float32(heads):
    h, w, m, projection = inputs(0, torch.float32)
    d, eps = h.shape[-1], 1e-6
    results = []
    for run in ("kernel", "definition"):
        device = DEVICE if run == "kernel" else "cpu"
        dtype = torch.float32 if run == "kernel" else torch.float64
        leaves = [t.detach().to(device, dtype).clone().requires_grad_() for t in (h, w, m, projection)]
        hh, ww, mm, pp = leaves
        og = pp[..., 8:8 + d]
        if run == "kernel":
            out = gated_readout(hh, ww, mm, og, heads, eps)
        else:
            out = definition(hh, ww, mm, og, heads, eps)
        upstream = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=device).view_as(out)
        (out * upstream).sum().backward()
        results.append([t.detach().cpu().double() for t in (out, *(x.grad for x in leaves))])
    for got, want, name in zip(*results, ("r", "dh", "dw", "dm", "dprojection")):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
    assert results[0][4][..., :8].abs().max() == 0  # the projection's other channels get no gradient


def test_bfloat16_equals_the_blocks_pytorch_path():
    """Under bf16 the kernel rounds where PyTorch does: output and gradients within a bf16 unit or two."""
    h, w, m, projection = inputs(1, torch.bfloat16)
    d, heads = h.shape[-1], 2
    norm = GroupRMSNorm(d, heads, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(w)
    results = []
    for run in ("kernel", "pytorch"):
        norm.weight.grad = None
        hh, mm, pp = (t.clone().to(DEVICE).requires_grad_() for t in (h, m, projection))
        module = norm.to(DEVICE)
        og = pp[..., 8:8 + d]
        if run == "kernel":
            out = gated_readout(hh, module.weight, mm, og, heads, module.eps)
        else:
            out = (module(hh, torch.bfloat16) + mm) * F.silu(og)
        assert out.dtype == torch.bfloat16
        upstream = torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out).to(torch.bfloat16)
        (out.float() * upstream.float()).sum().backward()
        results.append([t.detach().cpu().float() for t in (out, hh.grad, module.weight.grad, mm.grad, pp.grad)])
    for got, want, name in zip(*results, ("r", "dh", "dw", "dm", "dprojection")):
        scale = want.abs().max()
        assert (got - want).abs().max() <= 2e-2 * scale, name


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_readout_equals_eager(backend):
    """Traced, the kernels are two opaque library ops: the compiled function's output and gradients are the eager
    call's, and a graph break would fail fullgraph=True."""
    h, w, m, projection = inputs(2, torch.float32)
    d, heads = h.shape[-1], 2
    compiled = torch.compile(gated_readout, backend=backend, fullgraph=True)
    results = []
    for fn in (gated_readout, compiled):
        leaves = [t.detach().to(DEVICE).clone().requires_grad_() for t in (h, w, m, projection)]
        out = fn(leaves[0], leaves[1], leaves[2], leaves[3][..., 8:8 + d], heads, 1e-6)
        upstream = torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)
        (out * upstream).sum().backward()
        results.append([t.detach().cpu() for t in (out, *(x.grad for x in leaves))])
    for got, want, name in zip(*results, ("r", "dh", "dw", "dm", "dprojection")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
