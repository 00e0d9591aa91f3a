"""Section 3 of docs/ARCHITECTURE.md: the cache, exact streaming, padding, packing and generate()."""

import random

import pytest
import torch

from mm_rec import MMRecCache, MMRecConfig, MMRecForCausalLM

VOCAB = 60


def tiny_model(recurrence_gate="input", use_hem=True, dtype=torch.float32, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, memory_block_size=4,
        memory_segment_length=12, num_memory_slots=3, recurrence_gate=recurrence_gate, use_hem=use_hem,
        eos_token_id=1, pad_token_id=0, scan_backend="torch",
    )
    cfg.update(overrides)
    return MMRecForCausalLM(MMRecConfig(**cfg)).to(dtype).eval()


def cache_of(output):
    return output.cache


def stream(model, ids, cuts, mask=None):
    """Feed ids in the given chunks, carrying the cache; return the concatenated logits."""
    cache, logits = None, []
    for start, stop in zip(cuts[:-1], cuts[1:]):
        out = model(ids[:, start:stop], attention_mask=None if mask is None else mask[:, start:stop],
                    cache=cache, use_cache=True)
        cache = cache_of(out)
        logits.append(out.logits)
    return torch.cat(logits, 1), cache


def random_cuts(T, rng):
    inner = sorted(rng.sample(range(1, T), k=min(6, T - 1)))
    return [0] + inner + [T]


MODES = [("input", True), ("input", False), ("state", True)]


@pytest.mark.parametrize("gate,use_hem", MODES)
def test_parallel_equals_chunked_equals_token_by_token(gate, use_hem):
    model = tiny_model(gate, use_hem)
    T = 41  # crosses 10 blocks and 3 segments (block 4, segment 12)
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


def test_long_input_over_many_segments_equals_token_by_token():
    """T far beyond memory_segment_length: the parallel forward's segment layout holds 9
    segments, with 8 folds between them."""
    model = tiny_model()
    ids = torch.randint(2, VOCAB, (2, 100))
    with torch.no_grad():
        full = model(ids).logits
        token_by_token, _ = stream(model, ids, list(range(101)))
    assert (token_by_token - full).abs().max() <= 1e-4


@pytest.mark.parametrize("gate,use_hem", MODES)
def test_left_padded_batch_equals_rows_alone(gate, use_hem):
    model = tiny_model(gate, use_hem)
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


def test_padding_in_the_middle_of_a_stream_is_skipped():
    """A padded step between two chunks leaves the state untouched."""
    model = tiny_model()
    ids = torch.randint(2, VOCAB, (1, 20))
    with torch.no_grad():
        full = model(ids).logits
        _, cache = stream(model, ids[:, :9], [0, 9])
        pad = model(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.zeros(1, 3), cache=cache, use_cache=True)
        rest = model(ids[:, 9:], cache=cache_of(pad), use_cache=True).logits
    assert (rest - full[:, 9:]).abs().max() <= 1e-4


@pytest.mark.parametrize("gate", ["input", "state"])
def test_packed_rows_equal_documents_run_separately(gate):
    model = tiny_model(gate)
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
def test_packed_documents_decoded_token_by_token_equal_parallel(device):
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
            cache = cache_of(out)
            steps.append(out.logits)
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-4


def test_bf16_chunked_matches_parallel_and_fp32():
    model = tiny_model(dtype=torch.bfloat16)
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


