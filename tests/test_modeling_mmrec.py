"""mm_rec/modeling_mmrec.py: the model as a whole. Exactness (one parallel forward == chunked ==
token by token == left-padded == packed rows, docs/ARCHITECTURE.md section 3), causality,
gradients, the forward's keywords and input checks, gradient checkpointing, torch.export, and
the same on a GPU. generate(), checkpoints and Trainer/PEFT: test_modeling_mmrec_{generate,
checkpoint,trainer}.py."""

import os
import random

import pytest
import torch
import torch.nn.functional as F
from common import SEED_DESIGN, VOCAB, random_ids, randomize_short_conv_
from torch.func import functional_call

from mm_rec import MMRecCache, MMRecConfig, MMRecForCausalLM, is_mmrec_cache

# ---------------------------------------------------------------------------------------
# Exactness: parallel == chunked == token by token == padded == packed
# ---------------------------------------------------------------------------------------

def stream(model, ids, cuts, mask=None):
    """Feed ids in the given chunks, carrying the cache; return the concatenated logits."""
    cache, logits = None, []
    for start, stop in zip(cuts[:-1], cuts[1:]):
        out = model(ids[:, start:stop], attention_mask=None if mask is None else mask[:, start:stop],
                    cache=cache, use_cache=True)
        cache = out.cache
        logits.append(out.logits)
    return torch.cat(logits, 1), cache


def random_cuts(T, rng):
    inner = sorted(rng.sample(range(1, T), k=min(6, T - 1)))
    return [0] + inner + [T]


MODES = [("input", True), ("input", False), ("state", True)]
# The short convolution's settings of the tests' ``conv`` parameter: off, on u (before HEM), on the recurrence's inputs.
CONV = {0: {"short_conv_size": 0}, 4: {"short_conv_size": 4, "short_conv_inputs": "all"},
        "4rec": {"short_conv_size": 4, "short_conv_inputs": "recurrence"}}


@pytest.mark.parametrize("gate,use_hem", MODES)
def test_parallel_equals_chunked_equals_token_by_token(gate, use_hem, tiny_model):
    model = tiny_model(recurrence_gate=gate, use_hem=use_hem)
    T = 41  # crosses 10 blocks and 3 segments (block 4, segment 16)
    ids = torch.randint(2, VOCAB, (3, T))
    with torch.no_grad():
        full = model(ids).logits
        rng = random.Random(1)
        for _ in range(3):
            chunked, _ = stream(model, ids, random_cuts(T, rng))
            assert (chunked - full).abs().max() <= 1e-4
        token_by_token, cache = stream(model, ids, list(range(T + 1)))
    assert (token_by_token - full).abs().max() <= 1e-4
    assert cache.position.tolist() == [T] * 3


