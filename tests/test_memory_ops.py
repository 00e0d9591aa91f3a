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
