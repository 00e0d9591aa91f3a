"""MMRecForCausalLM.generate() and continue_stream() (mm_rec/modeling_mmrec.py), the contract
with transformers (README "Use it from Python"): generate with and without the cache, greedy,
beam search and sampling against recomputation; keywords reach forward; the full sequence plus
the returned cache continues exactly; continue_stream takes new tokens only; long prompts run in
chunks with the same result."""

import copy

import pytest
import torch
from common import VOCAB

from mm_rec import MMRecCache

GREEDY = dict(do_sample=False, eos_token_id=None)


def left_padded_prompts():
    ids = torch.randint(2, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    return ids, mask


@pytest.mark.parametrize("gate", ["input", "state"])
def test_generate_with_cache_equals_without(gate, tiny_model):
    model = tiny_model(recurrence_gate=gate)
    ids, mask = left_padded_prompts()
    kwargs = dict(attention_mask=mask, max_new_tokens=25, do_sample=False, eos_token_id=None)
    with_cache = model.generate(ids, use_cache=True, **kwargs)
    without = model.generate(ids, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 9 + 25)
    assert torch.equal(with_cache, without)


def test_greedy_generate_equals_manual_argmax_loop(tiny_model):
    model = tiny_model()
    ids = torch.randint(2, VOCAB, (1, 6))
    out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
    seq = ids
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq)


def test_beam_search_returns_its_best_scoring_beams(tiny_model):
    model = tiny_model()
    ids, mask = left_padded_prompts()
    kwargs = dict(attention_mask=mask, max_new_tokens=8, num_beams=4, num_return_sequences=3, do_sample=False,
                  eos_token_id=None, length_penalty=1.0, return_dict_in_generate=True, output_scores=True)
    out = model.generate(ids, use_cache=True, **kwargs)
    reference = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(out.sequences, reference.sequences)  # reorder_cache == recomputation
    scores = out.sequences_scores.view(2, 3)
    assert (scores[:, :-1] >= scores[:, 1:] - 1e-6).all()  # best first
    # each returned score is the beam's own log-likelihood (length_penalty=1 divides by length)
    rows = torch.arange(2).repeat_interleave(3)
    with torch.no_grad():
        full_mask = torch.cat([mask[rows], torch.ones(6, 8, dtype=mask.dtype)], 1)
        logp = model(out.sequences, attention_mask=full_mask).logits.log_softmax(-1)
    new = out.sequences[:, 9:]
    token_logp = logp[:, 8:-1].gather(-1, new[..., None])[..., 0].sum(-1)
    assert torch.allclose(token_logp / 8, out.sequences_scores, atol=1e-4)


def test_sampling_and_num_return_sequences_and_eos(tiny_model):
    model = tiny_model()
    ids, mask = left_padded_prompts()
    sample = dict(attention_mask=mask, do_sample=True, top_k=10, max_new_tokens=7, num_return_sequences=3,
                  eos_token_id=None)
    torch.manual_seed(3)
    sampled = model.generate(ids, **sample)
    assert sampled.shape == (6, 16)
    # Every sampled token is among the 10 most likely of the model's logits at its step
    # (a forward of the whole sampled sequence is the reference).
    rows = torch.arange(2).repeat_interleave(3)
    with torch.no_grad():
        logits = model(sampled, attention_mask=torch.cat([mask[rows], torch.ones(6, 7, dtype=mask.dtype)], 1)).logits
    top10 = logits[:, 8:-1].topk(10, dim=-1).indices  # the logits that chose tokens 9..15
    assert (top10 == sampled[:, 9:, None]).any(-1).all()
    # The same seed draws the same samples, with the cache or without; another seed draws others.
    for use_cache, seed in ((True, 3), (False, 3), (True, 4)):
        torch.manual_seed(seed)
        again = model.generate(ids, use_cache=use_cache, **sample)
        assert torch.equal(again, sampled) == (seed == 3), (use_cache, seed)
    # top_k=1 sampling has one choice per step: each of the 3 returned sequences is the greedy one
    greedy = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=7, eos_token_id=None)
    forced = model.generate(ids, attention_mask=mask, do_sample=True, top_k=1, max_new_tokens=7,
                            num_return_sequences=3, eos_token_id=None)
    assert torch.equal(forced, greedy.repeat_interleave(3, dim=0))
    # force EOS: a bias on the head makes token 1 (eos) the argmax at every step
    with torch.no_grad():
        model.lm_head.weight[1] = 0
        model.model.embed_tokens.weight[1] = 0
    model.lm_head.register_forward_hook(lambda mod, inp, out: out + torch.nn.functional.one_hot(torch.tensor(1), VOCAB) * 1e4)
    stopped = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10)
    assert stopped.shape[1] == 10 and (stopped[:, 9] == 1).all()


# ---------------------------------------------------------------------------------------
# The full sequence and the returned cache, continue_stream
# ---------------------------------------------------------------------------------------

def test_full_sequence_and_returned_cache_continue_exactly(tiny_model):
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


def test_beam_search_continues_from_full_sequence_and_cache(tiny_model):
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