@pytest.mark.parametrize("options", [
    {"memory_levels": "slots"}, {"memory_levels": "blocks"}, {"memory_levels": "none"},
    {"memory_levels": "blocks", "memory_block_size": 1}, {"memory_levels": "slots", "memory_block_size": 1},
    SEED_DESIGN, {**SEED_DESIGN, "recurrence_gate": "state"},
    {"output_gate": False}, {"output_gate": False, "recurrence_gate": "state"},
    {"memory_block_size": 1}, {"memory_block_size": 1, "output_gate": True},
    {"ffn_gate": True, "hidden_act": "silu", "pe_dim": 32, "decay_init_max": 0.5, "output_gate": True},
    {"output_gate": True, "gate_memory": True, "memory_block_size": 1},
    {"short_conv_size": 4, "short_conv_inputs": "all"},
    {"short_conv_size": 4, "short_conv_inputs": "all", "output_gate": True, "memory_block_size": 1},
    {"short_conv_size": 4, "short_conv_inputs": "recurrence"},
    {"short_conv_size": 4, "short_conv_inputs": "recurrence", "recurrence_gate": "state"},
    {"short_conv_size": 4, "short_conv_inputs": "recurrence", "output_gate": True, "memory_block_size": 1},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_quality_options_keep_parallel_chunked_and_token_by_token_equal(options, tiny_model):
    """The options of the quality study keep the exactness invariant, left-padded rows included."""
    model = tiny_model(**options)
    T = 41
    ids = torch.randint(2, VOCAB, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :6] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        chunked, _ = stream(model, ids, random_cuts(T, random.Random(2)), mask)
        token_by_token, _ = stream(model, ids, list(range(T + 1)), mask)
    real = mask.bool()
    assert (chunked - full)[real].abs().max() <= 1e-4
    assert (token_by_token - full)[real].abs().max() <= 1e-4


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("T", [1, 6, 13, 16])
def test_fresh_input_within_one_segment_equals_token_by_token_with_the_same_cache(T, block, tiny_model):
    """A fresh input shorter than a segment (16 tokens) lays out only its first T offsets (rounded up
    to whole blocks): its logits, left-padded rows included, and the cache it returns (compared
    tensor by tensor, then continued for a segment and a half) are those of token-by-token feeding."""
    model = tiny_model(memory_block_size=block)
    ids = random_ids((2, T + 24), seed=T)
    mask = torch.ones_like(ids)
    mask[1, :min(3, T - 1)] = 0
    head = slice(0, T)
    with torch.no_grad():
        out = model(ids[:, head], attention_mask=mask[:, head], use_cache=True)
        steps, cache = stream(model, ids[:, head], list(range(T + 1)), mask[:, head])
        real = mask[:, head].bool()
        assert (out.logits - steps)[real].abs().max() <= 1e-4
        for got, want in zip(out.cache.layers, cache.layers):
            for name, tensor in want.tensors().items():
                torch.testing.assert_close(got.tensors()[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
        later = model(ids[:, T:], attention_mask=mask[:, T:], cache=out.cache).logits
        want_later, _ = stream(model, ids, list(range(T + 25)), mask)
    assert (later - want_later[:, T:]).abs().max() <= 1e-4


def test_long_input_over_many_segments_equals_token_by_token(tiny_model):
    """T far beyond memory_segment_length: the parallel forward's segment layout holds 7
    segments, with 6 folds between them."""
    model = tiny_model()
    ids = torch.randint(2, VOCAB, (2, 100))
    with torch.no_grad():
        full = model(ids).logits
        token_by_token, _ = stream(model, ids, list(range(101)))
    assert (token_by_token - full).abs().max() <= 1e-4


@pytest.mark.parametrize("gate,use_hem,conv", [*[(*mode, 0) for mode in MODES], ("input", True, 4),
                                               ("input", True, "4rec")])
def test_left_padded_batch_equals_rows_alone(gate, use_hem, conv, tiny_model):
    model = tiny_model(recurrence_gate=gate, use_hem=use_hem, **CONV[conv])
    lengths = [30, 17, 5]
    T = max(lengths)
    rows = [torch.randint(2, VOCAB, (1, n)) for n in lengths]
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, T - row.shape[1]:] = row
        mask[i, T - row.shape[1]:] = 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        # and padded, streamed token by token with the mask slice of each step
        streamed, cache = stream(model, ids, list(range(T + 1)), mask)
        for i, row in enumerate(rows):
            alone = model(row).logits[0]
            n = row.shape[1]
            assert (batched[i, T - n:] - alone).abs().max() <= 1e-4
            assert (streamed[i, T - n:] - alone).abs().max() <= 1e-4
            assert torch.isfinite(batched[i]).all()
    assert cache.position.tolist() == lengths


@pytest.mark.parametrize("conv", list(CONV))
def test_padding_in_the_middle_of_a_stream_is_skipped(conv, tiny_model):
    """A padded step between two chunks leaves the state untouched."""
    model = tiny_model(**CONV[conv])
    ids = torch.randint(2, VOCAB, (1, 20))
    with torch.no_grad():
        full = model(ids).logits
        _, cache = stream(model, ids[:, :9], [0, 9])
        pad = model(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.zeros(1, 3), cache=cache, use_cache=True)
        rest = model(ids[:, 9:], cache=pad.cache, use_cache=True).logits
    assert (rest - full[:, 9:]).abs().max() <= 1e-4


@pytest.mark.parametrize("gate,conv", [("input", 0), ("state", 0), ("input", 4), ("input", "4rec"), ("state", "4rec")])
def test_packed_rows_equal_documents_run_separately(gate, conv, tiny_model):
    model = tiny_model(recurrence_gate=gate, **CONV[conv])
    docs = [torch.randint(2, VOCAB, (1, n)) for n in (14, 5, 23)]
    packed = torch.cat(docs, 1)
    position_ids = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    with torch.no_grad():
        logits = model(packed, position_ids=position_ids).logits
        start = 0
        for doc in docs:
            alone = model(doc).logits
            n = doc.shape[1]
            assert (logits[:, start:start + n] - alone).abs().max() <= 1e-4
            start += n


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_packed_documents_decoded_token_by_token_equal_parallel(device, tiny_model):
    """Packed documents streamed token by token through the decode step cross segment folds
    and document resets (position_ids back to 0); they must match the parallel forward."""
    model = tiny_model().to(device)
    docs = [torch.randint(2, VOCAB, (2, n), device=device) for n in (27, 4, 15)]
    ids = torch.cat(docs, 1)
    position_ids = torch.cat([torch.arange(d.shape[1], device=device) for d in docs])[None].expand(2, -1)
    with torch.no_grad():
        full = model(ids, position_ids=position_ids).logits
        cache, steps = None, []
        for t in range(ids.shape[1]):
            out = model(ids[:, t:t + 1], position_ids=position_ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-4


def test_bf16_chunked_matches_parallel_and_fp32(tiny_model):
    model = tiny_model().to(torch.bfloat16)
    ids = torch.randint(2, VOCAB, (2, 30))
    with torch.no_grad():
        full = model(ids).logits
        chunked, _ = stream(model, ids, [0, 7, 19, 30])
        fp32 = tiny_model()(ids).logits
    scale = fp32.abs().max()
    # Chunk cuts change only the order of fp32 sums in the state: one bf16 rounding (2^-8) at most.
    assert (chunked.float() - full.float()).abs().max() <= 2 ** -8 * scale
    # The bf16 model against the same weights in fp32: bf16 rounding through 2 layers.
    assert (full.float() - fp32).abs().max() <= 3e-2 * scale


def test_decode_step_reads_only_the_cache(tiny_model):
    """Decoding a token with the cache == the last row of the full forward, though the earlier
    tokens are not passed; and the cache's size does not depend on how many tokens it saw."""
    model = tiny_model()
    ids = torch.randint(2, VOCAB, (1, 50))
    with torch.no_grad():
        short = model(ids[:, :5], use_cache=True).cache
        sizes_short = [t.numel() for layer in short.layers for t in layer.tensors().values()]
        long = model(ids[:, :49], use_cache=True).cache
        sizes_long = [t.numel() for layer in long.layers for t in layer.tensors().values()]
        step = model(ids[:, 49:], cache=long, use_cache=True).logits
        full = model(ids).logits
    assert sizes_short == sizes_long
    assert (step[:, -1] - full[:, -1]).abs().max() <= 1e-4


def test_decode_with_the_exporters_full_length_mask(tiny_model):
    """Exporters pass attention_mask [B, past + T] on every decode step, with left padding."""
    model = tiny_model()
    ids = random_ids((2, 19))
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        out = model(ids[:, :10], attention_mask=mask[:, :10], use_cache=True)
        steps = [out.logits]
        for t in range(10, 19):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], use_cache=True, cache=out.cache)
            steps.append(out.logits)
    real = mask.bool()
    assert (torch.cat(steps, 1)[real] - full[real]).abs().max() <= 1e-4


def test_chunked_forward_equals_one_pass(tiny_model):
    """Logits (all, last k, chosen positions), hidden states and the cache of a chunked forward
    equal those of one pass, continuing a cache and with left padding."""
    chunked, whole = tiny_model(inference_chunk_size=7), tiny_model(inference_chunk_size=None)
    torch.manual_seed(5)
    ids, mask = torch.randint(2, VOCAB, (2, 40)), torch.ones(2, 40, dtype=torch.long)
    mask[1, :9] = 0
    picks = torch.tensor([33, 2, 17, 2, 39])
    with torch.no_grad():
        start = {name: m(ids[:, :5], use_cache=True).cache for name, m in (("c", chunked), ("w", whole))}
        outs = {}
        for name, m in (("c", chunked), ("w", whole)):
            outs[name] = m(ids[:, 5:], attention_mask=mask, cache=start[name], use_cache=True, output_hidden_states=True)
            outs[name, "last"] = m(ids, attention_mask=mask, logits_to_keep=3).logits
            outs[name, "picks"] = m(ids, attention_mask=mask, logits_to_keep=picks).logits
            outs[name, "next"] = m(ids[:, :1], cache=outs[name].cache, use_cache=True).logits
    c, w = outs["c"], outs["w"]
    assert (c.logits - w.logits).abs().max() <= 1e-4
    assert len(c.hidden_states) == len(w.hidden_states) == 3
    assert all((a - b).abs().max() <= 1e-4 for a, b in zip(c.hidden_states, w.hidden_states))
    assert torch.equal(c.cache.position, w.cache.position)
    for key in ("last", "picks", "next"):
        assert outs["c", key].shape == outs["w", key].shape
        assert (outs["c", key] - outs["w", key]).abs().max() <= 1e-4
    assert (outs["w", "picks"] - whole(ids, attention_mask=mask).logits[:, picks]).abs().max() <= 1e-4

# ---------------------------------------------------------------------------------------
# The cache keyword: `cache`, or `past_key_values` where transformers passes it
# ---------------------------------------------------------------------------------------

def test_cache_accepted_under_both_names(tiny_model):
    """``cache=`` is the public keyword; ``past_key_values=`` (what generate() passes on
    transformers < 5.24) continues the stream the same; both at once must be one cache."""
    model = tiny_model()
    ids = torch.randint(2, VOCAB, (1, 12))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :5], use_cache=True).cache
        via_past = model(ids[:, 5:], past_key_values=first, use_cache=True).logits
        second = model(ids[:, :5], use_cache=True).cache
        via_cache = model(ids[:, 5:], cache=second, use_cache=True).logits
        third = model(ids[:, :5], use_cache=True).cache
        via_both = model(ids[:, 5:], cache=third, past_key_values=third, use_cache=True).logits
        with pytest.raises(ValueError, match="not both"):
            model(ids[:, 5:], cache=model(ids[:, :5], use_cache=True).cache,
                  past_key_values=model(ids[:, :5], use_cache=True).cache)
    assert (via_past - full[:, 5:]).abs().max() <= 1e-4
    assert (via_cache - full[:, 5:]).abs().max() <= 1e-4
    assert (via_both - full[:, 5:]).abs().max() <= 1e-4


