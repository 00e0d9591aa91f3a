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


def test_ties_route_to_the_lowest_slot():
    from mm_rec.memory_triton import route_segments_triton

    slot_keys = torch.zeros(1, 4, 16, device=DEVICE)
    slot_keys[0, 1] = slot_keys[0, 3] = 1.0  # slots 1 and 3 tie for every block with a positive sum
    block_keys = torch.ones(1, 2, 3, 16, device=DEVICE)
    weight, _ = route_segments_triton(block_keys, slot_keys, torch.zeros(4, 16, device=DEVICE),
                                      torch.zeros(1, 2, dtype=torch.bool, device=DEVICE), 0.9)
    assert weight[0, 0].argmax(-1).tolist() == [1, 1, 1]


@pytest.mark.gpu
@pytest.mark.parametrize("B, K, C", [(4, 66, 16), (2, 5, 512)], ids=["blocks-of-32", "blocks-of-1"])
def test_gpu_realistic_width(B, K, C):
    from mm_rec.memory_triton import route_segments_triton

    block_keys, slot_keys, init, restart = routing_inputs(0, B, K, C, 16, 768, "cuda")
    weight, keep = route_segments_triton(block_keys, slot_keys, init, restart, 0.99)
    ref_weight, ref_keep = route_segments_torch(block_keys.double(), slot_keys.double(), init.double(), restart, 0.99)
    torch.testing.assert_close(weight.double(), ref_weight, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(keep.double(), ref_keep, rtol=1e-5, atol=1e-7)
