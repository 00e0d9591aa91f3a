"""mm_rec/memory_triton.py: the fold routing kernel against memory.route_segments_torch
(the interpreter on CPU at small shapes; realistic shapes on a GPU)."""

import pytest
import torch

from mm_rec.memory import route_segments_torch
from mm_rec.memory_triton import AVAILABLE

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def routing_inputs(seed, B, K, C, S, d, device):
    g = torch.Generator().manual_seed(seed)
    slot_keys = torch.randn(B, S, d, generator=g)
    block_keys = torch.randn(B, K, C, d, generator=g)
    # some blocks aimed at one slot, so several blocks share it (ranks and counts > 1)
    block_keys[:, :, ::2] += 3.0 * slot_keys[:, None, :1]
    init = torch.randn(S, d, generator=g)
    restart = torch.rand(B, K, generator=g) < 0.3
    return [t.to(device) for t in (block_keys, slot_keys, init, restart)]


# (2, 3, 40, 16, 20): 40 blocks walked in chunks of 16 (the last one partial), as blocks of one token do
@pytest.mark.parametrize("B, K, C, S, d", [(2, 5, 4, 3, 12), (1, 3, 16, 16, 40), (3, 2, 2, 5, 7), (2, 3, 40, 16, 20)])
@pytest.mark.parametrize("decay", [0.99, 0.6])
def test_kernel_routing_equals_torch_loop(B, K, C, S, d, decay):
    from mm_rec.memory_triton import route_segments_triton

    block_keys, slot_keys, init, restart = routing_inputs(K + C, B, K, C, S, d, DEVICE)
    weight, keep = route_segments_triton(block_keys, slot_keys, init, restart, decay)
    ref_weight, ref_keep = route_segments_torch(block_keys.double(), slot_keys.double(), init.double(), restart, decay)
    assert weight.shape == (B, K - 1, C, S) and keep.shape == (B, K - 1, S)
    torch.testing.assert_close(weight.double(), ref_weight, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(keep.double(), ref_keep, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("B, K, C, S, d", [(2, 5, 4, 3, 12), (2, 3, 40, 16, 20)])
def test_one_launch_routing_equals_torch_loop(B, K, C, S, d):
    """Every segment in one launch (``_routing_kernel``), one program a row: under the interpreter the
    programs run one after another, so only one a row can pass its waits (the GPU tests run many)."""
    from mm_rec.memory_triton import route_segments_triton

    block_keys, slot_keys, init, restart = routing_inputs(K * C, B, K, C, S, d, DEVICE)
    weight, keep = route_segments_triton(block_keys, slot_keys, init, restart, 0.8, programs_per_row=1)
    ref_weight, ref_keep = route_segments_torch(block_keys.double(), slot_keys.double(), init.double(), restart, 0.8)
    torch.testing.assert_close(weight.double(), ref_weight, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(keep.double(), ref_keep, rtol=1e-5, atol=1e-7)


def test_ties_route_to_the_lowest_slot():
    from mm_rec.memory_triton import route_segments_triton

    slot_keys = torch.zeros(1, 4, 16, device=DEVICE)
    slot_keys[0, 1] = slot_keys[0, 3] = 1.0  # slots 1 and 3 tie for every block with a positive sum
    block_keys = torch.ones(1, 2, 3, 16, device=DEVICE)
    weight, _ = route_segments_triton(block_keys, slot_keys, torch.zeros(4, 16, device=DEVICE),
                                      torch.zeros(1, 2, dtype=torch.bool, device=DEVICE), 0.9)
    assert weight[0, 0].argmax(-1).tolist() == [1, 1, 1]


@pytest.mark.gpu
@pytest.mark.parametrize("B, K, C", [(4, 66, 16), (2, 5, 512), (1, 64, 512)], ids=["blocks-of-32", "blocks-of-1", "32k-row"])
def test_gpu_realistic_width(B, K, C):
    from mm_rec.memory_triton import route_segments_triton

    block_keys, slot_keys, init, restart = routing_inputs(0, B, K, C, 16, 768, "cuda")
    weight, keep = route_segments_triton(block_keys, slot_keys, init, restart, 0.99)
    ref_weight, ref_keep = route_segments_torch(block_keys.double(), slot_keys.double(), init.double(), restart, 0.99)
    torch.testing.assert_close(weight.double(), ref_weight, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(keep.double(), ref_keep, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
def test_gpu_more_rows_than_sms_route_segment_by_segment():
    """Rows whose programs cannot all be resident at once take two launches a segment (the one-launch
    routing would wait on programs never scheduled): the same weights as the PyTorch loop."""
    from mm_rec.memory_triton import route_segments_triton

    B = torch.cuda.get_device_properties(0).multi_processor_count + 3
    block_keys, slot_keys, init, restart = routing_inputs(2, B, 3, 16, 16, 64, "cuda")
    weight, keep = route_segments_triton(block_keys, slot_keys, init, restart, 0.9)
    ref_weight, ref_keep = route_segments_torch(block_keys.double(), slot_keys.double(), init.double(), restart, 0.9)
    torch.testing.assert_close(weight.double(), ref_weight, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(keep.double(), ref_keep, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- the decode step

def _random_state(B, d, C, S, N, seed):
    from mm_rec.memory import MemoryState

    g = torch.Generator().manual_seed(seed)
    state = MemoryState.zeros(B, d, C, S, DEVICE)
    for name in ("open_key_sum", "open_value_sum", "block_keys", "block_values", "slot_keys", "slot_values",
                 "fold_key_sum", "fold_value_sum"):
        getattr(state, name).copy_(torch.randn(getattr(state, name).shape, generator=g))
    state.fold_keep.copy_(0.3 + 0.7 * torch.rand(B, S, generator=g))
    state.open_count.copy_(torch.randint(0, N, (B,), generator=g))
    state.open_count[0] = N - 1  # row 0 closes a block this step
    state.block_count.copy_(torch.randint(0, C, (B,), generator=g))
    return state


@pytest.mark.parametrize("block, levels", [(4, "slots+blocks"), (1, "slots+blocks"), (4, "blocks"), (1, "slots")])
def test_decode_kernel_step_equals_the_torch_step(block, levels):
    """One decode step of the memory, the state update in one kernel (memory_triton.decode_step_triton), against
    the PyTorch step: the read m and every field of the new state, for rows that close a block, start a segment
    (the accumulated fold applies), start a document, or are padding."""
    from common import tiny_config

    from mm_rec.memory import MultiMemoryAttention
    from mm_rec.positions import token_layout

    config = tiny_config(memory_block_size=block, memory_levels=levels, memory_decay=0.7)
    memory = MultiMemoryAttention(config).to(DEVICE)
    with torch.no_grad():
        memory.slot_keys.normal_()
        memory.slot_values.normal_()
    B, d, C, S = 5, config.hidden_size, config.blocks_per_segment, config.num_memory_slots
    state = _random_state(B, d, C, S, block, seed=block)
    q, k, v = (torch.randn(B, 1, d, generator=torch.Generator().manual_seed(i)).to(DEVICE) for i in range(3))
    for offsets, real, position_ids in (
        ([5, 7, 3, 9, 2], [1, 1, 1, 1, 1], None),
        ([16, 32, 17, 48, 16], [1, 1, 0, 1, 0], None),  # segment starts, two of them padded (no fold)
        ([16, 40, 17, 48, 16], [1, 1, 1, 1, 1], [0, 3, 0, 0, 5]),  # document starts (rows 0, 2, 3)
    ):
        layout = token_layout(torch.tensor(real, device=DEVICE)[:, None],
                              None if position_ids is None else torch.tensor(position_ids, device=DEVICE)[:, None],
                              torch.tensor(offsets, device=DEVICE))
        results = {}
        for backend in ("torch", "triton"):
            memory.kernel_backend = backend
            with torch.no_grad():
                results[backend] = memory._decode_step(q, k, v, layout, state)
        (m_ref, ref), (m, got) = results["torch"], results["triton"]
        rows = torch.tensor(real, dtype=torch.bool, device=DEVICE)
        torch.testing.assert_close(m[rows], m_ref[rows], rtol=1e-5, atol=1e-5)
        for name, want in ref.tensors().items():
            torch.testing.assert_close(got.tensors()[name], want, rtol=1e-5, atol=1e-5, msg=f"{offsets}: {name}")


@pytest.mark.parametrize("block", [1, 4])
def test_triton_decoding_of_padded_packed_rows_equals_the_parallel_forward(block):
    """Token by token with kernel_backend="triton" (the one-kernel decode step, over the views it leaves in the
    state): left padding, holes, packed documents and two segment folds give the parallel forward's logits."""
    from common import VOCAB, tiny_model

    model = tiny_model(kernel_backend="triton", memory_block_size=block, memory_decay=0.7).to(DEVICE)
    ids = torch.randint(2, VOCAB, (2, 40), generator=torch.Generator().manual_seed(block))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :4] = 0
    mask[0, [9, 23]] = 0
    position_ids = torch.zeros(2, 40, dtype=torch.long)
    for b in range(2):
        real = mask[b].bool()
        lengths = (22, 40) if b == 0 else (40,)
        position_ids[b, real] = torch.cat([torch.arange(n) for n in lengths])[: int(real.sum())]
    ids, mask, position_ids = ids.to(DEVICE), mask.to(DEVICE), position_ids.to(DEVICE)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=position_ids).logits
        cache, steps = None, []
        for t in range(40):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=position_ids[:, t:t + 1],
                        cache=cache, use_cache=True)
            cache, steps = out.cache, steps + [out.logits]
    real = mask.bool()
    assert (torch.cat(steps, 1) - full)[real].abs().max() <= 1e-4
