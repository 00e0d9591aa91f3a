"""mm_rec/memory.py: the multi-memory attention (parallel path and decode step) against
tests/naive.py's per-token memory, the fold rule against the block-by-block EMA, the memory's
torch.library ops under opcheck, and its float32 state under autocast."""

import pytest
import torch
from common import random_ids
from naive import naive_fold, naive_memory_attention

from mm_rec import MMRecForCausalLM
from mm_rec.memory import MultiMemoryAttention, fold_into_slots
from mm_rec.positions import token_layout

# ---------------------------------------------------------------------------------------
# Memory visibility and attention
# ---------------------------------------------------------------------------------------

MEMORY_CASES = {
    # name: (B, T, left padding per row, position_ids per row as document lengths or None)
    "three_segments": (2, 48, [0, 0], None),
    "segments_partial": (2, 61, [0, 0], None),
    "left_padded": (3, 57, [0, 5, 13], None),
    "padded_past_a_segment": (2, 50, [0, 21], None),  # row 1 has no real token in the first segment
    "packed": (2, 58, [0, 0], [[21, 3, 30, 4], [16, 16, 26]]),
    "packed_and_padded": (2, 50, [0, 9], [[33, 17], [6, 35]]),
}


@pytest.mark.parametrize("block", [4, 1], ids=lambda n: f"block{n}")
@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_memory_attention_matches_naive(case, block, tiny_config):
    """Blocks of one token (level 1 = attention over every earlier token of the segment) as well."""
    B, T, pads, documents = MEMORY_CASES[case]
    config = tiny_config(memory_decay=0.7, memory_block_size=block)
    torch.manual_seed(9)
    memory = MultiMemoryAttention(config)
    torch.nn.init.normal_(memory.slot_keys)
    torch.nn.init.normal_(memory.slot_values)
    q, k, v = (torch.randn(B, T, config.hidden_size) for _ in range(3))
    mask = torch.ones(B, T, dtype=torch.long)
    for b, pad in enumerate(pads):
        mask[b, :pad] = 0
    position_ids = None
    if documents is not None:
        position_ids = torch.zeros(B, T, dtype=torch.long)
        for b, lengths in enumerate(documents):
            ids = torch.cat([torch.arange(n) for n in lengths])
            position_ids[b, pads[b]:] = ids[: T - pads[b]]
    layout = token_layout(mask, position_ids, torch.zeros(B, dtype=torch.long))
    with torch.no_grad():
        m, new_state = memory(q, torch.cat([k, v], -1), layout, memory.fresh_state(B))
    m_ref, finals = naive_memory_attention(
        q, k, v, memory.slot_keys, memory.slot_values, config.memory_block_size,
        config.memory_segment_length, config.memory_decay, config.num_attention_heads, mask, position_ids,
    )
    real = mask.bool()
    torch.testing.assert_close(m.double()[real], m_ref[real], rtol=1e-5, atol=1e-5)
    # The state handed to the next chunk is the naive memory after the last token.
    for b, final in enumerate(finals):
        torch.testing.assert_close(new_state.slot_keys[b].double(), final["slot_keys"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(new_state.slot_values[b].double(), final["slot_values"], rtol=1e-5, atol=1e-5)
        n = len(final["summaries"])
        assert int(new_state.block_count[b]) == n
        if n:
            torch.testing.assert_close(new_state.block_keys[b, :n].double(),
                                       torch.stack([s[0] for s in final["summaries"]]), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(new_state.block_values[b, :n].double(),
                                       torch.stack([s[1] for s in final["summaries"]]), rtol=1e-5, atol=1e-5)
        assert int(new_state.open_count[b]) == len(final["open_block"])
        open_keys = sum((e[0] for e in final["open_block"]), torch.zeros(config.hidden_size, dtype=torch.float64))
        torch.testing.assert_close(new_state.open_key_sum[b].double(), open_keys, rtol=1e-5, atol=1e-5)


DECODE_CASES = {
    # name: (left padding per row, holes (padded steps inside a row) per row, documents per row or None)
    "plain_and_padded": ([0, 7, 23], [[], [20, 21, 22], [30]], None),
    "packed_and_padded": ([0, 5, 0], [[], [33], [9, 10]], [[21, 3, 31], [17, 40], [4, 4, 50]]),
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_step_matches_naive_memory(case, tiny_config):
    """The decode step alone (forward with T == 1, carrying the MemoryState) against the naive
    per-token memory, at every step and in the final state: rows that close blocks, fold
    segments (segment 16, so 3 folds), restart documents and skip padded steps."""
    pads, holes, documents = DECODE_CASES[case]
    config = tiny_config(memory_decay=0.7)
    B, T, d = 3, 55, config.hidden_size
    g = torch.Generator().manual_seed(24)
    memory = MultiMemoryAttention(config)
    with torch.no_grad():
        memory.slot_keys.copy_(torch.randn(memory.slot_keys.shape, generator=g))
        memory.slot_values.copy_(torch.randn(memory.slot_values.shape, generator=g))
    q, k, v = (torch.randn(B, T, d, generator=g) for _ in range(3))
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        mask[b, :pads[b]] = 0
        mask[b, holes[b]] = 0
    position_ids = None
    if documents is not None:
        position_ids = torch.zeros(B, T, dtype=torch.long)
        for b, lengths in enumerate(documents):
            real = mask[b].bool()
            ids = torch.cat([torch.arange(n) for n in lengths])
            position_ids[b, real] = ids[: int(real.sum())]
    m_ref, finals = naive_memory_attention(
        q, k, v, memory.slot_keys, memory.slot_values, config.memory_block_size,
        config.memory_segment_length, config.memory_decay, config.num_attention_heads, mask, position_ids,
    )
    state = memory.fresh_state(B)
    offset = torch.zeros(B, dtype=torch.long)
    with torch.no_grad():
        for t in range(T):
            step = slice(t, t + 1)
            layout = token_layout(mask[:, step], None if position_ids is None else position_ids[:, step], offset)
            m, state = memory(q[:, step], torch.cat([k, v], -1)[:, step], layout, state)
            offset = layout.next_position(offset)
            real = mask[:, t].bool()
            torch.testing.assert_close(m[real, 0].double(), m_ref[real, t], rtol=1e-5, atol=1e-5, msg=f"t={t}")
    for b, final in enumerate(finals):
        torch.testing.assert_close(state.slot_keys[b].double(), final["slot_keys"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state.slot_values[b].double(), final["slot_values"], rtol=1e-5, atol=1e-5)
        n = len(final["summaries"])
        assert int(state.block_count[b]) == n
        if n:
            torch.testing.assert_close(state.block_keys[b, :n].double(),
                                       torch.stack([s[0] for s in final["summaries"]]), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(state.block_values[b, :n].double(),
                                       torch.stack([s[1] for s in final["summaries"]]), rtol=1e-5, atol=1e-5)
        assert int(state.open_count[b]) == len(final["open_block"])
        for name, i in (("open_key_sum", 0), ("open_value_sum", 1)):
            expected = sum((e[i] for e in final["open_block"]), torch.zeros(d, dtype=torch.float64))
            torch.testing.assert_close(getattr(state, name)[b].double(), expected, rtol=1e-5, atol=1e-5, msg=name)
        # the fold accumulated as the blocks closed, applied to the slots: the naive fold of the summaries
        want_k, want_v = naive_fold(final["slot_keys"], final["slot_values"], final["summaries"], config.memory_decay)
        keep = state.fold_keep[b, :, None].double()
        torch.testing.assert_close(keep * state.slot_keys[b].double() + state.fold_key_sum[b].double(), want_k,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(keep * state.slot_values[b].double() + state.fold_value_sum[b].double(), want_v,
                                   rtol=1e-5, atol=1e-5)


def test_packed_document_start_sees_only_learned_slots(tiny_config):
    """A document's first block sees exactly the learned slots again, whatever came before."""
    config = tiny_config()
    torch.manual_seed(10)
    memory = MultiMemoryAttention(config)
    torch.nn.init.normal_(memory.slot_keys)
    torch.nn.init.normal_(memory.slot_values)
    q, k, v = (torch.randn(1, 40, config.hidden_size) for _ in range(3))
    position_ids = torch.cat([torch.arange(36), torch.arange(4)])[None]
    layout = token_layout(torch.ones(1, 40), position_ids, torch.zeros(1, dtype=torch.long))
    with torch.no_grad():
        m_packed, _ = memory(q, torch.cat([k, v], -1), layout, memory.fresh_state(1))
        m_alone, _ = memory(q[:, 36:], torch.cat([k, v], -1)[:, 36:],
                            token_layout(torch.ones(1, 4), None, torch.zeros(1, dtype=torch.long)), memory.fresh_state(1))
    torch.testing.assert_close(m_packed[:, 36:], m_alone, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------
# The folding rule
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("decay", [0.99, 0.6])
def test_fold_into_slots_equals_blockwise_ema(decay):
    g = torch.Generator().manual_seed(11)
    B, S, E, d = 2, 3, 7, 5
    slot_keys = torch.randn(B, S, d, generator=g, dtype=torch.float64)
    slot_values = torch.randn(B, S, d, generator=g, dtype=torch.float64)
    slot_keys[1, 2] = slot_keys[1, 0]  # row 1: slots 0 and 2 tie for every block
    block_keys = torch.randn(B, E, d, generator=g, dtype=torch.float64)
    block_values = torch.randn(B, E, d, generator=g, dtype=torch.float64)
    for i in (0, 2, 3, 5):  # four blocks that route to slot 1, the rest scattered
        block_keys[0, i] = 4.0 * slot_keys[0, 1] + 0.1 * torch.randn(d, generator=g, dtype=torch.float64)
        block_keys[1, i] = 4.0 * slot_keys[1, 0] + 0.1 * torch.randn(d, generator=g, dtype=torch.float64)
    block_keys[0, 6] = 0.0  # all scores tie at 0: lowest slot
    selected = torch.ones(B, E, dtype=torch.bool)
    selected[0, 3] = False  # masked out in the middle of slot 1's run
    selected[1, 6] = False
    new_keys, new_values = fold_into_slots(slot_keys, slot_values, block_keys, block_values, selected, decay)
    routes = (block_keys @ slot_keys.transpose(1, 2)).argmax(-1)
    assert routes[0, [0, 2, 5]].eq(1).all() and routes[1, [0, 2, 3, 5]].eq(0).all()  # the setup holds
    for b in range(B):
        blocks = [(block_keys[b, i], block_values[b, i]) for i in range(E) if selected[b, i]]
        K_ref, V_ref = naive_fold(slot_keys[b], slot_values[b], blocks, decay)
        torch.testing.assert_close(new_keys[b], K_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(new_values[b], V_ref, rtol=1e-12, atol=1e-12)
    # row 1: every tie went to slot 0, so slot 2 (its copy) kept its value
    assert torch.equal(new_keys[1, 2], slot_keys[1, 2]) and torch.equal(new_values[1, 2], slot_values[1, 2])


def test_fold_ties_go_to_the_lowest_slot():
    """Ties that the lowest-j rule settles differently from highest-j, from "the slot already
    used in this segment" and from "slot 0": block A routes to slot 3 alone; block B ties
    slots 1 and 3; block C ties slots 1, 2 and 3. Lowest j sends B and C to slot 1. The
    expected slots are the EMA written out by hand."""
    decay = 0.75
    slot_keys = torch.tensor([[-1.0, 0, 0], [0, 1, 0], [0, 0, -1], [0, 1, 1]], dtype=torch.float64)
    slot_values = torch.arange(12, dtype=torch.float64).view(4, 3)
    block_keys = torch.tensor([[0.0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=torch.float64)  # A, B, C
    block_values = torch.tensor([[5.0, 6, 7], [-1, 2, -3], [4, -4, 8]], dtype=torch.float64)
    assert (block_keys @ slot_keys.T).tolist() == [[0, 0, -1, 1], [0, 1, 0, 1], [-1, 0, 0, 0]]  # the ties hold
    new_keys, new_values = fold_into_slots(slot_keys[None], slot_values[None], block_keys[None], block_values[None],
                                           torch.ones(1, 3, dtype=torch.bool), decay)
    for new, old, blocks in ((new_keys[0], slot_keys, block_keys), (new_values[0], slot_values, block_values)):
        expected = old.clone()
        expected[3] = decay * old[3] + (1 - decay) * blocks[0]
        expected[1] = decay * (decay * old[1] + (1 - decay) * blocks[1]) + (1 - decay) * blocks[2]
        torch.testing.assert_close(new, expected, rtol=1e-15, atol=1e-15)


def test_fold_with_nothing_selected_keeps_slots():
    g = torch.Generator().manual_seed(12)
    slot_keys, slot_values = torch.randn(1, 3, 4, generator=g), torch.randn(1, 3, 4, generator=g)
    blocks = torch.randn(1, 4, 4, generator=g)
    k, v = fold_into_slots(slot_keys, slot_values, blocks, blocks, torch.zeros(1, 4, dtype=torch.bool), 0.9)
    torch.testing.assert_close(k, slot_keys)
    torch.testing.assert_close(v, slot_values)


# ---------------------------------------------------------------------------------------
# The torch.library ops (torch.compile and torch.export trace the model through them)
# ---------------------------------------------------------------------------------------

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


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_route_segments_passes_opcheck(backend):
    """Also the fake's strides: torch.compile's generated code asserts them against the kernel's output."""
    g = torch.Generator().manual_seed(1)
    blocks, slots, init = torch.randn(2, 4, 3, 6, generator=g), torch.randn(2, 5, 6, generator=g), torch.randn(5, 6, generator=g)
    restart = torch.tensor([[False, True, False, False], [False, False, False, True]])
    if torch.cuda.is_available():  # on a GPU machine the Triton backend needs CUDA tensors (no interpreter there)
        blocks, slots, init, restart = (t.cuda() for t in (blocks, slots, init, restart))
    torch.library.opcheck(torch.ops.mm_rec.route_segments.default, (blocks, slots, init, restart, 0.9, backend))


@pytest.mark.parametrize("block_size", [2, 1])  # 1: the parallel path reads the summaries in bf16, as k and v
def test_cache_stays_float32_and_exact_under_bf16_autocast(tiny_config, block_size):
    """Under autocast the memory state (slots, summaries, sums) stays float32, so the cache is
    accepted back, and the token-by-token state equals the parallel one."""
    torch.manual_seed(0)
    model = MMRecForCausalLM(tiny_config(hidden_size=16, num_hidden_layers=1, memory_block_size=block_size,
                                         memory_segment_length=4, num_memory_slots=3)).eval()
    ids = random_ids((2, 11))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        parallel = model(ids, use_cache=True).cache
        stepped = None
        for t in range(11):
            stepped = model(ids[:, t:t + 1], use_cache=True, cache=stepped).cache
    for a, b in zip(parallel.layers, stepped.layers):
        # summaries past the count are unused
        filled = (torch.arange(model.config.blocks_per_segment)[None] < a.memory.block_count[:, None])[..., None]
        for name, t in a.tensors().items():
            assert t.dtype == (torch.long if name.endswith("count") else torch.float32), name
            other = b.tensors()[name]
            assert other.dtype == t.dtype, name
            if name.startswith("block_") and name != "block_count":
                t, other = t * filled, other * filled
            # both paths see bf16 projections (from GEMMs of other shapes); the memory itself is fp32
            torch.testing.assert_close(other, t, rtol=2e-2, atol=2e-2, msg=name)