@pytest.mark.parametrize("with_config", [True, False])
@pytest.mark.parametrize("device", [None, "cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_cache_save_load_continues_identically(tmp_path, with_config, device):
    """save -> load (checked against a config or not; onto a device or the default CPU) gives
    back every tensor bit for bit, and the stream continues as if never interrupted. The rows
    are left-padded differently, so positions, open blocks and block counts differ per row."""
    model = tiny_model()
    ids = torch.randint(2, VOCAB, (2, 33))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        _, cache = stream(model, ids, [0, 21], mask)
        path = tmp_path / "chat.safetensors"
        cache.save(path)
        restored = MMRecCache.load(path, **({"config": model.config} if with_config else {}),
                                   **({} if device is None else {"device": device}))
        assert restored.position.device.type == (device or "cpu")
        assert torch.equal(restored.position.cpu(), cache.position) and cache.position.tolist() == [21, 15]
        for saved_layer, loaded_layer in zip(cache.layers, restored.layers):
            for name, t in saved_layer.tensors().items():
                loaded = loaded_layer.tensors()[name]
                assert loaded.dtype == t.dtype and torch.equal(loaded.cpu(), t), name
        on = device or "cpu"
        tail = model.to(on)(ids[:, 21:].to(on), attention_mask=mask[:, 21:].to(on), cache=restored, use_cache=True).logits
    assert (tail.cpu() - full[:, 21:]).abs().max() <= 1e-4
    assert not list(tmp_path.glob("*.tmp"))


def test_cache_of_another_model_batch_or_dtype_is_refused(tmp_path):
    model = tiny_model()
    ids = torch.randint(2, VOCAB, (2, 10))
    with torch.no_grad():
        cache = cache_of(model(ids, use_cache=True))
        with pytest.raises(ValueError, match="batch size"):
            model(ids[:1], cache=cache)
        wider = tiny_model(hidden_size=64)
        with pytest.raises(ValueError, match="shape"):
            wider(ids, cache=cache)
        deeper = tiny_model(num_hidden_layers=3)
        with pytest.raises(ValueError, match="layers"):
            deeper(ids, cache=cache)
        halved = MMRecCache([layer.map(lambda t: t.half() if t.is_floating_point() else t) for layer in cache.layers],
                            cache.position)
        with pytest.raises(ValueError, match="dtype"):
            model(ids, cache=halved)
        with pytest.raises(ValueError, match="MMRecCache"):
            model(ids, cache=("not", "a cache"))
    cache.save(tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="shape|layers"):
        MMRecCache.load(tmp_path / "c.safetensors", config=wider.config)
    truncated = tmp_path / "bad.safetensors"
    truncated.write_bytes((tmp_path / "c.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read"):
        MMRecCache.load(truncated)


def test_cache_accepted_under_both_names():
    model = tiny_model()
    ids = torch.randint(2, VOCAB, (1, 12))
    with torch.no_grad():
        full = model(ids).logits
        first = cache_of(model(ids[:, :5], use_cache=True))
        via_past = model(ids[:, 5:], past_key_values=first, use_cache=True).logits
        second = cache_of(model(ids[:, :5], use_cache=True))
        via_cache = model(ids[:, 5:], cache=second, use_cache=True).logits
    assert (via_past - full[:, 5:]).abs().max() <= 1e-4
    assert (via_cache - full[:, 5:]).abs().max() <= 1e-4


def left_padded_prompts():
    ids = torch.randint(2, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    return ids, mask


@pytest.mark.parametrize("gate", ["input", "state"])
def test_generate_with_cache_equals_without(gate):
    model = tiny_model(gate)
    ids, mask = left_padded_prompts()
    kwargs = dict(attention_mask=mask, max_new_tokens=25, do_sample=False, eos_token_id=None)
    with_cache = model.generate(ids, use_cache=True, **kwargs)
    without = model.generate(ids, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 9 + 25)
    assert torch.equal(with_cache, without)


def test_greedy_generate_equals_manual_argmax_loop():
    model = tiny_model()
    ids = torch.randint(2, VOCAB, (1, 6))
    out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
    seq = ids
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq)


def test_beam_search_returns_its_best_scoring_beams():
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
        logp = model(out.sequences, attention_mask=torch.cat([mask[rows], torch.ones(6, 8, dtype=mask.dtype)], 1)).logits.log_softmax(-1)
    new = out.sequences[:, 9:]
    token_logp = logp[:, 8:-1].gather(-1, new[..., None])[..., 0].sum(-1)
    assert torch.allclose(token_logp / 8, out.sequences_scores, atol=1e-4)


def test_sampling_and_num_return_sequences_and_eos():
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


def test_generate_continues_a_saved_stream(tmp_path):
    """A chat that resumes tomorrow: prompt -> save cache -> reload -> continue_stream from the new turn."""
    model = tiny_model()
    history = torch.randint(2, VOCAB, (1, 15))
    turn = torch.randint(2, VOCAB, (1, 4))
    with torch.no_grad():
        cache_of(model(history, use_cache=True)).save(tmp_path / "stream.safetensors")
    resumed = MMRecCache.load(tmp_path / "stream.safetensors", config=model.config)
    kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)
    continued = model.continue_stream(turn, resumed, **kwargs)
    from_scratch = model.generate(torch.cat([history, turn], 1), **kwargs)
    assert torch.equal(continued[:, 4:], from_scratch[:, 19:])


def test_decode_step_reads_only_the_cache():
    """Decoding a token with the cache == the last row of the full forward, though the earlier
    tokens are not passed; and the cache's size does not depend on how many tokens it saw."""
    model = tiny_model()
    ids = torch.randint(2, VOCAB, (1, 50))
    with torch.no_grad():
        short = cache_of(model(ids[:, :5], use_cache=True))
        sizes_short = [t.numel() for layer in short.layers for t in layer.tensors().values()]
        long = cache_of(model(ids[:, :49], use_cache=True))
        sizes_long = [t.numel() for layer in long.layers for t in layer.tensors().values()]
        step = model(ids[:, 49:], cache=long, use_cache=True).logits
        full = model(ids).logits
    assert sizes_short == sizes_long
    assert (step[:, -1] - full[:, -1]).abs().max() <= 1e-4


def test_detached_cache_continues_exactly_and_cuts_the_graph():
    """Truncated backprop through time: carry cache.detach() between training chunks."""
    model = tiny_model()
    ids = torch.randint(2, VOCAB, (2, 30))
    with torch.no_grad():
        full = model(ids).logits
    first = model(ids[:, :17], use_cache=True)
    carried = cache_of(first).detach().to("cpu")
    assert all(not t.requires_grad for layer in carried.layers for t in layer.tensors().values())
    second = model(ids[:, 17:], cache=carried, use_cache=True)
    assert (second.logits.detach() - full[:, 17:]).abs().max() <= 1e-4
    model.zero_grad()
    second.logits.sum().backward()
    # Had the cache kept its graph, that backward would have run through (and freed) the first
    # chunk's graph, and this would raise "Trying to backward through the graph a second time".
    graph_of_first = torch.autograd.grad(first.logits.sum(), model.model.embed_tokens.weight)[0]
    fresh = torch.autograd.grad(model(ids[:, :17]).logits.sum(), model.model.embed_tokens.weight)[0]
    torch.testing.assert_close(graph_of_first, fresh, rtol=1e-5, atol=1e-6)
