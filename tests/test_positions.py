"""mm_rec/positions.py: token_layout's positions, padding and document starts against
tests/naive.py's per-row count (docs/ARCHITECTURE.md section 5), continuing a cache's offset."""

import pytest
import torch
from naive import naive_positions

from mm_rec.positions import token_layout


@pytest.mark.parametrize("packed", [False, True])
def test_token_layout_matches_naive_positions(packed):
    """Rows with left padding, holes, and one of padding only; with position_ids (packed
    documents: p as given, p == 0 starts a document) or without (p continues the offset)."""
    g = torch.Generator().manual_seed(20)
    B, T = 4, 17
    mask = (torch.rand(B, T, generator=g) < 0.8).long()
    mask[0] = 1
    mask[1, :5] = 0  # left padding
    mask[3] = 0  # padding only: the row's next position stays its offset
    offset = torch.tensor([0, 7, 30, 5]) if not packed else torch.zeros(B, dtype=torch.long)
    position_ids = None
    if packed:
        position_ids = torch.cat([torch.arange(6), torch.arange(4), torch.arange(7)])[None].repeat(B, 1)
        position_ids[2] = torch.cat([torch.arange(9), torch.arange(8)])
    layout = token_layout(mask, position_ids, offset)
    next_position = layout.next_position(offset)
    assert layout.has_resets == packed
    for b, tokens in enumerate(naive_positions(mask, position_ids)):
        steps = [t for t, _, _ in tokens]
        positions = [p + int(offset[b]) for _, p, _ in tokens]
        assert layout.real[b].nonzero().flatten().tolist() == steps, b
        assert layout.position[b, steps].tolist() == positions, b
        assert layout.reset[b].nonzero().flatten().tolist() == [t for t, _, starts in tokens if starts], b
        assert int(next_position[b]) == (positions[-1] + 1 if tokens else int(offset[b])), b
