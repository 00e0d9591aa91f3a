"""MMRecPreTrainedModel._init_weights against its definition (docs/ARCHITECTURE.md section 1,
"Initialisation"): each parameter's distribution and scale, checked statistically on a model
large enough that the estimates sit well inside the tolerances (a scale off by 1.4x fails)."""

import math

import pytest
import torch
from common import random_ids

from mm_rec import MMRecForCausalLM

# Wider and deeper than tiny_config, so that each weight matrix holds thousands of draws; an
# initializer_range and decay span other than the defaults, so that the config's values are the ones used.
SIZES = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=256, pe_dim=16,
             vocab_size=512, num_memory_slots=16, initializer_range=0.05, decay_init_min=2e-3, decay_init_max=0.3)
RELATIVE = 0.1  # tolerance on a standard deviation: about 10 standard errors at these sizes


def fresh_model(tiny_config, seed=0, **overrides):
    torch.manual_seed(seed)
    return MMRecForCausalLM(tiny_config(**{**SIZES, **overrides}))


def assert_normal(weight, std, name):
    """Drawn from N(0, std): the sample's std within RELATIVE, its mean near 0, and 68% of the draws
    within one std (a uniform of that std holds 58%)."""
    w = weight.detach().double().flatten()
    n = w.numel()
    assert abs(w.std().item() / std - 1) < RELATIVE, f"{name}: std {w.std().item():.5f}, expected {std:.5f}"
    assert abs(w.mean().item()) < 5 * std / math.sqrt(n), name
    inside = (w.abs() < std).double().mean().item()
    assert abs(inside - 0.6827) < 0.03, f"{name}: {inside:.3f} of the draws within one std, expected 0.683 (normal)"


def assert_uniform(weight, bound, name):
    """Drawn from U(-bound, bound): nothing beyond the bound, the extremes near it, std bound / sqrt(3)."""
    w = weight.detach().double().flatten()
    assert w.abs().max().item() <= bound * (1 + 1e-6), f"{name}: {w.abs().max().item():.5f} beyond the bound {bound:.5f}"
    assert w.abs().max().item() > 0.95 * bound, f"{name}: extremes far inside the bound {bound:.5f}"
    assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < RELATIVE, name


def test_residual_projections_start_scaled_by_one_over_sqrt_2_layers(tiny_config):
    """W_o and the FFN's down projection, in every layer: N(0, initializer_range / sqrt(2 L))."""
    model = fresh_model(tiny_config)
    std = SIZES["initializer_range"] / math.sqrt(2 * SIZES["num_hidden_layers"])
    for i, layer in enumerate(model.model.layers):
        assert_normal(layer.W_o.weight, std, f"layers.{i}.W_o")
        assert_normal(layer.ffn.down.weight, std, f"layers.{i}.ffn.down")


@pytest.mark.parametrize("ffn_gate", [False, True])
def test_embeddings_and_the_ffn_inputs_start_at_initializer_range(ffn_gate, tiny_config):
    model = fresh_model(tiny_config, ffn_gate=ffn_gate)
    std = SIZES["initializer_range"]
    assert_normal(model.model.embed_tokens.weight, std, "embed_tokens")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    for i, layer in enumerate(model.model.layers):
        assert_normal(layer.ffn.up.weight, std, f"layers.{i}.ffn.up")
        if ffn_gate:
            assert_normal(layer.ffn.gate.weight, std, f"layers.{i}.ffn.gate")


@pytest.mark.parametrize("overrides", [{}, {"output_gate": False}, {"use_hem": False, "output_gate": True},
                                       {"recurrence_gate": "state"}], ids=["fused", "no-gate", "separate", "state"])
def test_each_projection_is_xavier_uniform_on_its_own_with_zero_bias(overrides, tiny_config):
    """q, k, v, z, g~ (input gate), o (output gate) of width d and p of width pe_dim: each
    U(+-sqrt(6 / (d + width))), whether stacked in W_fused or separate; biases 0. The state gate's
    W_g is Xavier-uniform too, with bias 0."""
    model = fresh_model(tiny_config, **overrides)
    config = model.config
    d, pe = config.hidden_size, config.pe_dim
    names = ["q", "k", "v", "z"] + (["g"] if config.recurrence_gate == "input" else [])
    names += (["og"] if config.output_gate else []) + ["p"]
    widths = [pe if name == "p" else d for name in names]
    for i, layer in enumerate(model.model.layers):
        if config.use_hem:
            weights = dict(zip(names, layer.hem.W_fused.weight.split(widths)))
            biases = [layer.hem.W_fused.bias]
        else:
            weights = {name: getattr(layer.hem, f"W_{name}").weight for name in names}
            biases = [getattr(layer.hem, f"W_{name}").bias for name in names]
        for name, width in zip(names, widths):
            assert_uniform(weights[name], math.sqrt(6.0 / (d + width)), f"layers.{i}.{name}")
        assert all(torch.equal(b, torch.zeros_like(b)) for b in biases)
        if config.recurrence_gate == "state":
            assert_uniform(layer.state_gate.W_g.weight, math.sqrt(6.0 / (2 * d)), f"layers.{i}.W_g")
            assert torch.equal(layer.state_gate.W_g.bias, torch.zeros(d))


def test_decay_generator_starts_at_the_configured_span_of_memories(tiny_config):
    """1 - sigmoid(b_E) runs log-uniformly from decay_init_min to decay_init_max across the d
    channels; W_E is Xavier-uniform scaled by 0.1."""
    model = fresh_model(tiny_config)
    d, pe = SIZES["hidden_size"], SIZES["pe_dim"]
    rates = torch.logspace(math.log10(SIZES["decay_init_min"]), math.log10(SIZES["decay_init_max"]), d,
                           dtype=torch.float64)
    for i, layer in enumerate(model.model.layers):
        W_E = layer.mdi.W_E
        torch.testing.assert_close(1 - torch.sigmoid(W_E.bias.detach().double()), rates, rtol=1e-5, atol=0,
                                   msg=f"layers.{i}.mdi.W_E.bias")
        assert_uniform(W_E.weight, 0.1 * math.sqrt(6.0 / (pe + d)), f"layers.{i}.mdi.W_E")


def test_slots_norms_and_convolution(tiny_config):
    """The memory's learned slots N(0, 1); every norm's weight 1; the short convolution the identity,
    so a fresh model with it computes what the same weights compute without it."""
    model = fresh_model(tiny_config, short_conv_size=4)
    slots = torch.cat([torch.cat([layer.memory.slot_keys, layer.memory.slot_values]) for layer in model.model.layers])
    assert_normal(slots, 1.0, "memory slots")
    norms = [m.weight for name, m in model.named_modules() if name.endswith("norm") or name.endswith("norm1")
             or name.endswith("norm2")]
    assert len(norms) == 3 * SIZES["num_hidden_layers"] + 1
    assert all(torch.equal(w, torch.ones_like(w)) for w in norms)
    without = fresh_model(tiny_config, seed=1, short_conv_size=0).eval()
    state = {k: v for k, v in model.state_dict().items() if "short_conv" not in k}
    without.load_state_dict(state)
    ids = random_ids((2, 21), vocab_size=SIZES["vocab_size"])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, without(ids).logits, rtol=1e-5, atol=1e-5)
