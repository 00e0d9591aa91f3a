"""Each mechanism of docs/ARCHITECTURE.md sections 1, 2 and 4 against a naive reference.

The references live in tests/naive.py (per-token loops written from the formulas) or are
written out here; none of them calls the code under test.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from mm_rec import LayerState, MMRecConfig, MMRecForCausalLM, associative_scan_exponential, scan
from mm_rec.hem import convert_hem_state_dict
from mm_rec.recurrence import LOG_GAMMA_MAX, LOG_GAMMA_MIN, MDIDecay, StateGate, input_gated_recurrence
from mm_rec.memory import MultiMemoryAttention, fold_into_slots
from mm_rec.positions import token_layout
from mm_rec.scan_triton import AVAILABLE as TRITON_AVAILABLE

from naive import naive_fold, naive_memory_attention, naive_recurrence, naive_scan


def tiny_config(**overrides):
    kwargs = dict(
        vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, memory_block_size=4,
        memory_segment_length=16, num_memory_slots=3, scan_backend="torch",
    )
    kwargs.update(overrides)
    return MMRecConfig(**kwargs)


def random_log_gamma(shape, generator=None, dtype=torch.float64):
    """Decays spread over (0, 1): logsigmoid of N(1, 2^2)."""
    return F.logsigmoid(1.0 + 2.0 * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)


# ---------------------------------------------------------------------------------------
# 1. The scan op (backend="torch") against naive_scan
# ---------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------
# 2. The MDI decay
# ---------------------------------------------------------------------------------------

def test_mdi_decay_formula():
    torch.manual_seed(5)
    decay = MDIDecay(pe_dim=6, hidden_size=20)
    p = 3.0 * torch.randn(2, 9, 6)
    W, b = decay.W_E.weight.double(), decay.W_E.bias.double()
    pd = p.double()
    gelu = 0.5 * pd * (1.0 + torch.erf(pd / math.sqrt(2.0)))
    a = gelu @ W.T + b
    log_sigmoid = -torch.log1p(torch.exp(-a))
    expected = log_sigmoid.clamp(math.log(1e-6), math.log(1.0 - 1e-6))
    out = decay(p)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_mdi_decay_clamps_at_extreme_inputs():
    decay = MDIDecay(pe_dim=4, hidden_size=6)
    with torch.no_grad():
        decay.W_E.weight.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])[:, None].expand(6, 4))
        decay.W_E.bias.zero_()
    out = decay(torch.full((1, 3, 4), 1e4))  # a = +-4e4 per channel
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[..., 0::2], torch.full_like(out[..., 0::2], math.log1p(-1e-6)), rtol=1e-6, atol=0)
    torch.testing.assert_close(out[..., 1::2], torch.full_like(out[..., 1::2], math.log(1e-6)), rtol=1e-6, atol=0)
    assert LOG_GAMMA_MIN == pytest.approx(math.log(1e-6)) and LOG_GAMMA_MAX == pytest.approx(math.log1p(-1e-6))
    assert (-torch.expm1(out) > 0).all()  # the input weight 1 - gamma never vanishes


def test_decay_init_is_log_uniform_over_timescales():
    config = tiny_config(hidden_size=32, num_attention_heads=4)
    model = MMRecForCausalLM(config)
    expected = torch.linspace(math.log(1e-3), math.log(1e-1), 32, dtype=torch.float64)
    for layer in model.model.layers:
        rate = torch.sigmoid(-layer.mdi.W_E.bias.double())  # 1 - sigmoid(b_E)
        torch.testing.assert_close(rate.log().sort().values, expected, rtol=0, atol=1e-5)
        xavier = math.sqrt(6.0 / sum(layer.mdi.W_E.weight.shape))
        assert layer.mdi.W_E.weight.abs().max() < 0.5 * xavier  # W_E small
    # Consequence: a fresh model's decays stay near the init range at every token.
    seen = []
    for layer in model.model.layers:  # W_E's output is the decay logit a: 1 - gamma = sigmoid(-a)
        layer.mdi.W_E.register_forward_hook(lambda mod, inp, out: seen.append(torch.sigmoid(-out.double())))
    model(torch.randint(0, 60, (2, 20)))
    rates = torch.cat([s.flatten() for s in seen])
    assert rates.min() > 0.5e-3 and rates.max() < 2e-1


# ---------------------------------------------------------------------------------------
# 3. The gate and the level-0 recurrence
# ---------------------------------------------------------------------------------------

def recurrence_inputs(seed, B=3, T=40, d=12):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, d, generator=g)
    gate_logits = torch.randn(B, T, d, generator=g)
    log_gamma = random_log_gamma((B, T, d), g, torch.float32)
    real = torch.ones(B, T, dtype=torch.bool)
    real[1, :5] = False  # left padding
    real[2, 17:19] = False  # a hole (a pad in the middle): the state must pass through
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[0, 0] = reset[0, 11] = reset[2, 30] = True
    log_gamma = log_gamma.masked_fill(~real[..., None], 0.0)
    h0 = torch.randn(B, d, generator=g)
    return z, gate_logits, log_gamma, real, reset, h0


def test_input_gated_recurrence_matches_naive_loop():
    z, gate_logits, log_gamma, real, reset, h0 = recurrence_inputs(6)
    h, h_T = input_gated_recurrence(z, gate_logits, log_gamma, reset, h0, backend="torch")
    h_ref, h_T_ref = naive_recurrence(z, log_gamma, real, reset, h0, gate_logits=gate_logits)
    assert h.dtype == torch.float32
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_T.double(), h_T_ref, rtol=1e-5, atol=1e-6)
    # Padding passes the state through; a reset keeps the token's own (1 - gamma) g z.
    torch.testing.assert_close(h[1, 4], h0[1])
    torch.testing.assert_close(h[2, 18], h[2, 16])
    x0 = -torch.expm1(log_gamma[0, 11]) * torch.sigmoid(gate_logits[0, 11]) * z[0, 11]
    torch.testing.assert_close(h[0, 11], x0)


def test_state_gate_matches_naive_loop():
    torch.manual_seed(7)
    z, _, log_gamma, real, reset, h0 = recurrence_inputs(7)
    gate = StateGate(12)
    torch.nn.init.normal_(gate.W_g.weight)
    torch.nn.init.normal_(gate.W_g.bias)
    h, h_T = gate(z, log_gamma, reset, h0)
    h_ref, h_T_ref = naive_recurrence(z, log_gamma, real, reset, h0, state_gate=(gate.W_g.weight, gate.W_g.bias))
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_T.double(), h_T_ref, rtol=1e-5, atol=1e-6)
    gate_at_reset = torch.sigmoid(gate.W_g.bias)  # the gate reads h_{t-1} = 0 at a document start
    torch.testing.assert_close(h[0, 11], -torch.expm1(log_gamma[0, 11]) * gate_at_reset * z[0, 11])


@pytest.mark.parametrize("mode", ["input", "state"])
def test_recurrence_near_unit_decay_keeps_fp32_precision(mode):
    """Decays within 1e-6 of 1 (the clamp log1p(-1e-6)) up to 1 - 1e-5, and at the lower clamp:
    the input weight 1 - gamma must be -expm1(log gamma). 1 - exp(log gamma) in fp32 is off by
    up to half an ulp of 1 (6e-8), i.e. 3e-2 relative at 1 - gamma = 1e-6. The reference is the
    float64 loop on the same fp32 log-decays."""
    g = torch.Generator().manual_seed(23)
    B, T, d = 2, 48, 24
    z = torch.randn(B, T, d, generator=g)
    gate_logits = torch.randn(B, T, d, generator=g)
    rate = 1e-6 * 10.0 ** torch.rand(B, T, d, generator=g, dtype=torch.float64)  # 1 - gamma in [1e-6, 1e-5]
    log_gamma = torch.log1p(-rate).float().clamp(LOG_GAMMA_MIN, LOG_GAMMA_MAX)
    log_gamma[..., :4] = LOG_GAMMA_MAX
    log_gamma[..., 4:6] = LOG_GAMMA_MIN
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[1, 20] = True
    h0 = None  # h is then ~1e-5 in size and all of it comes through the input weight
    if mode == "input":
        h, h_T = input_gated_recurrence(z, gate_logits, log_gamma, reset, h0, backend="torch")
        h_ref, h_T_ref = naive_recurrence(z, log_gamma, None, reset, h0, gate_logits=gate_logits)
    else:
        gate = StateGate(d)
        with torch.no_grad():
            gate.W_g.weight.copy_(torch.randn(d, d, generator=g))
            gate.W_g.bias.copy_(torch.randn(d, generator=g))
        h, h_T = gate(z, log_gamma, reset, h0)
        h_ref, h_T_ref = naive_recurrence(z, log_gamma, None, reset, h0, state_gate=(gate.W_g.weight, gate.W_g.bias))
    rel = ((h.double() - h_ref).norm(dim=1) / h_ref.norm(dim=1)).max().item()  # per row and channel
    assert rel < 1e-5, rel
    torch.testing.assert_close(h_T.double(), h_T_ref, rtol=1e-5, atol=0)


def _rms(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def naive_block(block, config, x, attention_mask, position_ids):
    """docs/ARCHITECTURE.md section 1 for one block, written out in float64 from its parameters.
    Returns (h, y)."""
    P = {name: p.detach().double() for name, p in block.named_parameters()}
    d, eps = config.hidden_size, config.rms_norm_eps
    x = x.double()
    u = _rms(x, P["norm1.weight"], eps)
    names = ["q", "k", "v", "z"] + (["g"] if config.recurrence_gate == "input" else []) + ["p"]
    widths = [config.pe_dim if n == "p" else d for n in names]
    if config.use_hem:
        W = dict(zip(names, P["hem.W_fused.weight"].split(widths)))
        bias = dict(zip(names, P["hem.W_fused.bias"].split(widths)))
    else:
        W = {n: P[f"hem.W_{n}.weight"] for n in names}
        bias = {n: P[f"hem.W_{n}.bias"] for n in names}
    proj = {n: u @ W[n].T + bias[n] for n in names}
    a = _gelu(proj["p"]) @ P["mdi.W_E.weight"].T + P["mdi.W_E.bias"]
    log_gamma = (-torch.log1p(torch.exp(-a))).clamp(math.log(1e-6), math.log(1 - 1e-6))
    real = attention_mask.bool()
    reset = real & (position_ids == 0) if position_ids is not None else None
    if config.recurrence_gate == "input":
        h, _ = naive_recurrence(proj["z"], log_gamma, real, reset, gate_logits=proj["g"])
    else:
        h, _ = naive_recurrence(proj["z"], log_gamma, real, reset,
                                state_gate=(P["state_gate.W_g.weight"], P["state_gate.W_g.bias"]))
    H = config.num_attention_heads
    r = _rms(h.unflatten(-1, (H, -1)), 1.0, eps).flatten(-2) * P["readout_norm.weight"]
    m, _ = naive_memory_attention(
        proj["q"], proj["k"], proj["v"], P["memory.slot_keys"], P["memory.slot_values"],
        config.memory_block_size, config.memory_segment_length, config.memory_decay, H, attention_mask, position_ids,
    )
    x = x + (r + m) @ P["W_o.weight"].T
    ffn = _gelu(_rms(x, P["norm2.weight"], eps) @ P["ffn.up.weight"].T) @ P["ffn.down.weight"].T
    return h, x + ffn


@pytest.mark.parametrize("recurrence_gate", ["input", "state"])
@pytest.mark.parametrize("use_hem", [True, False])
@pytest.mark.parametrize("rows", ["plain", "left_padded", "packed"])
def test_block_matches_naive_reference(recurrence_gate, use_hem, rows):
    config = tiny_config(recurrence_gate=recurrence_gate, use_hem=use_hem, memory_decay=0.8)
    torch.manual_seed(8)
    block = MMRecForCausalLM(config).model.layers[0]
    with torch.no_grad():  # move every parameter off its init so each path carries signal
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    B, T = 2, 40
    x = torch.randn(B, T, config.hidden_size)
    mask = torch.ones(B, T, dtype=torch.long)
    position_ids = None
    if rows == "left_padded":
        mask[1, :7] = 0
    if rows == "packed":
        position_ids = torch.cat([torch.arange(21), torch.arange(3), torch.arange(16)])[None].repeat(B, 1)
        position_ids[1] = torch.cat([torch.arange(5), torch.arange(35)])
    layout = token_layout(mask, position_ids, torch.zeros(B, dtype=torch.long))
    seen = []
    block.readout_norm.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    y, _ = block(x, layout)
    h_ref, y_ref = naive_block(block, config, x, mask, position_ids)
    real = mask.bool()
    torch.testing.assert_close(seen[0].double()[real], h_ref[real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y.double()[real], y_ref[real], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------
# 4. Memory visibility and attention
# ---------------------------------------------------------------------------------------

MEMORY_CASES = {
    # name: (B, T, left padding per row, position_ids per row as document lengths or None)
    "three_segments": (2, 48, [0, 0], None),
    "segments_partial": (2, 61, [0, 0], None),
    "left_padded": (3, 57, [0, 5, 13], None),
    "padded_past_a_segment": (2, 50, [0, 21], None),  # row 1 has no real token in the first segment
    "packed": (2, 58, [0, 0], [[21, 3, 30, 4], [16, 16, 26]]),
    "packed_and_padded": (2, 50, [0, 9], [[33, 17], [6, 35]]),
}


@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_memory_attention_matches_naive(case):
    B, T, pads, documents = MEMORY_CASES[case]
    config = tiny_config(memory_decay=0.7)
    torch.manual_seed(9)
    memory = MultiMemoryAttention(config)
    torch.nn.init.normal_(memory.slot_keys)
    torch.nn.init.normal_(memory.slot_values)
    q, k, v = (torch.randn(B, T, config.hidden_size) for _ in range(3))
    mask = torch.ones(B, T, dtype=torch.long)
    for b, pad in enumerate(pads):
        mask[b, :pad] = 0
    position_ids = None
    if documents is not None:
        position_ids = torch.zeros(B, T, dtype=torch.long)
        for b, lengths in enumerate(documents):
            ids = torch.cat([torch.arange(n) for n in lengths])
            position_ids[b, pads[b]:] = ids[: T - pads[b]]
    layout = token_layout(mask, position_ids, torch.zeros(B, dtype=torch.long))
    state = LayerState.fresh(B, config.hidden_size, config.blocks_per_segment, memory.slot_keys, memory.slot_values)
    with torch.no_grad():
        m, new_state = memory(q, k, v, layout, state)
    m_ref, finals = naive_memory_attention(
        q, k, v, memory.slot_keys, memory.slot_values, config.memory_block_size,
        config.memory_segment_length, config.memory_decay, config.num_attention_heads, mask, position_ids,
    )
    real = mask.bool()
    torch.testing.assert_close(m.double()[real], m_ref[real], rtol=1e-5, atol=1e-5)
    # The state handed to the next chunk is the naive memory after the last token.
    for b, final in enumerate(finals):
        torch.testing.assert_close(new_state.slot_keys[b].double(), final["slot_keys"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(new_state.slot_values[b].double(), final["slot_values"], rtol=1e-5, atol=1e-5)
        n = len(final["summaries"])
        assert int(new_state.block_count[b]) == n
        if n:
            torch.testing.assert_close(new_state.block_keys[b, :n].double(),
                                       torch.stack([s[0] for s in final["summaries"]]), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(new_state.block_values[b, :n].double(),
                                       torch.stack([s[1] for s in final["summaries"]]), rtol=1e-5, atol=1e-5)
        assert int(new_state.open_count[b]) == len(final["open_block"])
        open_keys = sum((e[0] for e in final["open_block"]), torch.zeros(config.hidden_size, dtype=torch.float64))
        torch.testing.assert_close(new_state.open_key_sum[b].double(), open_keys, rtol=1e-5, atol=1e-5)


DECODE_CASES = {
    # name: (left padding per row, holes (padded steps inside a row) per row, documents per row or None)
    "plain_and_padded": ([0, 7, 23], [[], [20, 21, 22], [30]], None),
    "packed_and_padded": ([0, 5, 0], [[], [33], [9, 10]], [[21, 3, 31], [17, 40], [4, 4, 50]]),
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_step_matches_naive_memory(case):
    """The decode step alone (forward with T == 1, carrying the LayerState) against the naive
    per-token memory, at every step and in the final state: rows that close blocks, fold
    segments (segment 16, so 3 folds), restart documents and skip padded steps."""
    pads, holes, documents = DECODE_CASES[case]
    config = tiny_config(memory_decay=0.7)
    B, T, d = 3, 55, config.hidden_size
    g = torch.Generator().manual_seed(24)
    memory = MultiMemoryAttention(config)
    with torch.no_grad():
        memory.slot_keys.copy_(torch.randn(memory.slot_keys.shape, generator=g))
        memory.slot_values.copy_(torch.randn(memory.slot_values.shape, generator=g))
    q, k, v = (torch.randn(B, T, d, generator=g) for _ in range(3))
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        mask[b, :pads[b]] = 0
        mask[b, holes[b]] = 0
    position_ids = None
    if documents is not None:
        position_ids = torch.zeros(B, T, dtype=torch.long)
        for b, lengths in enumerate(documents):
            real = mask[b].bool()
            ids = torch.cat([torch.arange(n) for n in lengths])
            position_ids[b, real] = ids[: int(real.sum())]
    m_ref, finals = naive_memory_attention(
        q, k, v, memory.slot_keys, memory.slot_values, config.memory_block_size,
        config.memory_segment_length, config.memory_decay, config.num_attention_heads, mask, position_ids,
    )
    state = LayerState.fresh(B, d, config.blocks_per_segment, memory.slot_keys, memory.slot_values)
    offset = torch.zeros(B, dtype=torch.long)
    with torch.no_grad():
        for t in range(T):
            step = slice(t, t + 1)
            layout = token_layout(mask[:, step], None if position_ids is None else position_ids[:, step], offset)
            m, state = memory(q[:, step], k[:, step], v[:, step], layout, state)
            offset = layout.next_position(offset)
            real = mask[:, t].bool()
            torch.testing.assert_close(m[real, 0].double(), m_ref[real, t], rtol=1e-5, atol=1e-5, msg=f"t={t}")
    for b, final in enumerate(finals):
        torch.testing.assert_close(state.slot_keys[b].double(), final["slot_keys"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state.slot_values[b].double(), final["slot_values"], rtol=1e-5, atol=1e-5)
        n = len(final["summaries"])
        assert int(state.block_count[b]) == n
        if n:
            torch.testing.assert_close(state.block_keys[b, :n].double(),
                                       torch.stack([s[0] for s in final["summaries"]]), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(state.block_values[b, :n].double(),
                                       torch.stack([s[1] for s in final["summaries"]]), rtol=1e-5, atol=1e-5)
        assert int(state.open_count[b]) == len(final["open_block"])
        for name, i in (("open_key_sum", 0), ("open_value_sum", 1)):
            expected = sum((e[i] for e in final["open_block"]), torch.zeros(d, dtype=torch.float64))
            torch.testing.assert_close(getattr(state, name)[b].double(), expected, rtol=1e-5, atol=1e-5, msg=name)


def test_packed_document_start_sees_only_learned_slots():
    """A document's first block sees exactly the learned slots again, whatever came before."""
    config = tiny_config()
    torch.manual_seed(10)
    memory = MultiMemoryAttention(config)
    torch.nn.init.normal_(memory.slot_keys)
    torch.nn.init.normal_(memory.slot_values)
    q, k, v = (torch.randn(1, 40, config.hidden_size) for _ in range(3))
    position_ids = torch.cat([torch.arange(36), torch.arange(4)])[None]
    layout = token_layout(torch.ones(1, 40), position_ids, torch.zeros(1, dtype=torch.long))
    fresh = lambda: LayerState.fresh(1, config.hidden_size, config.blocks_per_segment,  # noqa: E731
                                     memory.slot_keys, memory.slot_values)
    with torch.no_grad():
        m_packed, _ = memory(q, k, v, layout, fresh())
        m_alone, _ = memory(q[:, 36:], k[:, 36:], v[:, 36:],
                            token_layout(torch.ones(1, 4), None, torch.zeros(1, dtype=torch.long)), fresh())
    torch.testing.assert_close(m_packed[:, 36:], m_alone, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------
# 5. The folding rule
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("decay", [0.99, 0.6])
def test_fold_into_slots_equals_blockwise_ema(decay):
    g = torch.Generator().manual_seed(11)
    B, S, E, d = 2, 3, 7, 5
    slot_keys = torch.randn(B, S, d, generator=g, dtype=torch.float64)
    slot_values = torch.randn(B, S, d, generator=g, dtype=torch.float64)
    slot_keys[1, 2] = slot_keys[1, 0]  # row 1: slots 0 and 2 tie for every block
    block_keys = torch.randn(B, E, d, generator=g, dtype=torch.float64)
    block_values = torch.randn(B, E, d, generator=g, dtype=torch.float64)
    for i in (0, 2, 3, 5):  # four blocks that route to slot 1, the rest scattered
        block_keys[0, i] = 4.0 * slot_keys[0, 1] + 0.1 * torch.randn(d, generator=g, dtype=torch.float64)
        block_keys[1, i] = 4.0 * slot_keys[1, 0] + 0.1 * torch.randn(d, generator=g, dtype=torch.float64)
    block_keys[0, 6] = 0.0  # all scores tie at 0: lowest slot
    selected = torch.ones(B, E, dtype=torch.bool)
    selected[0, 3] = False  # masked out in the middle of slot 1's run
    selected[1, 6] = False
    new_keys, new_values = fold_into_slots(slot_keys, slot_values, block_keys, block_values, selected, decay)
    routes = (block_keys @ slot_keys.transpose(1, 2)).argmax(-1)
    assert routes[0, [0, 2, 5]].eq(1).all() and routes[1, [0, 2, 3, 5]].eq(0).all()  # the setup holds
    for b in range(B):
        blocks = [(block_keys[b, i], block_values[b, i]) for i in range(E) if selected[b, i]]
        K_ref, V_ref = naive_fold(slot_keys[b], slot_values[b], blocks, decay)
        torch.testing.assert_close(new_keys[b], K_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(new_values[b], V_ref, rtol=1e-12, atol=1e-12)
    # row 1: every tie went to slot 0, so slot 2 (its copy) kept its value
    assert torch.equal(new_keys[1, 2], slot_keys[1, 2]) and torch.equal(new_values[1, 2], slot_values[1, 2])


def test_fold_ties_go_to_the_lowest_slot():
    """Ties that the lowest-j rule settles differently from highest-j, from "the slot already
    used in this segment" and from "slot 0": block A routes to slot 3 alone; block B ties
    slots 1 and 3; block C ties slots 1, 2 and 3. Lowest j sends B and C to slot 1. The
    expected slots are the EMA written out by hand."""
    decay = 0.75
    slot_keys = torch.tensor([[-1.0, 0, 0], [0, 1, 0], [0, 0, -1], [0, 1, 1]], dtype=torch.float64)
    slot_values = torch.arange(12, dtype=torch.float64).view(4, 3)
    block_keys = torch.tensor([[0.0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=torch.float64)  # A, B, C
    block_values = torch.tensor([[5.0, 6, 7], [-1, 2, -3], [4, -4, 8]], dtype=torch.float64)
    assert (block_keys @ slot_keys.T).tolist() == [[0, 0, -1, 1], [0, 1, 0, 1], [-1, 0, 0, 0]]  # the ties hold
    new_keys, new_values = fold_into_slots(slot_keys[None], slot_values[None], block_keys[None], block_values[None],
                                           torch.ones(1, 3, dtype=torch.bool), decay)
    for new, old, blocks in ((new_keys[0], slot_keys, block_keys), (new_values[0], slot_values, block_values)):
        expected = old.clone()
        expected[3] = decay * old[3] + (1 - decay) * blocks[0]
        expected[1] = decay * (decay * old[1] + (1 - decay) * blocks[1]) + (1 - decay) * blocks[2]
        torch.testing.assert_close(new, expected, rtol=1e-15, atol=1e-15)


def test_fold_with_nothing_selected_keeps_slots():
    g = torch.Generator().manual_seed(12)
    slot_keys, slot_values = torch.randn(1, 3, 4, generator=g), torch.randn(1, 3, 4, generator=g)
    blocks = torch.randn(1, 4, 4, generator=g)
    k, v = fold_into_slots(slot_keys, slot_values, blocks, blocks, torch.zeros(1, 4, dtype=torch.bool), 0.9)
    torch.testing.assert_close(k, slot_keys)
    torch.testing.assert_close(v, slot_values)


# ---------------------------------------------------------------------------------------
# 7. HEM: one fused GEMM
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("recurrence_gate, width", [("input", 5), ("state", 4)])
def test_hem_is_one_linear_called_once(recurrence_gate, width):
    config = tiny_config(recurrence_gate=recurrence_gate)
    model = MMRecForCausalLM(config).eval()
    d, pe = config.hidden_size, config.pe_dim
    calls = []
    for layer in model.model.layers:
        fused = layer.hem.W_fused
        assert isinstance(fused, torch.nn.Linear) and fused.bias is not None
        assert (fused.in_features, fused.out_features) == (d, width * d + pe)
        assert [n for n, mod in layer.hem.named_modules() if isinstance(mod, torch.nn.Linear)] == ["W_fused"]
        fused.register_forward_hook(lambda mod, inp, out: calls.append(out.shape))
        if recurrence_gate == "state":
            assert tuple(layer.state_gate.W_g.weight.shape) == (d, d)
    model(torch.randint(0, 60, (2, 37)))
    assert calls == [torch.Size([2, 37, width * d + pe])] * config.num_hidden_layers


@pytest.mark.parametrize("recurrence_gate", ["input", "state"])
@pytest.mark.parametrize("to_fused", [True, False])
def test_hem_fused_equals_unfused_after_conversion(recurrence_gate, to_fused):
    source = MMRecForCausalLM(tiny_config(recurrence_gate=recurrence_gate, use_hem=not to_fused)).eval()
    target = MMRecForCausalLM(tiny_config(recurrence_gate=recurrence_gate, use_hem=to_fused)).eval()
    converted = convert_hem_state_dict(source.state_dict(), source.config, to_fused=to_fused)
    target.load_state_dict(converted, strict=True)
    ids = torch.randint(0, 60, (2, 35))
    torch.testing.assert_close(target(ids).logits, source(ids).logits, rtol=1e-5, atol=1e-5)
    back = convert_hem_state_dict(converted, source.config, to_fused=not to_fused)
    assert back.keys() == source.state_dict().keys()
    for key, tensor in source.state_dict().items():
        assert torch.equal(back[key], tensor), key


def test_hem_conversion_rejects_wrong_shapes():
    config = tiny_config()
    fused = MMRecForCausalLM(config).state_dict()
    bad = dict(fused)
    bad["model.layers.0.hem.W_fused.weight"] = bad["model.layers.0.hem.W_fused.weight"][:-1]
    with pytest.raises(ValueError, match="W_fused"):
        convert_hem_state_dict(bad, config, to_fused=False)
    split = convert_hem_state_dict(fused, config, to_fused=False)
    bad = dict(split)
    bad["model.layers.1.hem.W_k.bias"] = torch.zeros(config.hidden_size + 1)
    with pytest.raises(ValueError, match="W_k"):
        convert_hem_state_dict(bad, config, to_fused=True)
    missing = {k: t for k, t in split.items() if "layers.0.hem.W_g" not in k}
    with pytest.raises(ValueError):
        convert_hem_state_dict(missing, config, to_fused=True)


@pytest.mark.parametrize("use_hem", [True, False])
def test_hem_slices_initialised_independently(use_hem):
    config = tiny_config(hidden_size=32, pe_dim=8, use_hem=use_hem)
    torch.manual_seed(13)
    hem = MMRecForCausalLM(config).model.layers[0].hem
    d = config.hidden_size
    names = ["q", "k", "v", "z", "g", "p"]
    if use_hem:
        weights = dict(zip(names, hem.W_fused.weight.split([d] * 5 + [8])))
        biases = [hem.W_fused.bias]
    else:
        weights = {n: getattr(hem, f"W_{n}").weight for n in names}
        biases = [getattr(hem, f"W_{n}").bias for n in names]
    for name, weight in weights.items():
        weight = weight.detach()
        bound = math.sqrt(6.0 / (d + weight.shape[0]))  # Xavier of the slice alone
        assert weight.abs().max() <= bound, name
        assert weight.abs().max() > 0.8 * bound, name  # not the (smaller) bound of the whole fused matrix
        assert weight.std() == pytest.approx(bound / math.sqrt(3.0), rel=0.3), name
    for bias in biases:
        assert torch.count_nonzero(bias) == 0