def test_outputs_answer_to_cache(tiny_model):
    """The base model's and the causal LM's outputs (forward and generate) hold the cache as
    ``.cache`` on every transformers version."""
    model = tiny_model()
    ids = random_ids((2, 7), seed=17)
    with torch.no_grad():
        causal = model(ids, use_cache=True)
        base = model.model(ids, use_cache=True)
    generated = model.generate(ids, max_new_tokens=2, do_sample=False, eos_token_id=None, return_dict_in_generate=True)
    for cache in (causal.cache, base.cache, generated.cache):
        assert is_mmrec_cache(cache) and isinstance(cache, MMRecCache)
    assert causal.cache.position.tolist() == base.cache.position.tolist() == [7, 7]
    assert generated.cache.position.tolist() == [8, 8]  # the last generated token is not yet fed
    for a, b in zip(causal.cache.layers, base.cache.layers):
        for name, t in a.tensors().items():
            torch.testing.assert_close(b.tensors()[name], t, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("keyword", ["cache_params", "state", "my_cache"])
def test_a_cache_under_another_keyword_is_refused(keyword, tiny_model):
    model = tiny_model()
    torch.manual_seed(8)
    ids = torch.randint(2, VOCAB, (1, 6))
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
        with pytest.raises(ValueError, match=f"`{keyword}=`.*`cache=`"):
            model(ids, **{keyword: cache})
        with pytest.raises(ValueError, match=f"`{keyword}=`.*`cache=`"):
            model.model(ids, **{keyword: cache})
    with pytest.raises(ValueError, match=f"`{keyword}=`.*`cache=`"):
        model.generate(ids, max_new_tokens=2, **{keyword: cache})


# ---------------------------------------------------------------------------------------
# Causality and gradients
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("recurrence_gate, use_hem, conv", [*[(*mode, 0) for mode in MODES], ("input", True, 4),
                                                            ("input", True, "4rec")])
@pytest.mark.parametrize("left_pad", [0, 5])
def test_future_tokens_never_change_past_logits(recurrence_gate, use_hem, conv, left_pad, tiny_config):
    """left_pad shifts the memory segments against the positions of the input."""
    torch.manual_seed(0)
    model = randomize_short_conv_(MMRecForCausalLM(tiny_config(recurrence_gate=recurrence_gate, use_hem=use_hem,
                                                                **CONV[conv]))).eval()
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


@pytest.mark.parametrize("recurrence_gate, use_hem, conv", [*[(*mode, 0) for mode in MODES], ("input", True, 4),
                                                            ("input", True, "4rec"), ("state", False, "4rec")])
def test_gradients_reach_every_parameter(recurrence_gate, use_hem, conv, tiny_config):
    torch.manual_seed(1)
    model = randomize_short_conv_(MMRecForCausalLM(tiny_config(recurrence_gate=recurrence_gate, use_hem=use_hem,
                                                                **CONV[conv]))).train()
    ids = torch.randint(0, VOCAB, (2, 36))  # crosses two segment boundaries: folds are on the path
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("recurrence_gate", ["input", "state"])
def test_gradcheck_tiny_model(recurrence_gate, tiny_config):
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


def _gradients_and_recomputes(model, ids):
    """Parameter gradients of the LM loss, and how often each block's FFN started (2: recomputed;
    a pre-hook, since a non-reentrant recompute stops once the last saved tensor is back)."""
    calls = [0] * len(model.model.layers)
    hooks = [layer.ffn.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(model.model.layers)]
    model(ids, labels=ids).loss.backward()
    for hook in hooks:
        hook.remove()
    return {name: p.grad for name, p in model.named_parameters()}, calls


ENTRY_POINTS = ["gradient_checkpointing_enable"] + (
    ["activation_checkpointing_enable"] if hasattr(MMRecForCausalLM, "activation_checkpointing_enable") else [])


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("every_n_layers", [1, 2])
def test_gradient_checkpointing_options_give_the_same_gradients(entry, use_reentrant, every_n_layers, tiny_model):
    from transformers.modeling_layers import GradientCheckpointingLayer

    ids = random_ids((2, 37))
    plain, calls = _gradients_and_recomputes(tiny_model(num_hidden_layers=3).train(), ids)
    assert calls == [1, 1, 1]
    model = tiny_model(num_hidden_layers=3).train()
    assert all(isinstance(layer, GradientCheckpointingLayer) for layer in model.model.layers)
    enable = getattr(model, entry)
    kwargs_name = "gradient_checkpointing_kwargs" if entry == "gradient_checkpointing_enable" else \
        "activation_checkpointing_kwargs"
    enable(**{kwargs_name: {"use_reentrant": use_reentrant}, "every_n_layers": every_n_layers})
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [i % every_n_layers == 0 for i in range(3)]
    checkpointed, calls = _gradients_and_recomputes(model, ids)
    assert calls == [2 if i % every_n_layers == 0 else 1 for i in range(3)]
    assert all(g is not None for g in plain.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointing_keeps_the_cache_of_a_training_forward(tiny_model):
    """A training-mode forward asked for a cache returns the same state with checkpointing on."""
    ids = random_ids((2, 21))
    states = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        states.append(model(ids, use_cache=True).cache)
    for plain, checkpointed in zip(states[0].layers, states[1].layers):
        for name, t in plain.tensors().items():
            torch.testing.assert_close(checkpointed.tensors()[name], t, rtol=0, atol=0, msg=name)

# ---------------------------------------------------------------------------------------
# Keywords and input checks
# ---------------------------------------------------------------------------------------

def test_use_cache_is_a_config_field_that_sets_the_forward_default(tmp_path, tiny_model, tiny_config):
    assert MMRecConfig().use_cache is True
    config = tiny_config(use_cache=False)
    config.save_pretrained(tmp_path)
    assert MMRecConfig.from_pretrained(tmp_path).use_cache is False
    with pytest.raises(ValueError, match="use_cache"):
        tiny_config(use_cache="yes")
    ids = random_ids((1, 9))
    model = tiny_model()
    with torch.no_grad():
        assert model.config.use_cache is True
        assert is_mmrec_cache(model(ids).cache)  # evaluation: the config's default
        model.config.use_cache = False
        assert model(ids).cache is None
        assert is_mmrec_cache(model(ids, use_cache=True).cache)
        model.config.use_cache = True
        model.train()
        assert model(ids).cache is None  # training: none unless asked
        assert is_mmrec_cache(model(ids, use_cache=True).cache)


def test_loss_keywords_still_pass_and_labels_need_every_logit(tiny_model):
    model = tiny_model()
    torch.manual_seed(9)
    ids = torch.randint(2, VOCAB, (2, 12))
    with torch.no_grad():
        out = model(ids, labels=ids, num_items_in_batch=torch.tensor(2 * 11))
        logits = model(ids).logits
        reference = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum") / 22
        assert torch.allclose(out.loss, reference, atol=1e-5)
        assert (model(ids, logits_to_keep=3).logits - logits[:, -3:]).abs().max() <= 1e-5
        with pytest.raises(ValueError, match="logits_to_keep"):
            model(ids, labels=ids, logits_to_keep=1)


def test_input_ids_out_of_range(tiny_model):
    model = tiny_model(seed=3)
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([[1, 2, VOCAB]]))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([[1, -1, 2]]))


