"""mm_rec/norms.py: the block's RMS norm and the per-head readout norm against their definitions
(tests/naive.py), in float32 whatever the input dtype."""

import pytest
import torch
from naive import naive_rms_norm

from mm_rec.norms import GroupRMSNorm, RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_definition(dtype):
    g = torch.Generator().manual_seed(21)
    norm = RMSNorm(12, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(12, generator=g))
    x = (3.0 * torch.randn(2, 5, 12, generator=g)).to(dtype)
    out = norm(x)
    assert out.dtype == dtype
    expected = naive_rms_norm(x.double(), norm.weight.double(), 1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8  # bf16: the output's own rounding
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_group_rms_norm_normalises_each_head_alone():
    """h [B, T, H * d_h]: each head's d_h channels are normalised on their own, then scaled by
    the weight; the output is float32. Head 0 is 100x the others: one norm over all heads would
    shrink them."""
    g = torch.Generator().manual_seed(22)
    H, dh = 3, 4
    norm = GroupRMSNorm(H * dh, H, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(H * dh, generator=g))
    h = torch.randn(2, 5, H * dh, generator=g)
    h[..., :dh] *= 100.0  # head 0 far larger than the others
    out = norm(h.bfloat16())
    assert out.dtype == torch.float32
    heads = h.bfloat16().double().unflatten(-1, (H, dh))
    expected = naive_rms_norm(heads, 1.0, 1e-6).flatten(-2) * norm.weight.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
