"""mm_rec/recurrence.py: MDI's decay generator and its init, and ``recurrence`` (both gate modes)
against tests/naive.py's float64 per-token loop, with padding, holes, resets and decays at
the clamps."""

import math

import pytest
import torch
from common import random_ids
from naive import naive_decay, naive_log_gamma, naive_recurrence

from mm_rec import MMRecForCausalLM
from mm_rec.recurrence import LOG_GAMMA_MAX, LOG_GAMMA_MIN, MDIDecay, recurrence
from mm_rec.state_gate import StateGate

# ---------------------------------------------------------------------------------------
# The MDI decay
# ---------------------------------------------------------------------------------------

def test_mdi_decay_formula(tiny_config):
    torch.manual_seed(5)
    decay = MDIDecay(tiny_config(pe_dim=6, hidden_size=20))
    p = 3.0 * torch.randn(2, 9, 6)
    expected = naive_decay(p, decay.W_E.weight, decay.W_E.bias)
    out = decay(p)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_mdi_decay_clamps_at_extreme_inputs(tiny_config):
    decay = MDIDecay(tiny_config(pe_dim=4, hidden_size=6))
    with torch.no_grad():
        decay.W_E.weight.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])[:, None].expand(6, 4))
        decay.W_E.bias.zero_()
    out = decay(torch.full((1, 3, 4), 1e4))  # a = +-4e4 per channel
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[..., 0::2], torch.full_like(out[..., 0::2], math.log1p(-1e-6)), rtol=1e-6, atol=0)
    torch.testing.assert_close(out[..., 1::2], torch.full_like(out[..., 1::2], math.log(1e-6)), rtol=1e-6, atol=0)
    assert LOG_GAMMA_MIN == pytest.approx(math.log(1e-6)) and LOG_GAMMA_MAX == pytest.approx(math.log1p(-1e-6))
    assert (-torch.expm1(out) > 0).all()  # the input weight 1 - gamma never vanishes


@pytest.mark.parametrize("span", [(1e-3, 0.5), (1e-3, 1e-1)], ids=["default", "slow"])
def test_decay_init_is_log_uniform_over_timescales(span, tiny_config):
    """1 - gamma at init spans [decay_init_min, decay_init_max] log-uniformly (default 1e-3 .. 0.5)."""
    torch.manual_seed(14)
    lo, hi = span
    overrides = {} if span == (1e-3, 0.5) else dict(decay_init_min=lo, decay_init_max=hi)
    model = MMRecForCausalLM(tiny_config(hidden_size=32, **overrides))
    expected = torch.linspace(math.log(lo), math.log(hi), 32, dtype=torch.float64)
    for layer in model.model.layers:
        rate = torch.sigmoid(-layer.mdi.W_E.bias.double())  # 1 - sigmoid(b_E)
        torch.testing.assert_close(rate.log().sort().values, expected, rtol=0, atol=1e-5)
        xavier = math.sqrt(6.0 / sum(layer.mdi.W_E.weight.shape))
        assert layer.mdi.W_E.weight.abs().max() < 0.5 * xavier  # W_E small
    # Consequence: a fresh model's decays stay near the init range at every token.
    seen = []
    for layer in model.model.layers:  # W_E's output is the decay logit a: 1 - gamma = sigmoid(-a)
        layer.mdi.W_E.register_forward_hook(lambda mod, inp, out: seen.append(torch.sigmoid(-out.double())))
    model(random_ids((2, 20), seed=14))
    rates = torch.cat([s.flatten() for s in seen])
    assert rates.min() > 0.5 * lo and rates.max() < min(2 * hi, 1.0)


# ---------------------------------------------------------------------------------------
# The gate and the level-0 recurrence
# ---------------------------------------------------------------------------------------

