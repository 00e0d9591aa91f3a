"""The whole model: causality, gradients, config validation, input checks, the HF loss."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from mm_rec import MMRecConfig, MMRecForCausalLM

VOCAB = 60


def tiny_config(**overrides):
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, memory_block_size=4,
        memory_segment_length=16, num_memory_slots=3, scan_backend="torch",
    )
    kwargs.update(overrides)
    return MMRecConfig(**kwargs)


MODES = [("input", True), ("input", False), ("state", True), ("state", False)]


# ---------------------------------------------------------------------------------------
# 6. Causality
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("recurrence_gate, use_hem", MODES)
@pytest.mark.parametrize("left_pad", [0, 5])
def test_future_tokens_never_change_past_logits(recurrence_gate, use_hem, left_pad):
    """left_pad shifts the memory segments against the positions of the input."""
    torch.manual_seed(0)
    model = MMRecForCausalLM(tiny_config(recurrence_gate=recurrence_gate, use_hem=use_hem)).eval()
    T = 40  # 10 blocks, 3 memory segments (two folds)
    cut_points = [0, 3, 4, 7, 12, 15, 16, 17, 25, 31, 32, 38]  # block and segment boundaries on both sides
    base = torch.randint(0, VOCAB, (T,))
    rows = [base]
    for t in cut_points:  # row i + 1: tokens after cut_points[i] replaced
        changed = base.clone()
        changed[t + 1:] = (base[t + 1:] + torch.randint(1, VOCAB, (T - t - 1,))) % VOCAB
        rows.append(changed)
    ids = F.pad(torch.stack(rows), (left_pad, 0))
    mask = F.pad(torch.ones_like(ids[:, left_pad:]), (left_pad, 0))
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits[:, left_pad:]
    for i, t in enumerate(cut_points, start=1):
        torch.testing.assert_close(logits[i, : t + 1], logits[0, : t + 1], rtol=0, atol=1e-6, msg=f"t={t}")
        assert not torch.allclose(logits[i, t + 1], logits[0, t + 1])  # the change is visible right after t


# ---------------------------------------------------------------------------------------
# 8. Gradients
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("recurrence_gate, use_hem", MODES)
def test_gradients_reach_every_parameter(recurrence_gate, use_hem):
    torch.manual_seed(1)
    model = MMRecForCausalLM(tiny_config(recurrence_gate=recurrence_gate, use_hem=use_hem)).train()
    ids = torch.randint(0, VOCAB, (2, 36))  # crosses two segment boundaries: folds are on the path
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("recurrence_gate", ["input", "state"])
def test_gradcheck_tiny_model(recurrence_gate):
    """Autograd (incl. the scan's hand-written backward) against finite differences, with
    respect to the input embeddings, the decay bias b_E (reaches the output only through
    log gamma) and the learned slot values (through the attention and the folds).

    The state and the memory are float32 by design even in a float64 model, so the
    finite differences use eps=1e-3 and a tolerance of 1e-4, fp32's rounding (6e-8) over eps;
    fast_mode checks a random projection u^T J v, which needs only a few forwards."""
    config = tiny_config(recurrence_gate=recurrence_gate, num_hidden_layers=1, memory_segment_length=8)
    torch.manual_seed(2)
    model = MMRecForCausalLM(config).double().eval()
    with torch.no_grad():  # every path O(1) (init scales some down), decays spread over (0, 1)
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        model.model.layers[0].mdi.W_E.bias.normal_(0.0, 2.0)
    embeds = torch.randn(1, 11, config.hidden_size, dtype=torch.float64, requires_grad=True)  # 2 folds, 3 blocks
    names = ["layers.0.mdi.W_E.bias", "layers.0.memory.slot_values"]
    params = [model.model.get_parameter(n).detach().clone().requires_grad_() for n in names]

    def hidden(e, *values):
        out = functional_call(model.model, dict(zip(names, values)), kwargs=dict(inputs_embeds=e, use_cache=False))
        return out.last_hidden_state

    assert torch.autograd.gradcheck(hidden, (embeds, *params), eps=1e-3, atol=1e-4, rtol=1e-4, fast_mode=True)


# ---------------------------------------------------------------------------------------
# 9. Config validation, input validation, the loss
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, named", [
    ("hidden_size", 18, "hidden_size"),  # not divisible by 4 heads
    ("memory_segment_length", 18, "memory_segment_length"),  # not a multiple of the block size 4
    ("recurrence_gate", "gru", "recurrence_gate"),
    ("scan_backend", "cuda", "scan_backend"),
    ("vocab_size", 0, "vocab_size"),
    ("hidden_size", 0, "hidden_size"),
    ("num_hidden_layers", 0, "num_hidden_layers"),
    ("num_attention_heads", -4, "num_attention_heads"),
    ("intermediate_size", 0, "intermediate_size"),
    ("pe_dim", 0, "pe_dim"),
    ("memory_block_size", 0, "memory_block_size"),
    ("memory_segment_length", -16, "memory_segment_length"),
    ("num_memory_slots", 0, "num_memory_slots"),
    ("memory_decay", 0.0, "memory_decay"),
    ("memory_decay", 1.0, "memory_decay"),
    ("memory_decay", 1.5, "memory_decay"),
    ("dropout", -0.1, "dropout"),
    ("dropout", 1.0, "dropout"),
])
def test_config_rejects_bad_values(field, value, named):
    with pytest.raises(ValueError, match=named):
        tiny_config(**{field: value})


def test_config_seed_aliases_and_round_trip(tmp_path):
    config = MMRecConfig(vocab_size=VOCAB, num_hidden_layers=2, memory_block_size=4, memory_segment_length=16,
                         num_memory_slots=3, model_dim=24, num_heads=3, ffn_dim=40, recurrence_gate="state",
                         use_hem=False, memory_decay=0.9, pe_dim=5)
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (24, 3, 40)
    with pytest.raises(ValueError, match="model_dim"):
        MMRecConfig(hidden_size=32, model_dim=24)
    for seed_name in ("model_dim", "num_heads", "ffn_dim"):
        assert seed_name not in config.to_dict()
    config.save_pretrained(tmp_path)
    loaded = MMRecConfig.from_pretrained(tmp_path)
    assert loaded.model_type == "mmrec"
    fields = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "pe_dim", "hidden_act", "rms_norm_eps", "memory_block_size", "memory_segment_length",
              "num_memory_slots", "memory_decay", "recurrence_gate", "use_hem", "scan_backend", "dropout",
              "initializer_range", "tie_word_embeddings"]
    for field in fields:
        assert getattr(loaded, field) == getattr(config, field), field


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return MMRecForCausalLM(tiny_config()).eval()


def test_input_ids_out_of_range(model):
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([[1, 2, VOCAB]]))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([[1, -1, 2]]))


def test_wrong_shape_mask_and_labels(model):
    ids = torch.randint(0, VOCAB, (2, 9))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(3, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.full((2, 9), 2))
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=torch.zeros(9, dtype=torch.long))


def test_loss_is_shifted_cross_entropy_ignoring_minus_100(model):
    ids = torch.randint(0, VOCAB, (2, 13))
    labels = ids.clone()
    labels[0, 5] = labels[1, :3] = labels[1, 12] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, VOCAB).double()
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100
    manual = -logits[keep].log_softmax(-1).gather(1, targets[keep, None]).mean()
    torch.testing.assert_close(out.loss.double(), manual, rtol=1e-5, atol=1e-6)
    # An independent check that the shift is by exactly one token: labels = ids predicts ids[t + 1].
    unshifted = F.cross_entropy(out.logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    assert not torch.isclose(out.loss, unshifted)
