"""mm_rec/scan_triton.py: the Triton scan against the naive loop (CPU: interpreted, tiny shapes; GPU: real shapes)."""

import pytest
import torch
from naive import naive_scan, naive_scan_grads

from mm_rec import scan_triton
from mm_rec.scan import scan

pytestmark = pytest.mark.skipif(not scan_triton.AVAILABLE, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(B, T, D, dtype=torch.float32, resets=False, device=DEVICE, seed=0):
    """Drawn on the CPU from a seeded generator, so CPU and GPU runs see the same values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g).to(device, dtype)
    log_gamma = torch.log(torch.rand(B, T, D, generator=g) * 0.5 + 0.5).to(device, dtype)
    if resets:
        log_gamma[0, 0] = float("-inf")  # a reset at t = 0, over the initial state
        log_gamma[-1, T // 2, : D // 2] = float("-inf")
        log_gamma[:, -1, -1] = float("-inf")
    return x, log_gamma


def randn(*shape, seed, device=DEVICE):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize("T, D, use_h0, resets", [(63, 37, True, True), (1, 5, False, False), (40, 16, False, True)])
def test_forward_and_backward_match_naive(T, D, use_h0, resets):
    B = 2
    x, log_gamma = make_inputs(B, T, D, resets=resets, seed=T)
    h0 = randn(B, D, seed=1) if use_h0 else None
    h, h_T = scan_triton.scan_fwd(x, log_gamma, h0)
    ref, ref_T = naive_scan(x.cpu(), log_gamma.cpu(), None if h0 is None else h0.cpu())
    assert h.dtype == x.dtype and h_T.dtype == torch.float32
    torch.testing.assert_close(h.double().cpu(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_T.double().cpu(), ref_T, rtol=1e-5, atol=1e-5)

    grad_h, grad_h_T = randn(B, T, D, seed=2), randn(B, D, seed=3)
    d_x, d_log_gamma, d_h0 = scan_triton.scan_bwd(grad_h, grad_h_T, h, log_gamma, h0)
    h0_ref = torch.zeros(B, D) if h0 is None else h0.cpu()
    ref_d_x, ref_d_log_gamma, ref_d_h0 = naive_scan_grads(x.cpu(), log_gamma.cpu(), h0_ref, grad_h.cpu(),
                                                          grad_h_T.cpu())
    assert torch.isfinite(d_log_gamma).all(), "d_log_gamma must be 0, not NaN, at resets"
    torch.testing.assert_close(d_x.double().cpu(), ref_d_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_log_gamma.double().cpu(), ref_d_log_gamma, rtol=1e-5, atol=1e-5)
    if h0 is None:
        assert d_h0 is None
    else:
        torch.testing.assert_close(d_h0.double().cpu(), ref_d_h0, rtol=1e-5, atol=1e-5)


def test_bf16_inputs():
    B, T, D = 2, 33, 24
    x, log_gamma = make_inputs(B, T, D, dtype=torch.bfloat16, resets=True, seed=4)
    h0 = randn(B, D, seed=5)
    h, h_T = scan_triton.scan_fwd(x, log_gamma, h0)
    ref, ref_T = naive_scan(x.cpu(), log_gamma.cpu(), h0.cpu())
    assert h.dtype == torch.bfloat16
    assert rel_err(h.cpu(), ref) < 4e-3 and rel_err(h_T.cpu(), ref_T) < 1e-5  # h rounded to bf16: at most 2^-8

    grad_h, grad_h_T = randn(B, T, D, seed=6).bfloat16(), randn(B, D, seed=7)
    grads = scan_triton.scan_bwd(grad_h, grad_h_T, h, log_gamma, h0)
    refs = naive_scan_grads(x.cpu(), log_gamma.cpu(), h0.cpu(), grad_h.cpu(), grad_h_T.cpu())
    for got, ref, dtype in zip(grads, refs, (torch.bfloat16, torch.bfloat16, torch.float32)):
        assert got.dtype == dtype
        assert rel_err(got.cpu(), ref) < 2e-2  # h is saved in bf16, so d_log_gamma sees its rounding


def test_cumprod_exp_matches_cumprod():
    gamma = torch.rand(2, 45, 19, generator=torch.Generator().manual_seed(8)).to(DEVICE) * 0.9 + 0.1
    gamma[1, 7, 3] = 0.0
    torch.testing.assert_close(scan_triton.cumprod_exp(gamma), torch.cumprod(gamma, 1), rtol=1e-5, atol=1e-7)


def test_float64_is_rejected():
    x = torch.zeros(1, 2, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="x must be float32"):
        scan_triton.scan_fwd(x, x.float())


def compare_public_op(B, T, D, dtype, resets, tol, use_h0=True):
    """scan(backend="triton") against scan(backend="torch") in float64, outputs and gradients."""
    x, log_gamma = make_inputs(B, T, D, dtype=dtype, resets=resets, seed=9)
    h0 = randn(B, D, seed=10)
    grad_h, grad_h_T = randn(B, T, D, seed=11).to(dtype), randn(B, D, seed=12)
    results = []
    for backend, cast in (("triton", lambda t: t), ("torch", torch.Tensor.double)):
        leaves = [cast(t).detach().requires_grad_() for t in ((x, log_gamma, h0) if use_h0 else (x, log_gamma))]
        h, h_T = scan(*leaves, output_final_state=True, backend=backend)
        ((h * cast(grad_h)).sum() + (h_T * cast(grad_h_T)).sum()).backward()
        results.append([h, h_T] + [t.grad for t in leaves])
    for name, got, ref in zip(("h", "h_T", "d_x", "d_log_gamma", "d_h0"), *results):
        assert torch.isfinite(got).all(), name
        assert rel_err(got, ref) < tol, (name, rel_err(got, ref))


@pytest.mark.parametrize("use_h0", [True, False])
def test_public_op_matches_torch_backend(use_h0):
    compare_public_op(2, 50, 21, torch.float32, resets=True, tol=1e-5, use_h0=use_h0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_gpu_realistic_shapes(dtype, tol):
    compare_public_op(4, 2048, 1000, dtype, resets=True, tol=tol)


@pytest.mark.gpu
def test_gpu_long_sequence_extreme_decays_match_float64():
    B, T, D = 2, 65536, 256
    x = randn(B, T, D, seed=13, device="cuda").bfloat16()
    near_one = torch.full((B, T, D // 2), -1e-6, device="cuda")
    near_zero = torch.full((B, T, D - D // 2), torch.log(torch.tensor(1e-6)).item(), device="cuda")
    log_gamma = torch.cat([near_one, near_zero], -1).bfloat16().requires_grad_()
    x.requires_grad_()
    h, h_T = scan(x, log_gamma, output_final_state=True, backend="triton")
    (h.float().square().mean() + h_T.square().mean()).backward()
    for name, t in (("h", h), ("h_T", h_T), ("d_x", x.grad), ("d_log_gamma", log_gamma.grad)):
        assert torch.isfinite(t).all(), name
    leaves = [t.detach().double().requires_grad_() for t in (x, log_gamma)]
    ref, ref_T = scan(*leaves, output_final_state=True, backend="torch")
    (ref.square().mean() + ref_T.square().mean()).backward()
    assert rel_err(h, ref) < 4e-3  # h rounded to bf16 (2^-8)
    assert rel_err(h_T, ref_T) < 1e-4  # fp32, but carried through 65536 steps
    # the backward reads the saved bf16 h: 2e-2, as in test_gpu_realistic_shapes
    assert rel_err(x.grad, leaves[0].grad) < 2e-2 and rel_err(log_gamma.grad, leaves[1].grad) < 2e-2


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    def step(x, log_gamma, h0):
        h, h_T = scan(torch.tanh(x), log_gamma, h0, output_final_state=True)
        return h.square().sum() + h_T.sum()

    compiled = torch.compile(step, fullgraph=True)
    x, log_gamma = make_inputs(2, 300, 130, seed=14)
    h0 = randn(2, 130, seed=15, device="cuda")
    grads = []
    for fn in (compiled, step):
        leaves = [t.detach().clone().requires_grad_() for t in (x, log_gamma, h0)]
        fn(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for got, ref in zip(*grads):
        assert rel_err(got, ref) < 1e-5
