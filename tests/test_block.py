"""mm_rec/block.py: one MM-Rec block against tests/naive.py's float64 block (docs/ARCHITECTURE.md
section 1), in both gate modes, fused or not, on plain, left-padded and packed rows; dropout on
the residual branches, never on the residual stream."""

import pytest
import torch
from common import SEED_DESIGN, document_positions, random_ids
from naive import naive_block
from torch import nn

from mm_rec import MMRecForCausalLM
from mm_rec.positions import token_layout

OPTIONS = [  # the quality study's options (docs/ARCHITECTURE.md sections 1 and 2), one or two at a time
    {"memory_levels": "slots"}, {"memory_levels": "blocks"}, {"memory_levels": "none"},
    SEED_DESIGN, {**SEED_DESIGN, "use_hem": False},
    {"output_gate": False}, {"output_gate": True, "use_hem": False},
    {"output_gate": True, "recurrence_gate": "state", "memory_levels": "blocks"},
    {"ffn_gate": True, "hidden_act": "silu"}, {"ffn_gate": True, "memory_block_size": 1},
    {"pe_dim": 32, "decay_init_max": 0.5},
    {"output_gate": True, "gate_memory": True}, {"output_gate": True, "gate_memory": True, "memory_block_size": 1},
    {"short_conv_size": 4, "short_conv_inputs": "all"},
    {"short_conv_size": 4, "short_conv_inputs": "all", "output_gate": True, "memory_block_size": 1},
    *({"short_conv_size": 4, "short_conv_inputs": "recurrence", **extra} for extra in (
        {}, {"recurrence_gate": "state"}, {"output_gate": True, "memory_block_size": 1},
        {"output_gate": True, "gate_memory": True, "pe_dim": 12})),
]
CONV_OPTIONS = [{"short_conv_size": 4, "short_conv_inputs": "all"},
                {"short_conv_size": 2, "short_conv_inputs": "all", "recurrence_gate": "state", "use_hem": False},
                {"short_conv_size": 4, "short_conv_inputs": "recurrence", "output_gate": True},
                {"short_conv_size": 3, "short_conv_inputs": "recurrence", "recurrence_gate": "state", "use_hem": False}]


@pytest.mark.parametrize("recurrence_gate", ["input", "state"])
@pytest.mark.parametrize("use_hem", [True, False])
@pytest.mark.parametrize("rows", ["plain", "left_padded", "packed"])
def test_block_matches_naive_reference(recurrence_gate, use_hem, rows, tiny_config):
    check_block_against_naive(tiny_config(recurrence_gate=recurrence_gate, use_hem=use_hem, memory_decay=0.8), rows)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("rows", ["left_padded", "packed"])
def test_block_options_match_naive_reference(options, rows, tiny_config):
    check_block_against_naive(tiny_config(memory_decay=0.8, **options), rows)


