"""mm_rec/scan.py: the scan op h_t = x_t + gamma_t h_(t-1) (backend="torch", and the public op on
every backend) against tests/naive.py's float64 loop, forward and backward; its contract
(optional initial and final state, dtypes, errors); and the torch.library op under
torch.compile and opcheck."""

import pytest
import torch
from common import random_log_gamma
from naive import naive_scan

from mm_rec import associative_scan_exponential, scan
from mm_rec.recurrence import LOG_GAMMA_MAX, LOG_GAMMA_MIN
from mm_rec.scan_triton import AVAILABLE as TRITON_AVAILABLE


@pytest.mark.parametrize("T", [1, 31, 63, 100])
@pytest.mark.parametrize("with_resets", [False, True])
def test_scan_forward_backward_matches_naive(T, with_resets):
    g = torch.Generator().manual_seed(T)
    B, D = 2, 37
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    log_gamma = random_log_gamma((B, T, D), g)
    if with_resets:
        resets = torch.rand(B, T, D, generator=g) < 0.1
        resets[0, 0] = True  # a reset at t = 0 drops the initial state
        log_gamma = log_gamma.masked_fill(resets, float("-inf"))
    h0 = torch.randn(B, D, generator=g, dtype=torch.float64)
    grad_h = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    grad_hT = torch.randn(B, D, generator=g, dtype=torch.float64)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, log_gamma, h0)]
        h, h_T = fn(*leaves)
        ((h * grad_h).sum() + (h_T * grad_hT).sum()).backward()
        return h.detach(), h_T.detach(), [leaf.grad for leaf in leaves]

    h, h_T, grads = run(lambda a, b, c: scan(a, b, c, output_final_state=True, backend="torch"))
    h_ref, h_T_ref, grads_ref = run(naive_scan)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h_T, h_T_ref, rtol=1e-10, atol=1e-10)
    for name, grad, grad_ref in zip(("x", "log_gamma", "initial_state"), grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-9, msg=f"d{name}")


def test_scan_without_initial_or_final_state():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 45, 37, generator=g)
    log_gamma = random_log_gamma((3, 45, 37), g, torch.float32)
    h, h_T = scan(x, log_gamma, backend="torch")
    h_ref, _ = naive_scan(x, log_gamma)
    assert h_T is None and h.dtype == torch.float32
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-5, atol=1e-5)


SCAN_BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON_AVAILABLE, reason="triton is not installed (on CPU it runs under TRITON_INTERPRET=1)"))]


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
@pytest.mark.parametrize("use_h0", [False, True])
@pytest.mark.parametrize("output_final_state", [False, True])
def test_scan_optional_arguments_in_every_combination(backend, use_h0, output_final_state):
    """initial_state is read whether or not the final state is asked for; h_T comes back exactly
    when asked; gradients reach x, log_gamma and h0 in each case (and at T = 0)."""
    g = torch.Generator().manual_seed(21)
    B, T, D = 2, 40, 6  # crosses a chunk of the torch backend
    x = torch.randn(B, T, D, generator=g)
    log_gamma = random_log_gamma((B, T, D), g, torch.float32)
    log_gamma[:, :8] = -0.01  # h0 stays visible for many steps
    h0 = 5.0 * torch.randn(B, D, generator=g) if use_h0 else None
    grad_h = torch.randn(B, T, D, generator=g)
    grad_h_T = torch.randn(B, D, generator=g) if output_final_state else torch.zeros(B, D)

    def run(fn, cast):
        leaves = [cast(t).requires_grad_() for t in (x, log_gamma) + ((h0,) if use_h0 else ())]
        h, h_T = fn(*leaves)
        loss = (h * cast(grad_h)).sum() + (0.0 if h_T is None else (h_T * cast(grad_h_T)).sum())
        loss.backward()
        return h.detach(), h_T, [leaf.grad for leaf in leaves]

    h, h_T, grads = run(lambda *a: scan(*a, output_final_state=output_final_state, backend=backend), torch.Tensor.clone)
    h_ref, h_T_ref, grads_ref = run(naive_scan, torch.Tensor.double)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-5, atol=1e-5)
    if output_final_state:
        assert h_T.dtype == torch.float32
        torch.testing.assert_close(h_T.detach().double(), h_T_ref.detach(), rtol=1e-5, atol=1e-5)
    else:
        assert h_T is None
    for name, grad, grad_ref in zip(("x", "log_gamma", "initial_state"), grads, grads_ref):
        torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-5, atol=1e-5, msg=f"d{name}")

    empty, empty_T = scan(x[:, :0], log_gamma[:, :0], h0, output_final_state=output_final_state, backend=backend)
    assert empty.shape == (B, 0, D)
    if output_final_state:
        torch.testing.assert_close(empty_T, torch.zeros(B, D) if h0 is None else h0)
    else:
        assert empty_T is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scan_long_sequence_at_the_decay_extremes(dtype):
    """T = 4096 (128 chunks) with decays within 1e-6 of 1, at both clamps and in between,
    against the float64 loop: the carry across chunks keeps fp32 accuracy (bf16: the
    inputs are bf16, the state fp32; only h is rounded to bf16 on output)."""
    g = torch.Generator().manual_seed(22)
    B, T, D = 1, 4096, 8
    x = torch.randn(B, T, D, generator=g).to(dtype)
    rate = 1e-6 * 10.0 ** (2 * torch.rand(B, T, D, generator=g, dtype=torch.float64))  # 1 - gamma in [1e-6, 1e-4]
    log_gamma = torch.log1p(-rate)
    log_gamma[..., 0] = LOG_GAMMA_MAX
    log_gamma[..., 1] = LOG_GAMMA_MIN
    log_gamma[..., 2] = LOG_GAMMA_MIN + 1e-6 * torch.rand(B, T, generator=g, dtype=torch.float64)
    log_gamma = log_gamma.float()
    h, h_T = scan(x, log_gamma, output_final_state=True, backend="torch")
    h_ref, h_T_ref = naive_scan(x, log_gamma)
    rel = lambda a, b: ((a.double() - b).norm(dim=1) / b.norm(dim=1)).max().item()  # noqa: E731  per channel
    assert rel(h_T, h_T_ref) < 1e-5
    assert rel(h, h_ref) < (1e-5 if dtype == torch.float32 else 4e-3)  # bf16: h's own rounding, at most 2^-8


