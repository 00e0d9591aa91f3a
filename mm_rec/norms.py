"""RMS norms: the block's pre-norms and the per-head readout norm of the state.

Both normalise in float32 whatever the input dtype, through ``F.rms_norm`` (one fused kernel
forward and backward on CUDA instead of a chain of elementwise ones).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, computed in float32. x: [..., d]."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class GroupRMSNorm(nn.Module):
    """RMS norm per head: h [..., H * d_h] is normalised within each of the H groups (in float32, the
    state's dtype), then scaled in ``dtype`` (default float32), the dtype its reader computes in."""

    def __init__(self, dim: int, num_groups: int, eps: float):
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, h: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        grouped = h.float().unflatten(-1, (self.num_groups, -1))
        normed = F.rms_norm(grouped, (grouped.shape[-1],), eps=self.eps)
        # scaled after the cast: the backward keeps the normalised h in ``dtype``, not in float32
        return normed.flatten(-2).to(dtype) * self.weight.to(dtype)