def test_wrong_shape_mask_and_labels(tiny_model):
    model = tiny_model(seed=3)
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


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.int16, torch.float32])
def test_ids_of_a_non_index_dtype_are_refused(dtype, tiny_model):
    model = tiny_model()
    with pytest.raises(ValueError, match="input_ids must have dtype torch.int64 or torch.int32, got " + str(dtype)):
        model(random_ids((1, 5)).to(dtype))


def test_int32_ids_give_the_int64_logits(tiny_model):
    model = tiny_model()
    ids = random_ids((2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids.int()).logits, model(ids).logits, rtol=0, atol=0)


def test_empty_batch_is_refused(tiny_model):
    model = tiny_model()
    with pytest.raises(ValueError, match="empty batch \\(batch size 0"):
        model(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="empty batch \\(batch size 0"):
        model(inputs_embeds=torch.zeros(0, 5, 32))
    with pytest.raises(ValueError, match="seq_len 0"):
        model(torch.zeros(2, 0, dtype=torch.long))


def test_value_checks_still_run_in_eager_mode(tiny_model):
    model = tiny_model()
    ids = random_ids((1, 6))
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model(ids.masked_fill(ids == ids[0, 0], VOCAB))
    with pytest.raises(ValueError, match="attention_mask must hold only 0"):
        model(ids, attention_mask=torch.full((1, 6), 2))