@pytest.mark.parametrize("options", CONV_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("rows", ["plain", "holes", "packed_holes"])
def test_block_with_short_conv_matches_naive_reference(options, rows, tiny_config):
    """The convolution's window skips padding anywhere in a row and stops at a document start."""
    check_block_against_naive(tiny_config(memory_decay=0.8, **options), rows)


def check_block_against_naive(config, rows):
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
    if rows in ("packed", "packed_holes"):
        position_ids = torch.cat([torch.arange(21), torch.arange(3), torch.arange(16)])[None].repeat(B, 1)
        position_ids[1] = torch.cat([torch.arange(5), torch.arange(35)])
    if rows in ("holes", "packed_holes"):  # padding inside rows; positions count the real tokens
        mask[0, [2, 3, 10, 22, 39]] = 0
        mask[1, [0, 6, 7, 8, 30]] = 0
        if position_ids is not None:
            position_ids = document_positions(position_ids == 0, mask)
    layout = token_layout(mask, position_ids, torch.zeros(B, dtype=torch.long))
    seen = []
    block.readout_norm.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    y, _ = block(x, layout)
    h_ref, y_ref = naive_block(block, config, x, mask, position_ids)
    real = mask.bool()
    torch.testing.assert_close(seen[0].double()[real], h_ref[real], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y.double()[real], y_ref[real], rtol=1e-4, atol=1e-4)


def test_fresh_state_is_the_state_before_any_token(tiny_config):
    """block.fresh_state(B): h = 0 and the memory's fresh state (no open or completed block, the
    learned slots); a forward given it equals a forward given no state, outputs and state."""
    config = tiny_config()
    torch.manual_seed(25)
    block = MMRecForCausalLM(config).model.layers[1]
    B = 2
    state = block.fresh_state(B)
    assert torch.equal(state.h, torch.zeros(B, config.hidden_size))
    memory = state.memory
    for name in ("open_key_sum", "open_value_sum", "open_count", "block_keys", "block_values", "block_count"):
        assert not memory.tensors()[name].any(), name
    assert torch.equal(memory.slot_keys, block.memory.slot_keys.detach().expand(B, -1, -1))
    assert torch.equal(memory.slot_values, block.memory.slot_values.detach().expand(B, -1, -1))
    x = torch.randn(B, 21, config.hidden_size)
    layout = token_layout(torch.ones(B, 21), None, torch.zeros(B, dtype=torch.long))
    with torch.no_grad():
        y_given, after_given = block(x, layout, state)
        y_none, after_none = block(x, layout)
    torch.testing.assert_close(y_given, y_none, rtol=0, atol=0)
    for name, t in after_none.tensors().items():
        torch.testing.assert_close(after_given.tensors()[name], t, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------
# Dropout: on each residual branch, x' = x + Dropout(W_o(r + m)), y = x' + Dropout(FFN(RMSNorm(x')))
# ---------------------------------------------------------------------------------------

class FixedMasks(nn.Module):
    """Stands in for the block's dropout modules: its i-th call multiplies by ``masks[i]``."""

    def __init__(self, masks):
        super().__init__()
        self.masks, self.calls = list(masks), 0

    def forward(self, x):
        self.calls += 1
        return x * self.masks[self.calls - 1].to(x.dtype)


def _dropouts(module):
    return [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Dropout)]


def test_dropout_multiplies_each_branch_with_its_own_mask(tiny_config):
    """Dropout's masks (kept / (1 - p), or 0), drawn here, applied where the block applies dropout:
    the block equals the definition with those masks on the two branches, the residual stream
    passing unscaled."""
    config = tiny_config(dropout=0.5, memory_decay=0.8)
    torch.manual_seed(8)
    block = MMRecForCausalLM(config).model.layers[0].train()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    B, T, d = 2, 21, config.hidden_size
    x = torch.randn(B, T, d)
    masks = [torch.bernoulli(torch.full((B, T, d), 0.5)) / 0.5 for _ in range(2)]
    fixed = FixedMasks(masks)
    names = [name for name, _ in _dropouts(block)]
    assert names, "the block has no dropout module"
    for name in names:
        parent, _, attr = name.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, attr, fixed)
    mask = torch.ones(B, T, dtype=torch.long)
    y, _ = block(x, token_layout(mask, None, torch.zeros(B, dtype=torch.long)))
    assert fixed.calls == 2
    _, y_ref = naive_block(block, config, x, mask, None, dropout_masks=masks)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)


def test_dropout_of_everything_leaves_the_residual_stream(tiny_config):
    """With every dropout at p = 1 in training mode, both branches are dropped: a block maps x to
    x, and the whole model's logits are those of the embeddings under the final norm."""
    config = tiny_config(dropout=0.1)
    torch.manual_seed(3)
    model = MMRecForCausalLM(config).train()
    for _, dropout in _dropouts(model):
        dropout.p = 1.0
    x = torch.randn(2, 21, config.hidden_size)
    y, _ = model.model.layers[0](x, token_layout(torch.ones(2, 21), None, torch.zeros(2, dtype=torch.long)))
    torch.testing.assert_close(y, x, rtol=0, atol=0)
    ids = random_ids((2, 21))
    logits = model(ids).logits
    reference = model.lm_head(model.model.norm(model.model.embed_tokens(ids))).float()
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)
    model.eval()
    assert (model(ids).logits - reference).abs().max() > 1e-3  # in evaluation mode the branches are back