def recurrence_case(seed, B=3, T=40, d=12):
    """z, gate logits g~, decay logits a (log gamma = logsigmoid(a) spread over (0, 1)), and rows
    with left padding, a hole (padding in the middle) and resets; h0."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, d, generator=g)
    gate_logits = torch.randn(B, T, d, generator=g)
    decay_logits = 1.0 + 2.0 * torch.randn(B, T, d, generator=g)
    real = torch.ones(B, T, dtype=torch.bool)
    real[1, :5] = False  # left padding
    real[2, 17:19] = False  # a hole (a pad in the middle): the state must pass through
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[0, 0] = reset[0, 11] = reset[2, 30] = True
    h0 = torch.randn(B, d, generator=g)
    return z, gate_logits, decay_logits, real, reset, h0


def random_state_gate(d, seed):
    g = torch.Generator().manual_seed(seed)
    gate = StateGate(d)
    with torch.no_grad():
        gate.W_g.weight.copy_(torch.randn(d, d, generator=g))
        gate.W_g.bias.copy_(torch.randn(d, generator=g))
    return gate


@pytest.mark.parametrize("mode", ["input", "state"])
def test_recurrence_matches_naive_loop(mode):
    """``recurrence`` from the decay logits: padding passes the state through; a reset keeps
    the token's own (1 - gamma) g z (the gate reads h_(t-1) = 0 in the "state" mode)."""
    z, gate_logits, decay_logits, real, reset, h0 = recurrence_case(6)
    log_gamma = naive_log_gamma(decay_logits)
    if mode == "input":
        h, h_T = recurrence(z, gate_logits, decay_logits, real, reset, h0, backend="torch")
        h_ref, h_T_ref = naive_recurrence(z, log_gamma, real, reset, h0, gate_logits=gate_logits)
        gate_at_reset = torch.sigmoid(gate_logits[0, 11])
    else:
        gate = random_state_gate(12, seed=7)
        h, h_T = recurrence(z, None, decay_logits, real, reset, h0, state_gate=gate, backend="torch")
        h_ref, h_T_ref = naive_recurrence(z, log_gamma, real, reset, h0, state_gate=(gate.W_g.weight, gate.W_g.bias))
        gate_at_reset = torch.sigmoid(gate.W_g.bias.detach())
    assert h.dtype == h_T.dtype == torch.float32
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_T.double(), h_T_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h[1, 4], h0[1])
    torch.testing.assert_close(h[2, 18], h[2, 16])
    rate = -torch.expm1(log_gamma[0, 11].float())
    torch.testing.assert_close(h[0, 11], rate * gate_at_reset * z[0, 11])


def test_state_gate_matches_naive_loop():
    """StateGate alone, on log-decays (0 at padding), as ``recurrence`` calls it."""
    z, _, decay_logits, real, reset, h0 = recurrence_case(7)
    log_gamma = naive_log_gamma(decay_logits).float().masked_fill(~real[..., None], 0.0)
    torch.manual_seed(7)
    gate = StateGate(12)
    torch.nn.init.normal_(gate.W_g.weight)
    torch.nn.init.normal_(gate.W_g.bias)
    h, h_T = gate(z, log_gamma, reset, h0)
    h_ref, h_T_ref = naive_recurrence(z, log_gamma, real, reset, h0, state_gate=(gate.W_g.weight, gate.W_g.bias))
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_T.double(), h_T_ref, rtol=1e-5, atol=1e-6)
    gate_at_reset = torch.sigmoid(gate.W_g.bias)  # the gate reads h_{t-1} = 0 at a document start
    torch.testing.assert_close(h[0, 11], -torch.expm1(log_gamma[0, 11]) * gate_at_reset * z[0, 11])