# ---------------------------------------------------------------------------------------
# inputs_embeds and position_ids: what is valid, and what a padded position holds
# ---------------------------------------------------------------------------------------

def _embeds(model, ids):
    return model.get_input_embeddings()(ids).detach()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("masked", [False, True])
def test_non_finite_inputs_embeds_at_a_real_token_are_refused(value, masked, tiny_model):
    model = tiny_model()
    embeds = _embeds(model, random_ids((2, 7)))
    embeds[1, 4, 3] = value
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # padding elsewhere in the row does not excuse a real token
    with pytest.raises(ValueError, match=r"inputs_embeds must be finite at real tokens.*row 1, column 4"):
        model(inputs_embeds=embeds, attention_mask=mask if masked else None)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
@pytest.mark.parametrize("conv", list(CONV))
def test_padded_positions_of_inputs_embeds_are_never_read(value, conv, tiny_model):
    """Whatever a padded position holds (NaN, inf, a huge value), every real token's logits are
    those of its row alone, without the padding: finite, and unchanged before and after it."""
    model = tiny_model(**CONV[conv])
    ids = random_ids((2, 23))
    mask = torch.ones(2, 23, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, 9:12] = 0  # padding in the middle of a row, after a segment boundary's worth of tokens
    embeds = _embeds(model, ids)
    embeds[mask == 0] = value
    with torch.no_grad():
        logits = model(inputs_embeds=embeds, attention_mask=mask).logits
        for row in range(2):
            real = mask[row].bool()
            alone = model(inputs_embeds=embeds[row, real][None]).logits[0]
            assert torch.isfinite(logits[row, real]).all()
            assert (logits[row, real] - alone).abs().max() <= 1e-4


@pytest.mark.parametrize("start", [1, 5, 10 ** 8])
def test_position_ids_of_a_fresh_stream_start_at_zero(start, tiny_model):
    """Without a cache, a row's first real token is at 0: positions that start later stand for
    tokens the model never saw, and the memory's layout would grow with them (10**8 at once)."""
    model = tiny_model()
    ids = random_ids((2, 6))
    position_ids = torch.arange(6).repeat(2, 1)
    position_ids[1] += start
    with pytest.raises(ValueError, match=rf"position_ids must count.*from 0, as no cache is given; row 1, column 0 "
                                         rf"holds {start}, expected 0 or 0"):
        model(ids, position_ids=position_ids)


@pytest.mark.parametrize("positions, column, expected", [
    ([0, 1, 2, 4, 5], 3, 3),  # a gap
    ([0, 1, 2, 2, 3], 3, 3),  # a repeat
    ([0, 1, -1, 0, 1], 2, 2),  # negative
])
def test_position_ids_count_each_documents_real_tokens(positions, column, expected, tiny_model):
    model = tiny_model()
    with pytest.raises(ValueError, match=rf"row 0, column {column} holds {positions[column]}, expected 0 or {expected}"):
        model(random_ids((1, 5)), position_ids=torch.tensor([positions]))
    with pytest.raises(ValueError, match="position_ids must be an integer tensor"):
        model(random_ids((1, 5)), position_ids=torch.tensor([positions], dtype=torch.float32))


