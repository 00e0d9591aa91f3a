"""generate()'s contract with transformers (README "Use it from Python"): keywords reach forward,
the full sequence plus the returned cache continues exactly, continue_stream takes new tokens
only, foreign cache keywords are refused, and long inputs run in chunks with the same result."""

import pytest
import torch
import torch.nn.functional as F

from mm_rec import MMRecCache
from test_generation import VOCAB, cache_of, left_padded_prompts, tiny_model

GREEDY = dict(do_sample=False, eos_token_id=None)


def test_full_sequence_and_returned_cache_continue_exactly():
    """generate(out.sequences, cache=out.cache) == one uninterrupted generate (tokens and logits),
    left padding included; the returned cache has seen every token of the sequences but the last."""
    model = tiny_model()
    torch.manual_seed(0)
    ids, mask = left_padded_prompts()
    kwargs = dict(return_dict_in_generate=True, output_logits=True, **GREEDY)
    first = model.generate(ids, attention_mask=mask, max_new_tokens=5, use_cache=True, **kwargs)
    cache = first.cache
    full_mask = torch.cat([mask, torch.ones(2, 5, dtype=mask.dtype)], 1)
    assert cache.position.tolist() == (full_mask.sum(1) - 1).tolist()
    second = model.generate(first.sequences, attention_mask=full_mask, max_new_tokens=7, cache=cache, **kwargs)
    uninterrupted = model.generate(ids, attention_mask=mask, max_new_tokens=12, **kwargs)
    assert torch.equal(second.sequences, uninterrupted.sequences)
    assert all((a - b).abs().max() <= 1e-4 for a, b in zip(second.logits, uninterrupted.logits[5:]))


def test_beam_search_continues_from_full_sequence_and_cache():
    """A greedy generate's cache (2 rows) continued by beam search (6 beams): equals beam search
    over the same full sequence without a cache."""
    model = tiny_model()
    torch.manual_seed(1)
    ids, mask = left_padded_prompts()
    first = model.generate(ids, attention_mask=mask, max_new_tokens=4, return_dict_in_generate=True, **GREEDY)
    full_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], 1)
    beams = dict(attention_mask=full_mask, max_new_tokens=6, num_beams=3, num_return_sequences=2, **GREEDY)
    continued = model.generate(first.sequences, cache=first.cache, **beams)
    from_scratch = model.generate(first.sequences, **beams)
    assert torch.equal(continued, from_scratch)


def test_inputs_inconsistent_with_the_cache_are_refused():
    model = tiny_model()
    torch.manual_seed(2)
    history = torch.randint(2, VOCAB, (1, 10))
    with torch.no_grad():
        cache = cache_of(model(history, use_cache=True))
    with pytest.raises(ValueError, match="continue_stream"):  # new tokens only: shorter than what the cache saw
        model.generate(history[:, :4], max_new_tokens=2, cache=cache, **GREEDY)
    with pytest.raises(ValueError, match="already seen 10"):  # nothing unseen: no logits to continue from
        model.generate(history, max_new_tokens=2, cache=cache, **GREEDY)


def test_prefill_lm_head_sees_only_the_last_position():
    model = tiny_model()
    torch.manual_seed(3)
    seen = []
    model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    ids = torch.randint(2, VOCAB, (2, 30))
    model.generate(ids, max_new_tokens=3, **GREEDY)
    assert seen == [(2, 1, 32)] * 3


def test_long_prompt_runs_in_chunks_and_keeps_one_position():
    """With inference_chunk_size=8, a 30-token prompt reaches the layers 8 tokens at a time and the
    head one position at a time; the tokens equal those of the unchunked model."""
    model = tiny_model(inference_chunk_size=8)
    torch.manual_seed(4)
    ids, mask = torch.randint(2, VOCAB, (2, 30)), torch.ones(2, 30, dtype=torch.long)
    mask[0, :5] = 0
    widths, heads = [], []
    model.model.norm.register_forward_hook(lambda mod, inp, out: widths.append(out.shape[1]))
    model.lm_head.register_forward_hook(lambda mod, inp, out: heads.append(inp[0].shape[1]))
    chunked = model.generate(ids, attention_mask=mask, max_new_tokens=6, **GREEDY)
    assert widths[:4] == [8, 8, 8, 6] and set(widths[4:]) == {1}
    assert heads == [1] * 6
    model.config.inference_chunk_size = None
    assert torch.equal(chunked, model.generate(ids, attention_mask=mask, max_new_tokens=6, **GREEDY))