@pytest.mark.parametrize("resets", [False, True])
def test_state_gate_gradients_match_the_naive_loop(resets):
    """StateGate's written-out backward against autograd through the float64 per-token loop: the
    gradients of z, log gamma, W_g, b_g and h0, with and without document starts."""
    z, _, decay_logits, real, reset, h0 = recurrence_case(8)
    if not resets:
        reset = torch.zeros_like(reset)
    log_gamma = naive_log_gamma(decay_logits).float().masked_fill(~real[..., None], 0.0)
    torch.manual_seed(8)
    gate = StateGate(12)
    torch.nn.init.normal_(gate.W_g.weight, std=0.5)
    torch.nn.init.normal_(gate.W_g.bias)
    inputs = [t.detach().clone().requires_grad_() for t in (z, log_gamma, h0)]
    weights = [gate.W_g.weight, gate.W_g.bias]
    probe = torch.randn(*z.shape[:2], 12)  # a random linear read-out of every h_t and of h_T
    h, h_T = gate(*inputs[:2], reset, inputs[2])
    ((h * probe).sum() + h_T.sum()).backward()
    got = [t.grad.double() for t in inputs + weights]

    ref_inputs = [t.detach().double().requires_grad_() for t in inputs + weights]
    h_ref, h_T_ref = naive_recurrence(ref_inputs[0], ref_inputs[1], real, reset, ref_inputs[2],
                                      state_gate=(ref_inputs[3], ref_inputs[4]))
    ((h_ref * probe.double()).sum() + h_T_ref.sum()).backward()
    # log gamma is 0 at padding by contract (``recurrence`` masks it there, which also drops its gradient)
    want = [t.grad for t in ref_inputs]
    got[1], want[1] = got[1][real], want[1][real]
    for name, g, w in zip(["z", "log_gamma", "h0", "W_g", "b_g"], got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("mode", ["input", "state"])
def test_recurrence_near_unit_decay_keeps_fp32_precision(mode):
    """Decays within 1e-6 of 1 (the clamp log1p(-1e-6)) up to 1 - 1e-5, and past both clamps:
    the input weight 1 - gamma must be -expm1(log gamma). 1 - exp(log gamma) in fp32 is off by
    up to half an ulp of 1 (6e-8), i.e. 3e-2 relative at 1 - gamma = 1e-6. The reference is the
    float64 loop on the log-decays of the same fp32 decay logits."""
    g = torch.Generator().manual_seed(23)
    B, T, d = 2, 48, 24
    z = torch.randn(B, T, d, generator=g)
    gate_logits = torch.randn(B, T, d, generator=g)
    rate = 1e-6 * 10.0 ** torch.rand(B, T, d, generator=g, dtype=torch.float64)  # 1 - gamma in [1e-6, 1e-5]
    decay_logits = (torch.log1p(-rate) - torch.log(rate)).float()  # sigmoid(a) = 1 - rate
    decay_logits[..., :4] = 20.0  # past the upper clamp: log gamma = LOG_GAMMA_MAX
    decay_logits[..., 4:6] = -20.0  # past the lower clamp: LOG_GAMMA_MIN
    log_gamma = naive_log_gamma(decay_logits)
    assert log_gamma[..., :4].eq(LOG_GAMMA_MAX).all() and log_gamma[..., 4:6].eq(LOG_GAMMA_MIN).all()
    real = torch.ones(B, T, dtype=torch.bool)
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[1, 20] = True
    h0 = None  # h is then ~1e-5 in size and all of it comes through the input weight
    if mode == "input":
        h, h_T = recurrence(z, gate_logits, decay_logits, real, reset, h0, backend="torch")
        h_ref, h_T_ref = naive_recurrence(z, log_gamma, None, reset, h0, gate_logits=gate_logits)
    else:
        gate = random_state_gate(d, seed=24)
        h, h_T = recurrence(z, None, decay_logits, real, reset, h0, state_gate=gate, backend="torch")
        h_ref, h_T_ref = naive_recurrence(z, log_gamma, None, reset, h0, state_gate=(gate.W_g.weight, gate.W_g.bias))
    rel = ((h.double() - h_ref).norm(dim=1) / h_ref.norm(dim=1)).max().item()  # per row and channel
    assert rel < 1e-5, rel
    torch.testing.assert_close(h_T.double(), h_T_ref, rtol=1e-5, atol=0)
