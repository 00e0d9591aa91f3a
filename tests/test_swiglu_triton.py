"""mm_rec/swiglu_triton.py: the SwiGLU's elementwise kernels, p = silu(a) * b forward and (da, db, p) backward, against
PyTorch's definition (F.silu(a) * b and its autograd gradients): float32 to a float32 rounding or two, bfloat16 and
float16 to one unit in the last place; a and b read as slices of a wider row (any row stride), rows not a multiple of
the kernels' tile, widths under and over one tile's channels. block._SwiGLUDown and FeedForward with the kernels
forced on (the dispatch needs CUDA) against the three PyTorch operations; the dispatch itself; the kernels compiled
for an H100 without one."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mm_rec import swiglu_triton
from mm_rec.block import FeedForward, MMRecBlock, _SwiGLUDown
from mm_rec.swiglu_triton import AVAILABLE, BLOCK_F, BLOCK_R, swiglu_backward, swiglu_forward

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels: interpreted on CPU (conftest)
ROWS = 2 * BLOCK_R + 5  # three row tiles, the last one partial


def slices(seed, dtype, rows=ROWS, width=40, scale=3.0):
    """a and b as the two halves of a wider row with a gap ([rows, 2 * width + 8], as a fused projection's slices are:
    a row stride that is not the width), and dp (the product's gradient) contiguous."""
    g = torch.Generator().manual_seed(seed)
    fused = (scale * torch.randn(rows, 2 * width + 8, generator=g)).to(DEVICE, dtype)
    dp = torch.randn(rows, width, generator=g).to(DEVICE, dtype)
    return fused[:, 3:3 + width], fused[:, width + 8:], dp


def definition(a, b, dp):
    """F.silu(a) * b and its gradients by autograd, in the inputs' dtype."""
    a, b = (t.detach().clone().requires_grad_() for t in (a, b))
    p = F.silu(a) * b
    da, db = torch.autograd.grad(p, (a, b), dp)
    return p.detach(), da, db


def ulps(got, want):
    """The largest distance in units in the last place between two 16-bit float tensors (their bits as ordered ints)."""
    def ordered(t):
        bits = t.contiguous().view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(got) - ordered(want)).abs().max().item()


@pytest.mark.parametrize("width", [40, BLOCK_F + 32])  # one tile's channels partly used; two tiles, the last partial
def test_kernels_equal_the_definition_in_float32(width):
    a, b, dp = slices(0, torch.float32, width=width)
    assert a.stride(0) == 2 * width + 8 and not a.is_contiguous()
    p_want, da_want, db_want = definition(a, b, dp)
    p = swiglu_forward(a, b)
    da, db, p_again = swiglu_backward(dp, a, b)
    for got, want, name in ((p, p_want, "p"), (p_again, p_want, "p (backward)"), (da, da_want, "da"),
                            (db, db_want, "db")):
        assert got.shape == want.shape and got.dtype == torch.float32, name
        # float32 throughout: only exp's last bit may differ (NumPy's or CUDA's against PyTorch's)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [40, BLOCK_F + 32])
def test_kernels_round_where_pytorch_rounds_in_half_precision(dtype, width):
    """Each result is rounded from float32 once, after the same roundings of silu(a) and dp * b that PyTorch makes: at
    most one unit in the last place anywhere (where float32 exp's last bit decides a rounding), and nearly all
    elements equal to the bit (a rounding left out or added would change many)."""
    a, b, dp = slices(1, dtype, width=width)
    p_want, da_want, db_want = definition(a, b, dp)
    p = swiglu_forward(a, b)
    da, db, p_again = swiglu_backward(dp, a, b)
    for got, want, name in ((p, p_want, "p"), (p_again, p_want, "p (backward)"), (da, da_want, "da"),
                            (db, db_want, "db")):
        assert got.dtype == dtype, name
        assert ulps(got.cpu(), want.cpu()) <= 1, name
        assert (got != want).float().mean().item() <= 0.01, name


