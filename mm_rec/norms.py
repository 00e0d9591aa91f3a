"""RMS norms: the block's pre-norms and the per-head readout norm of the state.

Both compute in float32 whatever the input dtype, through ``F.rms_norm`` (one fused kernel
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
    """RMS norm per head: h [..., H * d_h] is normalised within each of the H groups.

    Returns float32 (the state is float32); the caller casts to the model dtype.
    """

    def __init__(self, dim: int, num_groups: int, eps: float):
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, h: Tensor) -> Tensor:
        grouped = h.float().unflatten(-1, (self.num_groups, -1))
        normed = F.rms_norm(grouped, (grouped.shape[-1],), eps=self.eps)
        return normed.flatten(-2) * self.weight.float()
