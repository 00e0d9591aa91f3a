"""The memory's torch.library ops (mm_rec/memory.py) pass opcheck: their fake shapes, strides
and dtypes match the real ones, so torch.compile and torch.export can trace the model."""

import torch

import mm_rec.memory  # noqa: F401  (registers the ops)
from mm_rec.positions import token_layout


def layouts():
    """Packed rows (one left-padded) from position 0, and rows continuing caches of other lengths."""
    mask = torch.ones(2, 23, dtype=torch.long)
    mask[1, :5] = 0
    position_ids = torch.cat([torch.arange(9), torch.arange(14)])[None].repeat(2, 1)
    yield token_layout(mask, position_ids, torch.zeros(2, dtype=torch.long))
    yield token_layout(mask, None, torch.tensor([17, 40]))


def test_segment_ops_pass_opcheck():
    for layout in layouts():
        args = (layout.position, layout.real, layout.reset, layout.offset)
        torch.library.opcheck(torch.ops.mm_rec.segment_index.default, (*args, 8))
        segment = torch.ops.mm_rec.segment_index(*args, 8)
        K = int(segment.max()) + 1
        torch.library.opcheck(torch.ops.mm_rec.segment_places.default, (segment, *args, 8, K))


def test_route_segments_passes_opcheck():
    g = torch.Generator().manual_seed(1)
    blocks, slots, init = torch.randn(2, 4, 3, 6, generator=g), torch.randn(2, 5, 6, generator=g), torch.randn(5, 6, generator=g)
    restart = torch.tensor([[False, True, False, False], [False, False, False, True]])
    torch.library.opcheck(torch.ops.mm_rec.route_segments.default, (blocks, slots, init, restart, 0.9))


def test_cache_stays_float32_and_exact_under_bf16_autocast():
    """Under autocast the memory state (slots, summaries, sums) stays float32, so the cache is
    accepted back, and the token-by-token state equals the parallel one."""
    from mm_rec import MMRecConfig, MMRecForCausalLM

    torch.manual_seed(0)
    model = MMRecForCausalLM(MMRecConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         memory_block_size=2, memory_segment_length=4, num_memory_slots=3)).eval()
    ids = torch.randint(0, 50, (2, 11))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        parallel = model(ids, use_cache=True).cache
        stepped = None
        for t in range(11):
            stepped = model(ids[:, t:t + 1], use_cache=True, cache=stepped).cache
    for a, b in zip(parallel.layers, stepped.layers):
        filled = (torch.arange(2)[None] < a.block_count[:, None])[..., None]  # summaries past the count are unused
        for name, t in a.tensors().items():
            assert t.dtype == (torch.long if name.endswith("count") else torch.float32), name
            other = getattr(b, name)
            assert other.dtype == t.dtype, name
            if name.startswith("block_") and name != "block_count":
                t, other = t * filled, other * filled
            # both paths see bf16 projections (from GEMMs of other shapes); the memory itself is fp32
            torch.testing.assert_close(other, t, rtol=2e-2, atol=2e-2, msg=name)