def test_position_ids_with_a_cache_continue_from_its_position(tiny_model):
    """With a cache, a row's first real token continues from cache.position (or starts a
    document at 0); padded positions hold anything."""
    model = tiny_model()
    ids = random_ids((2, 30))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        cache = model(ids[:, :20], attention_mask=mask[:, :20], use_cache=True).cache
        seen = cache.position.clone()
        assert seen.tolist() == [20, 16]
        good = seen[:, None] + torch.arange(10)
        reference = model(ids[:, 20:], cache=cache.detach(), use_cache=True).logits
        torch.testing.assert_close(model(ids[:, 20:], position_ids=good, cache=cache.detach()).logits, reference,
                                   rtol=0, atol=0)
        model(ids[:, 20:], position_ids=torch.arange(10).repeat(2, 1), cache=cache.detach())  # new documents
        with pytest.raises(ValueError, match=r"continuing from the cache's position; row 1, column 0 holds 17, "
                                             r"expected 0 or 16"):
            model(ids[:, 20:], position_ids=good + torch.tensor([[0], [1]]), cache=cache.detach())
        pad_mask = torch.tensor([[1] * 10, [0, 0] + [1] * 8])
        with_padding = torch.stack([good[0], torch.cat([torch.tensor([10 ** 9, -7]), good[1, :8]])])
        torch.testing.assert_close(
            model(ids[:, 20:], attention_mask=pad_mask, position_ids=with_padding, cache=cache.detach()).logits[1, 2:],
            model(ids[:, 20:], attention_mask=pad_mask, cache=cache.detach()).logits[1, 2:], rtol=0, atol=0)


def test_position_ids_counted_from_the_mask_equal_no_position_ids(tiny_model):
    """Positions as transformers derives them for a left-padded batch (cumsum(mask) - 1, padding
    at 1) are valid and give the logits of no position_ids."""
    model = tiny_model()
    ids = random_ids((2, 25))
    mask = torch.ones(2, 25, dtype=torch.long)
    mask[0, :6] = 0
    position_ids = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask, position_ids=position_ids).logits,
                                   model(ids, attention_mask=mask).logits, rtol=0, atol=1e-6)

# ---------------------------------------------------------------------------------------
# torch.export
# ---------------------------------------------------------------------------------------

def _export_and_compare(model, args, kwargs, dynamic_shapes=None, others=()):
    """Export ``model``; its program must give the eager logits on the traced inputs and ``others``."""
    program = torch.export.export(model, args=args, kwargs=kwargs, dynamic_shapes=dynamic_shapes)
    for a, kw in [(args, kwargs), *others]:
        with torch.no_grad():
            torch.testing.assert_close(program.module()(*a, **kw).logits, model(*a, **kw).logits, rtol=1e-5, atol=1e-5)
    return program


def _prefill_static(model):
    ids = random_ids((2, 21))
    mask = torch.ones(2, 21, dtype=torch.long)
    mask[0, :3] = 0
    _export_and_compare(model, (ids,), {"attention_mask": mask, "use_cache": False})


def _prefill_dynamic(model):
    """A length that varies in whole memory segments (the memory's layout has ceil(T / L)
    segments, so that is the dimension a program can keep symbolic), from 3 segments (with
    fewer, a size-1 dimension of the fold's recurrence is specialised), without a mask."""
    segments = torch.export.Dim("segments", min=3, max=16)
    L = model.config.memory_segment_length
    others = [((random_ids((2, 5 * L), seed=1),), {"use_cache": False}),
              ((random_ids((2, 4 * L), seed=2),), {"use_cache": False})]
    _export_and_compare(model, (random_ids((2, 3 * L)),), {"use_cache": False},
                        dynamic_shapes={"input_ids": {1: L * segments}, "use_cache": None}, others=others)