def test_kernels_read_any_row_layout():
    """[B, T, F] slices of a wider last dimension (a, and the gradient dp), b with channels of stride 2 (copied) and
    one row: the results are those of the same values contiguous."""
    g = torch.Generator().manual_seed(2)
    wide = torch.randn(3, 7, 100, generator=g).to(DEVICE)
    a, dp = wide[..., :36], wide[..., 50:86]
    b = torch.randn(3, 7, 72, generator=g).to(DEVICE)[..., ::2]
    assert a.stride(1) == dp.stride(1) == 100 and b.stride(-1) == 2
    got = (swiglu_forward(a, b), *swiglu_backward(dp, a, b))
    want = (swiglu_forward(a.contiguous(), b.contiguous()),
            *swiglu_backward(dp.contiguous(), a.contiguous(), b.contiguous()))
    for x, y in zip(got, want):
        assert x.shape == (3, 7, 36) and torch.equal(x, y)
    p_want, da_want, db_want = definition(a, b, dp)
    for x, y in zip(got, (p_want, da_want, db_want)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    one = swiglu_backward(dp[:1, :1], a[:1, :1], b[:1, :1])
    assert all(torch.equal(x, y[:1, :1]) for x, y in zip(one, got[1:]))


def test_kernels_refuse_mismatched_inputs():
    a, b, _ = slices(3, torch.float32)
    with pytest.raises(ValueError):
        swiglu_forward(a, b.to(torch.bfloat16))
    with pytest.raises(ValueError):
        swiglu_forward(a.double(), b.double())


def _three_ops(a, b, weight):
    return F.linear(F.silu(a) * b, weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_node_with_the_kernels_equals_pytorchs_three_operations(dtype):
    """_SwiGLUDown with ``fused`` (what FeedForward passes on CUDA) gives the output and the gradients of a, b and the
    float32 weight of F.linear(F.silu(a) * b, weight) (the weight cast to a's dtype, as autocast casts it)."""
    a, b, _ = slices(4, dtype, rows=7 * 5, width=48)
    a, b = a.view(7, 5, 48), b.view(7, 5, 48)  # [B, T, F] slices: the node flattens the rows itself
    weight = torch.randn(24, 48).to(DEVICE)
    upstream = torch.linspace(-1, 1, 7 * 5 * 24, device=DEVICE).view(7, 5, 24)
    results = []
    for fn in (lambda x, y, w: _SwiGLUDown.apply(x, y, w, True), lambda x, y, w: _three_ops(x, y, w.to(dtype))):
        leaves = [t.detach().clone().requires_grad_() for t in (a, b, weight)]
        out = fn(*leaves)
        (out.float() * upstream).sum().backward()
        results.append([out.detach(), *(t.grad for t in leaves)])
    for got, want, name in zip(*results, ("out", "da", "db", "dweight")):
        assert got.dtype == want.dtype, name
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
        else:  # a product of one ulp off moves a sum by a bfloat16 rounding at most
            assert (got.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max(), name
    if dtype == torch.bfloat16:
        assert ulps(results[0][1].cpu(), results[1][1].cpu()) <= 1 and ulps(results[0][2].cpu(), results[1][2].cpu()) <= 1


@pytest.mark.parametrize("autocast", [False, True])
def test_feed_forward_through_the_kernels_equals_the_module_path(autocast, monkeypatch):
    """FeedForward with the kernels switched on (as on CUDA) runs them, forward and backward, and gives the output and
    the parameters' gradients of down(silu(gate x) * up x), float32 and under bf16 autocast."""
    ran = []
    for name in ("swiglu_forward", "swiglu_backward"):
        kernel = getattr(swiglu_triton, name)
        monkeypatch.setattr(swiglu_triton, name, lambda *args, _kernel=kernel, _name=name: ran.append(_name) or _kernel(*args))
    ffn = FeedForward(16, 40, "silu", gated=True).to(DEVICE)
    x = torch.randn(3, 13, 16, device=DEVICE)  # 39 rows
    results = []
    for kernels in (True, False):
        monkeypatch.setattr(FeedForward, "_swiglu_in_kernels", lambda self, a, b, _on=kernels: _on)
        ffn.zero_grad()
        leaf = x.clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            out = ffn(leaf) if kernels else ffn.down(F.silu(ffn.gate(leaf)) * ffn.up(leaf))
        (out.float() * torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)).sum().backward()
        results.append([out.detach().float(), leaf.grad, *(p.grad.clone() for p in ffn.parameters())])
        if kernels:
            assert ran == ["swiglu_forward", "swiglu_backward"]
    for got, want in zip(*results):
        if autocast:
            assert (got - want).abs().max() <= 2 ** -7 * want.abs().max()
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_block_hands_its_kernel_backend_to_the_feed_forward(tiny_config):
    for backend in ("torch", "auto"):
        assert MMRecBlock(tiny_config(kernel_backend=backend), 0).ffn.kernel_backend == backend
    # the kernels run where the backend resolves to Triton (CUDA, or interpreted here with "triton", as the model's
    # other kernels), never with "torch", and "auto" on a CPU takes PyTorch's operations
    a = torch.randn(4, 40, device=DEVICE)
    expected = {"torch": False, "auto": DEVICE == "cuda", "triton": True}
    for backend, runs in expected.items():
        assert FeedForward(16, 40, "silu", gated=True, kernel_backend=backend)._swiglu_in_kernels(a, a) == runs, backend


@pytest.mark.gpu
def test_the_kernels_run_on_cuda_where_the_backend_is_triton_and_not_when_traced(monkeypatch):
    ffn = FeedForward(16, 40, "silu", gated=True, kernel_backend="auto").cuda()
    a = torch.randn(4, 40, device="cuda")
    assert ffn._swiglu_in_kernels(a, a) and ffn._swiglu_in_kernels(a.bfloat16(), a.bfloat16())
    assert not ffn._swiglu_in_kernels(a.double(), a.double())
    ffn.kernel_backend = "torch"
    assert not ffn._swiglu_in_kernels(a, a)
    ffn.kernel_backend = "triton"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not ffn._swiglu_in_kernels(a, a)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_on_cuda_the_kernels_give_pytorchs_bits(dtype):
    """Compiled, exp is CUDA's expf and the divisions are IEEE's, as in PyTorch's CUDA kernels: the same bits."""
    a, b, dp = slices(5, dtype, rows=1000, width=300)
    p_want, da_want, db_want = definition(a, b, dp)
    da, db, p = swiglu_backward(dp, a, b)
    for got, want, name in ((swiglu_forward(a, b), p_want, "p"), (p, p_want, "p (backward)"), (da, da_want, "da"),
                            (db, db_want, "db")):
        assert torch.equal(got, want), f"{name}: {(got != want).sum().item()} of {got.numel()} differ"


@pytest.mark.gpu
def test_traced_feed_forward_keeps_pytorchs_operations(monkeypatch):
    """torch.compile traces the PyTorch operations (inductor fuses them), never the kernels' launches."""
    ran = []
    monkeypatch.setattr(swiglu_triton, "swiglu_forward", lambda *args: ran.append(args) or swiglu_forward(*args))
    ffn = FeedForward(16, 40, "silu", gated=True).cuda()
    x = torch.randn(3, 5, 16, device="cuda")
    eager = ffn(x)
    assert len(ran) == 1
    compiled = torch.compile(ffn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-6)
    assert len(ran) == 1


COMPILE = r"""
import inspect, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mm_rec import swiglu_triton

found = []
for name in ("_swiglu_fwd_kernel", "_swiglu_bwd_kernel"):
    kernel = getattr(swiglu_triton, name)
    params = list(inspect.signature(kernel.fn).parameters.values())
    values = {"BLOCK_R": swiglu_triton.BLOCK_R, "BLOCK_F": swiglu_triton.BLOCK_F, "INTERPRETED": False}
    for dtype in ("bf16", "fp16", "fp32"):
        pointers = True
        signature, constexprs = {}, {}
        for i, p in enumerate(params):
            pointers = pointers and p.name != "R"
            if "constexpr" in str(p.annotation):
                signature[p.name] = "constexpr"
                constexprs[(i,)] = values[p.name]
            else:
                signature[p.name] = "*" + dtype if pointers else "i32"
        ptx = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                             target=GPUTarget("cuda", 90, 32)).asm["ptx"]
        found.append([name, dtype, "div.rn.f32" in ptx, "div.full.f32" in ptx])
print(json.dumps(found))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels by running them")
def test_the_kernels_compile_for_an_h100_with_ieee_division():
    """The CPU tests interpret the kernels, which never takes their compiled branch (CUDA's expf): a fresh process
    without the interpreter compiles both for sm_90 in each dtype, and their divisions are the IEEE ones."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(found) == 6
    for name, dtype, ieee, approximate in found:
        assert ieee and not approximate, (name, dtype)
