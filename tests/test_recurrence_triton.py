"""mm_rec/recurrence_triton.py: the fused recurrence inputs against the formulas (tests/naive.py, float64),
forward and backward, including decays within 1e-6 of 1 and of the clamp, padding and resets."""

import math

import pytest
import torch
from naive import naive_recurrence_inputs

from mm_rec.recurrence import LOG_GAMMA_MAX, LOG_GAMMA_MIN
from mm_rec.recurrence_triton import AVAILABLE

pytestmark = [pytest.mark.skipif(not AVAILABLE, reason="triton is not installed"),
              # the interpreter evaluates both sides of tl.where; the unselected side may divide by 0
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(seed, B=2, T=9, d=37, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = 4.0 * torch.randn(B, T, d, generator=g, dtype=torch.float64)
    # the hard regions: 1 - gamma near 1e-6 (a near log(1e6) = 13.8, where logsigmoid is
    # about -1e-6) on both sides of the clamp, and past the lower clamp
    a[0, 0, :6] = torch.tensor([13.0, 13.7, 13.8155, 13.9, 20.0, -14.5], dtype=torch.float64)
    gate = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    z = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    real = torch.ones(B, T, dtype=torch.bool)
    real[1, :3] = False
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[0, 4] = reset[1, 3] = True
    return [t.to(dtype) if t.is_floating_point() else t for t in (a, gate, z)] + [real, reset]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
def test_forward_and_backward_equal_the_formulas(dtype, tol):
    from mm_rec.recurrence_triton import recurrence_inputs_bwd, recurrence_inputs_fwd

    a, g, z, real, reset = inputs(0, dtype=dtype)
    dev = [t.to(DEVICE) for t in (a, g, z, real, reset)]
    x, carry = recurrence_inputs_fwd(*dev, LOG_GAMMA_MIN, LOG_GAMMA_MAX)
    leaves = [t.double().requires_grad_() for t in (a, g, z)]  # the bf16 values, exactly, in float64
    x_ref, carry_ref = naive_recurrence_inputs(*leaves, real, reset)
    assert x.dtype == carry.dtype == torch.float32
    torch.testing.assert_close(x.cpu().double(), x_ref.detach(), rtol=tol, atol=1e-12)
    torch.testing.assert_close(carry.cpu().double(), carry_ref.detach(), rtol=tol, atol=1e-12)

    gen = torch.Generator().manual_seed(1)
    d_x, d_carry = torch.randn(x.shape, generator=gen), torch.randn(x.shape, generator=gen)
    grads = recurrence_inputs_bwd(*dev, d_x.to(DEVICE), d_carry.to(DEVICE), LOG_GAMMA_MIN, LOG_GAMMA_MAX)
    finite = torch.isfinite(carry_ref)  # -inf at resets carries no gradient
    ((x_ref * d_x.double()).sum() + (carry_ref[finite] * d_carry.double()[finite]).sum()).backward()
    for name, got, leaf in zip("agz", grads, leaves):
        assert got.dtype == dtype, name
        scale = leaf.grad.abs().max().item()
        err = (got.cpu().double() - leaf.grad).abs().max().item()
        assert err <= (tol if dtype == torch.float32 else 1e-2) * scale, (name, err, scale)


def test_slices_of_a_wider_projection_are_read_in_place():
    """g~ and z as slices of one [B, T, 3d] tensor (the fused projection's or the convolution's
    output) give the values and gradients of their contiguous copies, and are not copied."""
    from mm_rec.recurrence_triton import recurrence_inputs_bwd, recurrence_inputs_fwd, token_rows

    a, g, z, real, reset = (t.to(DEVICE) for t in inputs(2))
    d = a.shape[-1]
    wide = torch.cat([torch.randn_like(z), g, z], -1)  # one unrelated slice first
    g_view, z_view = wide[..., d:2 * d], wide[..., 2 * d:]
    assert token_rows(g_view).data_ptr() == g_view.data_ptr() and not g_view.is_contiguous()
    assert token_rows(g_view.transpose(0, 1)).is_contiguous()  # rows not evenly spaced: copied
    expected = recurrence_inputs_fwd(a, g, z, real, reset, LOG_GAMMA_MIN, LOG_GAMMA_MAX)
    got = recurrence_inputs_fwd(a, g_view, z_view, real, reset, LOG_GAMMA_MIN, LOG_GAMMA_MAX)
    for e, o in zip(expected, got):
        assert torch.equal(e, o)
    d_x, d_carry = torch.randn_like(expected[0]), torch.randn_like(expected[0])
    expected = recurrence_inputs_bwd(a, g, z, real, reset, d_x, d_carry, LOG_GAMMA_MIN, LOG_GAMMA_MAX)
    got = recurrence_inputs_bwd(a, g_view, z_view, real, reset, d_x, d_carry, LOG_GAMMA_MIN, LOG_GAMMA_MAX)
    for e, o in zip(expected, got):
        assert o.is_contiguous() and torch.equal(e, o)


def test_one_minus_gamma_is_exact_near_one():
    """1 - gamma = 1e-6 must not come out of a cancellation (1 - exp(log gamma))."""
    from mm_rec.recurrence_triton import recurrence_inputs_fwd

    a = torch.full((1, 1, 16), math.log(1e6 - 1.0) - 0.05, device=DEVICE)  # 1 - gamma just above 1e-6
    ones = torch.ones_like(a)
    flags = torch.ones(1, 1, dtype=torch.bool, device=DEVICE)
    x, _ = recurrence_inputs_fwd(a, torch.full_like(a, 50.0), ones, flags, ~flags, LOG_GAMMA_MIN, LOG_GAMMA_MAX)
    expected = 1.0 / (1.0 + math.exp(a[0, 0, 0].item()))  # sigmoid(-a), in float64
    assert abs(x[0, 0, 0].item() - expected) <= 1e-5 * expected


@pytest.mark.parametrize("tiles", [None, (16, 32)], ids=["default-tiles", "small-tiles"])
@pytest.mark.parametrize("resets", [False, True])
def test_state_gate_kernel_matches_the_naive_loop(tiles, resets, monkeypatch):
    """recurrence_gate="state" walked by the Triton kernels (one program per row, W in tiles):
    H, h_T and the gradients of z, log gamma, h0, W_g and b_g against autograd through the float64
    per-token loop, with left padding, a hole and document starts; d = 37 is no power of two, and
    the small tiles make the product span several tiles both ways."""
    from naive import naive_recurrence

    import mm_rec.state_gate_triton as kernels
    from mm_rec.state_gate import StateGate

    if tiles is not None:
        monkeypatch.setattr(kernels, "STATE_BJ", tiles[0])
        monkeypatch.setattr(kernels, "STATE_BK", tiles[1])
    B, T, d = 3, 11, 37
    g = torch.Generator().manual_seed(3)
    z = torch.randn(B, T, d, generator=g)
    log_gamma = torch.nn.functional.logsigmoid(1.0 + 2.0 * torch.randn(B, T, d, generator=g))
    real = torch.ones(B, T, dtype=torch.bool)
    real[1, :3] = False
    real[2, 6:8] = False
    log_gamma = log_gamma.masked_fill(~real[..., None], 0.0)
    reset = torch.zeros(B, T, dtype=torch.bool)
    if resets:
        reset[0, 0] = reset[0, 5] = reset[2, 9] = True
    h0 = torch.randn(B, d, generator=g)
    gate = StateGate(d)
    with torch.no_grad():
        gate.W_g.weight.copy_(0.3 * torch.randn(d, d, generator=g))
        gate.W_g.bias.copy_(torch.randn(d, generator=g))
    gate = gate.to(DEVICE)
    inputs = [t.to(DEVICE).requires_grad_() for t in (z, log_gamma, h0)]
    probe = torch.randn(B, T, d, generator=g)
    h, h_T = gate(inputs[0], inputs[1], reset.to(DEVICE), inputs[2], backend="triton")
    ((h * probe.to(DEVICE)).sum() + h_T.sum()).backward()
    got = [t.grad.cpu().double() for t in inputs + [gate.W_g.weight, gate.W_g.bias]]

    ref = [t.detach().double().requires_grad_() for t in (z, log_gamma, h0, gate.W_g.weight.cpu(), gate.W_g.bias.cpu())]
    h_ref, h_T_ref = naive_recurrence(ref[0], ref[1], real, reset, ref[2], state_gate=(ref[3], ref[4]))
    torch.testing.assert_close(h.detach().cpu().double(), h_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_T.detach().cpu().double(), h_T_ref.detach(), rtol=1e-5, atol=1e-6)
    ((h_ref * probe.double()).sum() + h_T_ref.sum()).backward()
    want = [t.grad for t in ref]
    got[1], want[1] = got[1][real], want[1][real]  # log gamma is 0 at padding by contract
    for name, a, b in zip(["z", "log_gamma", "h0", "W_g", "b_g"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_state_gate_kernel_matches_the_torch_loop_at_model_size():
    """At the quality study's width (d = 384, several warps and tiles) and 256 steps, on the GPU:
    the kernels' H and gradients against the PyTorch loop (both float32)."""
    from mm_rec.state_gate import StateGate

    torch.manual_seed(0)
    B, T, d = 4, 256, 384
    z = torch.randn(B, T, d, device="cuda")
    log_gamma = torch.nn.functional.logsigmoid(2.0 + torch.randn(B, T, d, device="cuda"))
    reset = torch.zeros(B, T, dtype=torch.bool, device="cuda")
    reset[1, 100] = True
    h0 = torch.randn(B, d, device="cuda")
    gate = StateGate(d).cuda()
    probe = torch.randn(B, T, d, device="cuda")
    results = []
    for backend in ("triton", "torch"):
        inputs = [t.clone().requires_grad_() for t in (z, log_gamma, h0)]
        gate.zero_grad()
        h, h_T = gate(inputs[0], inputs[1], reset, inputs[2], backend=backend)
        ((h * probe).sum() + h_T.sum()).backward()
        results.append([h.detach()] + [t.grad for t in inputs] + [gate.W_g.weight.grad.clone(), gate.W_g.bias.grad.clone()])
    for name, a, b in zip(["h", "dz", "dlog_gamma", "dh0", "dW_g", "db_g"], *results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("use_h0", [True, False])
def test_fused_recurrence_matches_the_torch_path_with_a_carried_state(use_h0):
    """The Triton recurrence (inputs and scan as one autograd node, whose backward recomputes log gamma)
    against backend="torch": h, h_T and the gradients of a, g~, z and the carried h0, from a loss on both
    outputs, with padding and resets."""
    from mm_rec.recurrence import recurrence

    a, g, z, real, reset = inputs(3)
    h0 = torch.randn(a.shape[0], a.shape[2], generator=torch.Generator().manual_seed(4)) if use_h0 else None
    weights = torch.randn(a.shape, generator=torch.Generator().manual_seed(5))
    results = {}
    for backend in ("torch", "triton"):
        leaves = [t.clone().to(DEVICE).requires_grad_() for t in (a, g, z)]
        start = None if h0 is None else h0.clone().to(DEVICE).requires_grad_()
        h, h_T = recurrence(leaves[2], leaves[1], leaves[0], real.to(DEVICE), reset.to(DEVICE), start, backend=backend)
        ((h * weights.to(DEVICE)).sum() + (h_T ** 2).sum()).backward()
        results[backend] = [h, h_T] + [t.grad for t in leaves] + ([start.grad] if start is not None else [])
    for name, got, want in zip(["h", "h_T", "d_a", "d_g", "d_z", "d_h0"], results["triton"], results["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