def _decode_step(model):
    """One decode step on a cache, with the exporters' [B, past + 1] mask; the exported cache
    output equals the eager one."""
    ids = random_ids((2, 14))
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    step = random_ids((2, 1), seed=2)
    kwargs = {"attention_mask": torch.ones(2, 15, dtype=torch.long), "use_cache": True, "cache": cache}
    program = torch.export.export(model, args=(step,), kwargs=kwargs)
    with torch.no_grad():
        exported = program.module()(step, **{**kwargs, "cache": cache.detach()})
        eager = model(step, **{**kwargs, "cache": cache.detach()})
    torch.testing.assert_close(exported.logits, eager.logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(exported.cache.layers, eager.cache.layers):
        for name, t in b.tensors().items():
            torch.testing.assert_close(a.tensors()[name], t, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(exported.cache.position, eager.cache.position)


EXPORTS = {"prefill static": _prefill_static, "prefill dynamic seq_len": _prefill_dynamic, "decode step": _decode_step}


@pytest.mark.parametrize("conv", list(CONV))
@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_of_the_model(case, conv, tiny_model):
    """Prefill (static and dynamic length) and a decode step export, and the program gives the
    eager logits (and cache): no host reads of tensor values anywhere in the forward."""
    EXPORTS[case](tiny_model(**CONV[conv]))


@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_of_the_default_architecture(case, tiny_model):
    """The same with MMRecConfig's default blocks of one token (tiny_config pins blocks of 4), whose
    memory attention takes the mask-free path."""
    EXPORTS[case](tiny_model(memory_block_size=1))

# ---------------------------------------------------------------------------------------
# torch.compile, and the one switch of every kernel's backend
# ---------------------------------------------------------------------------------------

def test_traced_code_never_asks_whether_a_cuda_graph_is_being_captured(monkeypatch):
    """While torch.compile traces, the host-side value checks are off without asking CUDA whether a
    graph is being captured: that query returns a Python bool, which breaks a fullgraph trace."""
    import mm_rec.modeling_mmrec as modeling

    def asked():
        raise AssertionError("is_current_stream_capturing was called while tracing")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", asked)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert modeling._eager() is False


def _compiled_matches_eager(model, ids, mask, backend):
    """torch.compile(model, fullgraph=True) (a graph break raises) gives the eager logits, and in a
    training step the eager loss and gradients."""
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                                   rtol=1e-5, atol=1e-5)
    model.train()
    eager = model(ids, attention_mask=mask, labels=ids).loss
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    loss = compiled(ids, attention_mask=mask, labels=ids).loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for (name, _), got, want in zip(model.named_parameters(), grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("block", [4, 1])
def test_compile_fullgraph_with_the_default_kernel_backend(block, tiny_model):
    """The default kernel_backend ("auto") traces whole on CPU: nothing in the forward or the
    backward breaks the graph, with blocks of 4 tokens and the default blocks of one. (aot_eager:
    fullgraph is dynamo's check, whatever compiles the graph after it; the GPU test below runs inductor.)"""
    model = tiny_model(kernel_backend=MMRecConfig().kernel_backend,  # tiny_config pins "torch"; the default is "auto"
                       memory_block_size=block)
    ids = random_ids((2, 21))
    mask = torch.ones(2, 21, dtype=torch.long)
    mask[1, :3] = 0
    _compiled_matches_eager(model, ids, mask, "aot_eager")


@pytest.mark.gpu
@pytest.mark.parametrize("block", [4, 1])
def test_compile_fullgraph_with_the_default_kernel_backend_on_gpu(block, tiny_model):
    model = tiny_model(kernel_backend=MMRecConfig().kernel_backend, memory_block_size=block).cuda()
    ids = random_ids((2, 40)).cuda()
    mask = torch.ones(2, 40, dtype=torch.long, device="cuda")
    mask[1, :3] = 0
    _compiled_matches_eager(model, ids, mask, "inductor")


# Every Triton kernel the model can run, by module: config.kernel_backend must choose for all of them.
TRITON_KERNELS = {"scan_triton": ("scan_fwd", "scan_bwd"),
                  "recurrence_triton": ("recurrence_inputs_fwd", "recurrence_inputs_bwd"),
                  "state_gate_triton": ("state_gate_fwd", "state_gate_bwd"),
                  "memory_triton": ("route_segments_triton", "decode_step_triton"),
                  "conv_triton": ("short_conv_fwd", "short_conv_bwd"),
                  "readout_triton": ("gated_readout",),
                  "swiglu_triton": ("swiglu_forward", "swiglu_backward")}
KERNELS_OF_GATE = {"input": {"scan_fwd", "scan_bwd", "recurrence_inputs_fwd", "recurrence_inputs_bwd",
                             "route_segments_triton", "decode_step_triton", "short_conv_fwd", "short_conv_bwd",
                             "gated_readout", "swiglu_forward", "swiglu_backward"},
                   "state": {"state_gate_fwd", "state_gate_bwd", "scan_fwd", "scan_bwd", "route_segments_triton",
                             "decode_step_triton", "short_conv_fwd", "short_conv_bwd", "gated_readout", "swiglu_forward",
                             "swiglu_backward"}}


def _triton_runs_here() -> bool:
    from mm_rec.scan_triton import AVAILABLE

    return AVAILABLE and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.skipif(not _triton_runs_here(), reason="needs Triton (interpreted on CPU)")
def test_inductor_compiles_the_triton_kernels_whole(tiny_model):
    """inductor (the default torch.compile backend) over the Triton kernels, fullgraph: the code it
    generates checks each opaque op's output shape and strides against the op's fake, so a fake that
    disagrees with its kernel fails here (interpreted on CPU) as it failed on the GPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model(kernel_backend="triton", memory_block_size=1).to(device)
    ids = random_ids((2, 40)).to(device)  # three segments of 16: the routing op runs
    mask = torch.ones(2, 40, dtype=torch.long, device=device)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not _triton_runs_here(), reason="needs Triton (interpreted on CPU)")
def test_compiled_training_through_the_triton_kernels_matches_eager(tiny_model):
    """Traced, the Triton kernels' library ops give the eager logits, loss and gradients, fullgraph; the gated
    readout's two ops are in the traced forward and backward graphs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(str(gm.graph))
        return make_boxed_func(gm.forward)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model(kernel_backend="triton", memory_block_size=1).to(device)
    assert model.config.gate_memory and model.config.output_gate
    ids = random_ids((2, 40)).to(device)
    mask = torch.ones(2, 40, dtype=torch.long, device=device)
    mask[1, :5] = 0
    _compiled_matches_eager(model, ids, mask, aot_autograd(fw_compiler=keep, bw_compiler=keep))
    assert any("mm_rec.gated_readout.default" in g for g in graphs)
    assert any("mm_rec.gated_readout_backward.default" in g for g in graphs)


@pytest.mark.skipif(not _triton_runs_here(), reason="needs Triton on CUDA or interpreted (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("gate", ["input", "state"])
def test_kernel_backend_switches_every_kernel_of_the_whole_model(gate, tiny_model, monkeypatch):
    """The whole model, forward and backward, once with kernel_backend="torch" and once with
    "triton" (interpreted on CPU): "torch" runs no Triton kernel, "triton" runs every kernel the
    configuration has (the scan, the recurrence's inputs or the state gate's walk, the memory's
    routing and its decode step, the convolution's dense path, which the unpadded row takes, the gated
    readout, SwiGLU's product), and both
    give the same logits, gradients and decoded logits."""
    import importlib

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ran = set()
    for module_name, names in TRITON_KERNELS.items():
        module = importlib.import_module(f"mm_rec.{module_name}")
        for name in names:
            def spy(*args, _kernel=getattr(module, name), _name=name, **kwargs):
                ran.add(_name)
                return _kernel(*args, **kwargs)
            monkeypatch.setattr(module, name, spy)
    ids = random_ids((2, 20)).to(device)  # more than a segment of 16: the memory folds
    mask = torch.ones(2, 20, dtype=torch.long, device=device)
    mask[1, :3] = 0
    results = {}
    for backend in ("torch", "triton"):
        ran.clear()
        model = tiny_model(kernel_backend=backend, recurrence_gate=gate).to(device).train()
        logits = model(ids, attention_mask=mask).logits
        dense = model(ids[:1]).logits  # no padding: the convolution's dense path
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        (loss + F.cross_entropy(dense[0, :-1], ids[0, 1:])).backward()
        with torch.no_grad():  # decoding: the memory's step (one kernel with "triton") over a fold at 16
            cache = model(ids[:, :15], attention_mask=mask[:, :15], use_cache=True).cache
            steps = [model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache).logits for t in range(15, 20)]
        results[backend] = (torch.cat([logits.detach(), dense.detach()]), {n: p.grad for n, p in model.named_parameters()},
                            set(ran), torch.cat(steps, 1))
    assert results["torch"][2] == set()
    assert results["triton"][2] == KERNELS_OF_GATE[gate]
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results["triton"][3], results["torch"][3], rtol=1e-4, atol=1e-5)
    for name, grad in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)

