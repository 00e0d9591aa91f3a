"""mm_rec/graph_decode.py: generate() decoding from a captured CUDA graph gives the eager tokens
(greedy and seeded sampling), across segment folds, with left-padded rows, and leaves every
stream's cache as the eager step would (GPU only)."""

import pytest
import torch
from common import randomize_short_conv_

from mm_rec import MMRecForCausalLM

pytestmark = pytest.mark.gpu


def gpu_model(tiny_config, dtype=torch.float32, **overrides):
    """Width 64 and a vocabulary of 97 (ids 2..96 in the prompts); no eos, so every row runs to
    max_new_tokens; the default (auto, so Triton) scan backend."""
    torch.manual_seed(0)
    config = tiny_config(vocab_size=97, hidden_size=64, num_attention_heads=4, num_memory_slots=3, eos_token_id=None,
                         scan_backend="auto", **overrides)
    return randomize_short_conv_(MMRecForCausalLM(config)).to("cuda", dtype).eval()


def prompts():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 97, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # a left-padded row
    return ids.cuda(), mask.cuda()


def run(model, graph, **kwargs):
    model.config.decode_cuda_graph = graph
    return model.generate(**kwargs, return_dict_in_generate=True, output_scores=True)


CONV = {0: {"short_conv_size": 0}, 4: {"short_conv_size": 4, "short_conv_inputs": "all"},
        "4rec": {"short_conv_size": 4, "short_conv_inputs": "recurrence"}}


@pytest.mark.parametrize("conv", list(CONV))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_and_cache_equal_the_eager_steps(dtype, conv, tiny_config):
    model = gpu_model(tiny_config, dtype, **CONV[conv])
    ids, mask = prompts()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False)  # crosses 2+ folds
    eager = run(model, False, **kwargs)
    graphed = run(model, True, **kwargs)
    assert model._graph_decoder is not None and model._graph_decoder._captured  # the graph ran
    assert torch.equal(graphed.sequences, eager.sequences)
    for a, b in zip(graphed.scores, eager.scores):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for got, want in zip(graphed.cache.layers, eager.cache.layers):
        for name, t in want.tensors().items():
            torch.testing.assert_close(got.tensors()[name], t, rtol=0, atol=0, msg=name)


def test_seeded_sampling_equals_the_eager_steps(tiny_config):
    model = gpu_model(tiny_config)
    ids, mask = prompts()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(5)
    eager = run(model, False, **kwargs)
    torch.manual_seed(5)
    graphed = run(model, True, **kwargs)
    assert torch.equal(graphed.sequences, eager.sequences)


def test_two_streams_share_the_graph_without_mixing_their_states(tiny_config):
    """Stream A, then stream B (same batch size, so the same graph and buffers), then A again:
    A's cache must still be A's."""
    model = gpu_model(tiny_config)
    ids, mask = prompts()
    other = torch.flip(ids, [1])
    kwargs = dict(max_new_tokens=12, do_sample=False)
    results = {}
    for graph in (False, True):
        model.config.decode_cuda_graph = graph
        a = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **kwargs)
        model.generate(other, return_dict_in_generate=True, **kwargs)  # B runs between A's two calls
        mask_a = torch.cat([mask, torch.ones_like(a.sequences[:, ids.shape[1]:])], 1)
        again = model.generate(a.sequences, attention_mask=mask_a, cache=a.cache, **kwargs)
        results[graph] = again
    assert torch.equal(results[True], results[False])