def test_generate_prefill_chunk_size_uses_the_chunked_forward():
    """transformers' prefill_chunk_size option: the prompt reaches the layers 5 tokens at a time,
    the tokens are those of one pass, and the model's own chunk size is restored afterwards."""
    model = tiny_model(inference_chunk_size=None)
    torch.manual_seed(11)
    ids, mask = left_padded_prompts()
    widths = []
    model.model.norm.register_forward_hook(lambda mod, inp, out: widths.append(out.shape[1]))
    chunked = model.generate(ids, attention_mask=mask, max_new_tokens=4, prefill_chunk_size=5, **GREEDY)
    assert widths == [5, 4, 1, 1, 1] and model.config.inference_chunk_size is None
    assert torch.equal(chunked, model.generate(ids, attention_mask=mask, max_new_tokens=4, **GREEDY))


def test_chunked_forward_equals_one_pass():
    """Logits (all, last k, chosen positions), hidden states and the cache of a chunked forward
    equal those of one pass, continuing a cache and with left padding."""
    chunked, whole = tiny_model(inference_chunk_size=7), tiny_model(inference_chunk_size=None)
    torch.manual_seed(5)
    ids, mask = torch.randint(2, VOCAB, (2, 40)), torch.ones(2, 40, dtype=torch.long)
    mask[1, :9] = 0
    picks = torch.tensor([33, 2, 17, 2, 39])
    with torch.no_grad():
        start = {name: cache_of(m(ids[:, :5], use_cache=True)) for name, m in (("c", chunked), ("w", whole))}
        outs = {}
        for name, m in (("c", chunked), ("w", whole)):
            outs[name] = m(ids[:, 5:], attention_mask=mask, cache=start[name], use_cache=True, output_hidden_states=True)
            outs[name, "last"] = m(ids, attention_mask=mask, logits_to_keep=3).logits
            outs[name, "picks"] = m(ids, attention_mask=mask, logits_to_keep=picks).logits
            outs[name, "next"] = m(ids[:, :1], cache=cache_of(outs[name]), use_cache=True).logits
    c, w = outs["c"], outs["w"]
    assert (c.logits - w.logits).abs().max() <= 1e-4
    assert len(c.hidden_states) == len(w.hidden_states) == 3
    assert all((a - b).abs().max() <= 1e-4 for a, b in zip(c.hidden_states, w.hidden_states))
    assert torch.equal(cache_of(c).position, cache_of(w).position)
    for key in ("last", "picks", "next"):
        assert outs["c", key].shape == outs["w", key].shape
        assert (outs["c", key] - outs["w", key]).abs().max() <= 1e-4
    assert (outs["w", "picks"] - whole(ids, attention_mask=mask).logits[:, picks]).abs().max() <= 1e-4


def test_generate_returns_hidden_states():
    model = tiny_model()
    torch.manual_seed(6)
    ids = torch.randint(2, VOCAB, (2, 9))
    out = model.generate(ids, max_new_tokens=4, output_hidden_states=True, return_dict_in_generate=True, **GREEDY)
    assert len(out.hidden_states) == 4
    with torch.no_grad():
        reference = model(out.sequences[:, :-1], output_hidden_states=True).hidden_states
    prefill = out.hidden_states[0]
    assert len(prefill) == 3 and prefill[0].shape == (2, 9, 32)
    for layer, ref in zip(prefill, reference):
        assert (layer - ref[:, :9]).abs().max() <= 1e-4
    for step in range(1, 4):
        for layer, ref in zip(out.hidden_states[step], reference):
            assert layer.shape == (2, 1, 32)
            assert (layer[:, 0] - ref[:, 8 + step]).abs().max() <= 1e-4