def test_scan_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 34, 2, generator=g, dtype=torch.float64, requires_grad=True)  # crosses a chunk
    log_gamma = random_log_gamma((1, 34, 2), g).requires_grad_()
    h0 = torch.randn(1, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: scan(a, b, c, output_final_state=True, backend="torch"), (x, log_gamma, h0)
    )


@pytest.mark.parametrize("gamma_dtype", [torch.bfloat16, torch.float32])
def test_scan_bf16_input(gamma_dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 70, 37, generator=g).bfloat16()
    log_gamma = random_log_gamma((2, 70, 37), g, gamma_dtype)
    h, h_T = scan(x, log_gamma, output_final_state=True, backend="torch")
    h_ref, h_T_ref = naive_scan(x, log_gamma)
    assert h.dtype == torch.bfloat16 and h_T.dtype == torch.float32  # fp32 accumulation
    torch.testing.assert_close(h.double(), h_ref, rtol=4e-3, atol=1e-6)  # h rounded to bf16: unit roundoff 2^-8
    torch.testing.assert_close(h_T.double(), h_T_ref, rtol=1e-5, atol=1e-5)


def test_associative_scan_exponential_is_cumprod():
    g = torch.Generator().manual_seed(4)
    gamma = torch.rand(2, 50, 37, generator=g, dtype=torch.float64)
    gamma[0, 7, 3] = 0.0
    gamma[1, 0, :5] = 1.0
    torch.testing.assert_close(associative_scan_exponential(gamma), torch.cumprod(gamma, dim=1), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        associative_scan_exponential(gamma, dim=2), torch.cumprod(gamma, dim=2), rtol=1e-12, atol=1e-14
    )
    assert associative_scan_exponential(gamma.float()).dtype == torch.float32
    with pytest.raises(ValueError, match="gamma"):
        associative_scan_exponential(torch.ones(1, 3, 2, dtype=torch.long))


def test_scan_rejects_bad_input():
    x = torch.randn(2, 5, 3)
    lg = torch.zeros(2, 5, 3)
    with pytest.raises(ValueError, match="log_gamma"):
        scan(x, torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match="x"):
        scan(torch.randn(5, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="backend"):
        scan(x, lg, backend="cuda")
    with pytest.raises(ValueError, match="x"):
        scan(x.long(), lg)
    with pytest.raises(ValueError, match="log_gamma"):
        scan(x, lg.long())
    with pytest.raises(ValueError, match="initial_state"):
        scan(x, lg, torch.zeros(2, 4))


@pytest.mark.parametrize("use_h0", [True, False])
def test_scan_compiles_fullgraph_forward_and_backward(use_h0):
    def f(x, log_gamma, h0):
        h, h_last = scan(x, log_gamma, h0, output_final_state=True, backend="torch")
        return (h * h).sum() + h_last.sum()

    torch.manual_seed(0)
    x = torch.randn(2, 37, 5, requires_grad=True)
    log_gamma = (-torch.rand(2, 37, 5)).requires_grad_()
    h0 = torch.randn(2, 5, requires_grad=True) if use_h0 else None
    leaves = (x, log_gamma, h0) if use_h0 else (x, log_gamma)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, log_gamma, h0)
    grads = torch.autograd.grad(loss, leaves)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    h, h_last = naive_scan(*ref_leaves)
    ref = (h * h).sum() + h_last.sum()
    ref_grads = torch.autograd.grad(ref, ref_leaves)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_compiled_graph_calls_the_custom_op():
    """Eager mode runs an autograd.Function; under torch.compile the graph must hold the op."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    x, log_gamma = torch.randn(1, 8, 3), -torch.rand(1, 8, 3)
    torch.compile(lambda a, b: scan(a, b, backend="torch")[0].sum(), backend=record, fullgraph=True)(x, log_gamma)
    assert any("mm_rec.scan_fwd" in code for code in graphs), graphs


def test_scan_op_passes_torch_library_opcheck():
    x = torch.randn(2, 9, 3, requires_grad=True)
    log_gamma = (-torch.rand(2, 9, 3)).requires_grad_()
    h0 = torch.randn(2, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.mm_rec.scan_fwd.default, (x, log_gamma, h0, "torch"))
    h = torch.randn(2, 9, 3)
    torch.library.opcheck(torch.ops.mm_rec.scan_bwd.default,
                          (torch.randn(2, 9, 3), torch.randn(2, 3), h, log_gamma.detach(), h0.detach(), "torch"))
    # no initial state and no gradient for the final state: both optional
    torch.library.opcheck(torch.ops.mm_rec.scan_fwd.default, (x, log_gamma, None, "torch"))
    torch.library.opcheck(torch.ops.mm_rec.scan_bwd.default,
                          (torch.randn(2, 9, 3), None, h, log_gamma.detach(), None, "torch"))


@pytest.mark.gpu
def test_auto_backend_picks_triton_on_cuda():
    from mm_rec.scan import resolve_backend
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