def test_inputs_inconsistent_with_the_cache_are_refused(tiny_model):
    model = tiny_model()
    torch.manual_seed(2)
    history = torch.randint(2, VOCAB, (1, 10))
    with torch.no_grad():
        cache = model(history, use_cache=True).cache
    with pytest.raises(ValueError, match="continue_stream"):  # new tokens only: shorter than what the cache saw
        model.generate(history[:, :4], max_new_tokens=2, cache=cache, **GREEDY)
    with pytest.raises(ValueError, match="already seen 10"):  # nothing unseen: no logits to continue from
        model.generate(history, max_new_tokens=2, cache=cache, **GREEDY)


def test_generate_continues_a_saved_stream(tmp_path, tiny_model):
    """A chat that resumes tomorrow: prompt -> save cache -> reload -> continue_stream from the new turn."""
    model = tiny_model()
    history = torch.randint(2, VOCAB, (1, 15))
    turn = torch.randint(2, VOCAB, (1, 4))
    with torch.no_grad():
        model(history, use_cache=True).cache.save(tmp_path / "stream.safetensors")
    resumed = MMRecCache.load(tmp_path / "stream.safetensors", config=model.config)
    kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)
    continued = model.continue_stream(turn, resumed, **kwargs)
    from_scratch = model.generate(torch.cat([history, turn], 1), **kwargs)
    assert torch.equal(continued[:, 4:], from_scratch[:, 19:])


def test_continue_stream_resumes_a_saved_state_exactly(tmp_path, tiny_model):
    """save -> load -> continue_stream(turn) == generate(history + turn) in one go; and the next turn
    continues from the cache continue_stream returns."""
    model = tiny_model()
    torch.manual_seed(10)
    history, turn, turn2 = (torch.randint(2, VOCAB, (2, n)) for n in (15, 4, 3))
    with torch.no_grad():
        model(history, use_cache=True).cache.save(tmp_path / "stream.safetensors")
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


# ---------------------------------------------------------------------------------------
# Prefill: one position to the head, long prompts in chunks; keywords that reach forward
# ---------------------------------------------------------------------------------------

def test_prefill_lm_head_sees_only_the_last_position(tiny_model):
    model = tiny_model()
    torch.manual_seed(3)
    seen = []
    model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    ids = torch.randint(2, VOCAB, (2, 30))
    model.generate(ids, max_new_tokens=3, **GREEDY)
    assert seen == [(2, 1, 32)] * 3


def test_long_prompt_runs_in_chunks_and_keeps_one_position(tiny_model):
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


def test_generate_prefill_chunk_size_uses_the_chunked_forward(tiny_model):
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


def test_generate_returns_hidden_states(tiny_model):
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


def test_position_ids_given_to_generate_reach_forward(tiny_model):
    """A prompt of two packed documents (position_ids restart at 0) continues the second one only."""
    model = tiny_model()
    torch.manual_seed(7)
    first, second = torch.randint(2, VOCAB, (1, 11)), torch.randint(2, VOCAB, (1, 6))
    position_ids = torch.cat([torch.arange(11), torch.arange(6)])[None]
    packed = model.generate(torch.cat([first, second], 1), position_ids=position_ids, max_new_tokens=5, **GREEDY)
    alone = model.generate(second, max_new_tokens=5, **GREEDY)
    assert torch.equal(packed[:, 11:], alone)


@pytest.mark.gpu
def test_prefill_peak_memory_is_set_by_the_chunk_not_the_prompt(tiny_model):
    """On CUDA, generate()'s prefill of an 8x longer prompt peaks within 10% of the short one's, plus
    64 bytes a token for generate's own [B, T] id and mask tensors (chunks of 512 tokens, lm_head
    on one position; a [B, T, d] activation would be 1 KiB a token); the whole prompt in one pass
    peaks higher."""
    model = tiny_model(hidden_size=256, num_attention_heads=4, vocab_size=4096, memory_segment_length=128,
                       memory_block_size=16, kernel_backend="auto", inference_chunk_size=512).cuda()
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


def test_decode_steps_take_the_whole_mask_and_two_merged_steps_equal_one_by_one(tiny_model):
    """transformers passes a decode step the whole [B, past + 1] attention mask (exporters merge
    steps on that convention): the step's inputs carry it, and feeding two new tokens at once with
    the whole mask gives the logits and state of feeding them one after the other."""
    model = tiny_model()
    ids, mask = left_padded_prompts()
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).cache
        grown = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        step = model.prepare_inputs_for_generation(torch.cat([ids, ids[:, -1:]], 1), attention_mask=grown, cache=cache,
                                                   is_first_iteration=False)
        assert torch.equal(step["attention_mask"], grown) and step["input_ids"].shape == (2, 1)
        new = torch.randint(2, VOCAB, (2, 2))
        longer = torch.cat([mask, torch.ones(2, 2, dtype=mask.dtype)], 1)
        merged = model(new, attention_mask=longer, cache=copy.deepcopy(cache), use_cache=True)
        first = model(new[:, :1], attention_mask=longer[:, :-1], cache=copy.deepcopy(cache), use_cache=True)
        second = model(new[:, 1:], attention_mask=longer, cache=first.cache, use_cache=True)
    torch.testing.assert_close(merged.logits[:, -1], second.logits[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged.logits[:, 0], first.logits[:, 0], atol=1e-5, rtol=1e-5)