def test_position_ids_given_to_generate_reach_forward():
    """A prompt of two packed documents (position_ids restart at 0) continues the second one only."""
    model = tiny_model()
    torch.manual_seed(7)
    first, second = torch.randint(2, VOCAB, (1, 11)), torch.randint(2, VOCAB, (1, 6))
    position_ids = torch.cat([torch.arange(11), torch.arange(6)])[None]
    packed = model.generate(torch.cat([first, second], 1), position_ids=position_ids, max_new_tokens=5, **GREEDY)
    alone = model.generate(second, max_new_tokens=5, **GREEDY)
    assert torch.equal(packed[:, 11:], alone)


@pytest.mark.parametrize("keyword", ["cache_params", "state", "my_cache"])
def test_a_cache_under_another_keyword_is_refused(keyword):
    model = tiny_model()
    torch.manual_seed(8)
    ids = torch.randint(2, VOCAB, (1, 6))
    with torch.no_grad():
        cache = cache_of(model(ids, use_cache=True))
        with pytest.raises(ValueError, match=f"`{keyword}=`.*past_key_values"):
            model(ids, **{keyword: cache})
        with pytest.raises(ValueError, match=f"`{keyword}=`.*past_key_values"):
            model.model(ids, **{keyword: cache})
    with pytest.raises(ValueError, match=f"`{keyword}=`.*past_key_values"):
        model.generate(ids, max_new_tokens=2, **{keyword: cache})


def test_loss_keywords_still_pass_and_labels_need_every_logit():
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


def test_continue_stream_resumes_a_saved_state_exactly(tmp_path):
    """save -> load -> continue_stream(turn) == generate(history + turn) in one go; and the next turn
    continues from the cache continue_stream returns."""
    model = tiny_model()
    torch.manual_seed(10)
    history, turn, turn2 = (torch.randint(2, VOCAB, (2, n)) for n in (15, 4, 3))
    with torch.no_grad():
        cache_of(model(history, use_cache=True)).save(tmp_path / "stream.safetensors")
    resumed = MMRecCache.load(tmp_path / "stream.safetensors", config=model.config)
    kwargs = dict(return_dict_in_generate=True, output_logits=True, **GREEDY)
    out = model.continue_stream(turn, resumed, max_new_tokens=6, **kwargs)
    at_once = model.generate(torch.cat([history, turn], 1), max_new_tokens=6, **kwargs)
    assert torch.equal(out.sequences, at_once.sequences[:, 15:])
    assert all((a - b).abs().max() <= 1e-4 for a, b in zip(out.logits, at_once.logits))
    at_once = at_once.sequences
    again = model.continue_stream(torch.cat([out.sequences[:, -1:], turn2], 1), out.cache,
                                  max_new_tokens=5, **kwargs)
    at_once = model.generate(torch.cat([at_once, turn2], 1), max_new_tokens=5, **kwargs)
    assert torch.equal(again.sequences[:, -5:], at_once.sequences[:, -5:])
    assert all((a - b).abs().max() <= 1e-4 for a, b in zip(again.logits, at_once.logits))
    with pytest.raises(ValueError, match="second argument"):
        model.continue_stream(turn, resumed, past_key_values=resumed)


@pytest.mark.gpu
def test_prefill_peak_memory_is_set_by_the_chunk_not_the_prompt():
    """On CUDA, generate()'s prefill of an 8x longer prompt peaks within 10% of the short one's, plus
    64 bytes a token for generate's own [B, T] id and mask tensors (chunks of 512 tokens, lm_head
    on one position; a [B, T, d] activation would be 1 KiB a token); the whole prompt in one pass
    peaks higher."""
    model = tiny_model(hidden_size=256, num_attention_heads=4, vocab_size=4096, memory_segment_length=128,
                       memory_block_size=16, scan_backend="auto", inference_chunk_size=512).cuda()
    generator = torch.Generator().manual_seed(12)

    def peak(T, chunk):
        model.config.inference_chunk_size = chunk
        ids = torch.randint(2, 4096, (4, T), generator=generator).cuda()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model.generate(ids, max_new_tokens=1, **GREEDY)
        return torch.cuda.max_memory_allocated() - base

    short, long = peak(1024, 512), peak(8192, 512)
    assert long <= 1.1 * short + 64 * 4 * 8192
    assert peak(8192, None) > 2 * long