# ---------------------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------------------

GPU_SIZES = dict(vocab_size=512, hidden_size=256, num_attention_heads=4, memory_block_size=16,
                 memory_segment_length=128, num_memory_slots=8)
# MMRecConfig's defaults at this size (blocks of one token, the convolution of the recurrence's inputs, ...);
# the design before them (blocks of 16 here); the default without the convolution; the convolution of every input.
GPU_DEFAULT = dict(memory_block_size=1)
GPU_SEED = dict(SEED_DESIGN, pe_dim=64)
GPU_NO_CONV = dict(GPU_DEFAULT, short_conv_size=0)
GPU_CONV_ALL = dict(GPU_DEFAULT, short_conv_inputs="all")
GPU_OPTIONS = dict(argvalues=[GPU_DEFAULT, GPU_SEED, GPU_NO_CONV, GPU_CONV_ALL],
                   ids=["defaults", "seed-design", "no-conv", "conv-all"])


def gpu_model(tiny_config, backend, dtype, seed=0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(kernel_backend=backend, **{**GPU_SIZES, **overrides})
    return randomize_short_conv_(MMRecForCausalLM(config)).to("cuda", dtype).eval()


@pytest.mark.gpu
@pytest.mark.parametrize("overrides", **GPU_OPTIONS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_triton_backend_logits_equal_torch_backend(dtype, tol, overrides, tiny_config):
    ids = torch.randint(0, 512, (4, 600), device="cuda")
    with torch.no_grad():
        triton_logits = gpu_model(tiny_config, "triton", dtype, **overrides)(ids).logits
        torch_logits = gpu_model(tiny_config, "torch", dtype, **overrides)(ids).logits
    scale = torch_logits.abs().max()
    assert (triton_logits - torch_logits).abs().max() <= tol * max(1.0, scale.item())


@pytest.mark.gpu
@pytest.mark.parametrize("overrides", **GPU_OPTIONS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_exactness_on_gpu_chunked_and_token_by_token(dtype, tol, overrides, tiny_config):
    model = gpu_model(tiny_config, "triton", dtype, **overrides)
    ids = torch.randint(0, 512, (2, 300), device="cuda")
    cuts = [0, 100, 101, 257] + list(range(258, 301))  # chunks, then token by token
    with torch.no_grad():
        full = model(ids).logits
        cache, parts = None, []
        for a, b in zip(cuts[:-1], cuts[1:]):
            out = model(ids[:, a:b], cache=cache, use_cache=True)
            cache = out.cache
            parts.append(out.logits)
        chunked = torch.cat(parts, 1)
    scale = max(1.0, full.abs().max().item())
    assert (chunked - full).abs().max() <= tol * scale


@pytest.mark.gpu
def test_compiled_training_step_matches_eager(tiny_config):
    model = gpu_model(tiny_config, "triton", torch.float32).train()
    ids = torch.randint(0, 512, (2, 256), device="cuda")
    eager_loss = model(ids, labels=ids).loss
    eager_grads = torch.autograd.grad(eager_loss, [p for p in model.parameters()], allow_unused=True)
    compiled = torch.compile(model)
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert abs(loss.item() - eager_loss.item()) <= 1e-3 * abs(eager_loss.item())
    for p, g in zip(model.parameters(), eager_grads):
        if g is not None:
            assert torch.allclose(p.grad, g, atol=1e-3, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("overrides", **GPU_OPTIONS)
def test_bf16_training_step_long_sequence_is_finite(overrides, tiny_config):
    model = gpu_model(tiny_config, "triton", torch.bfloat16, **overrides).train()
    ids = torch.randint(0, 512, (2, 4096), device="cuda")
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_padded_positions_read_the_same_from_input_ids_and_inputs_embeds(tiny_model):
    """A padded position holds zeros whichever way the embeddings come in, so every position's
    hidden state, padded ones included, is the same from input_ids and from their embeddings."""
    model = tiny_model().model
    ids = random_ids((2, 13))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[0, :3], mask[1, 6:8] = 0, 0
    with torch.no_grad():
        from_ids = model(input_ids=ids, attention_mask=mask).last_hidden_state
        from_embeds = model(inputs_embeds=model.embed_tokens(ids), attention_mask=mask).last_hidden_state
    assert torch.equal(from_ids, from_embeds)
