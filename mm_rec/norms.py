"""RMS norms: the block's pre-norms and the per-head readout norm of the state."""

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, computed in float32. x: [..., d]."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


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
        hf = h.float().unflatten(-1, (self.num_groups, -1))
        hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.eps)
        return hf.flatten(-2) * self.weight.float()
