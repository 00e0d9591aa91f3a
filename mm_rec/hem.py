"""HEM: every per-token projection of a block in ONE GEMM (docs/ARCHITECTURE.md section 1).

u [B, T, d] -> q, k, v, z (d each), g~ (d, "input" gate mode only), p (pe_dim).
``use_hem=True`` holds one ``W_fused = nn.Linear(d, 5d + pe_dim)`` (4d + pe_dim in "state"
mode, where the gate reads h_{t-1} and cannot be fused); ``use_hem=False`` holds the
same maps as separate linears named after the seed (W_q, W_k, W_v, W_z, W_g, W_p).
``convert_hem_state_dict`` maps one layout's weights onto the other.
"""

from __future__ import annotations

import math
import re
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn


class Projections(NamedTuple):
    q: Tensor
    k: Tensor
    v: Tensor
    z: Tensor
    gate: Optional[Tensor]  # g~ before the sigmoid; None in "state" gate mode
    p: Tensor


def projection_layout(hidden_size: int, pe_dim: int, recurrence_gate: str) -> List[Tuple[str, int]]:
    """(name, width) of each slice of W_fused, in order."""
    names = ["q", "k", "v", "z"] + (["g"] if recurrence_gate == "input" else []) + ["p"]
    return [(name, pe_dim if name == "p" else hidden_size) for name in names]


def xavier_uniform_rows_(weight: Tensor, bias: Optional[Tensor], sizes: List[int]) -> None:
    """Xavier-uniform init of each row block of ``weight`` as its own matrix; zero bias.

    Skips parameters that transformers already loaded from a checkpoint.
    """
    if getattr(weight, "_is_hf_initialized", False):
        return
    fan_in = weight.shape[1]
    with torch.no_grad():
        start = 0
        for size in sizes:
            bound = math.sqrt(6.0 / (fan_in + size))
            weight[start:start + size].uniform_(-bound, bound)
            start += size
        if bias is not None:
            bias.zero_()


class HEMProjection(nn.Module):
    def __init__(self, hidden_size: int, pe_dim: int, recurrence_gate: str, use_hem: bool):
        super().__init__()
        self.use_hem = use_hem
        self.layout = projection_layout(hidden_size, pe_dim, recurrence_gate)
        # Each linear carries ``xavier_rows``: the slices _init_weights initialises independently.
        if use_hem:
            self.W_fused = nn.Linear(hidden_size, sum(w for _, w in self.layout), bias=True)
            self.W_fused.xavier_rows = [w for _, w in self.layout]
        else:
            for name, width in self.layout:
                linear = nn.Linear(hidden_size, width, bias=True)
                linear.xavier_rows = [width]
                setattr(self, f"W_{name}", linear)

    def forward(self, u: Tensor) -> Projections:
        """u: [B, T, d] -> Projections of [B, T, width] each."""
        if self.use_hem:
            parts = torch.split(self.W_fused(u), [w for _, w in self.layout], dim=-1)
            out: Dict[str, Tensor] = {name: part for (name, _), part in zip(self.layout, parts)}
        else:
            out = {name: getattr(self, f"W_{name}")(u) for name, _ in self.layout}
        return Projections(out["q"], out["k"], out["v"], out["z"], out.get("g"), out["p"])


_FUSED_KEY = re.compile(r"^(?P<prefix>.*\.)?hem\.W_fused\.(?P<kind>weight|bias)$")
_SPLIT_KEY = re.compile(r"^(?P<prefix>.*\.)?hem\.W_(?P<name>[qkvzgp])\.(?P<kind>weight|bias)$")


def convert_hem_state_dict(state_dict: Dict[str, Tensor], config, to_fused: bool) -> Dict[str, Tensor]:
    """Map a state dict between the fused (use_hem=True) and the separate layout.

    Returns a new dict; keys that are not HEM projections are passed through unchanged.
    Raises ValueError when a tensor has the wrong shape for ``config``.
    """
    layout = projection_layout(config.hidden_size, config.pe_dim, config.recurrence_gate)
    widths = [w for _, w in layout]
    out: Dict[str, Tensor] = {}
    groups: Dict[Tuple[str, str], Dict[str, Tensor]] = {}
    for key, tensor in state_dict.items():
        match = (_SPLIT_KEY if to_fused else _FUSED_KEY).match(key)
        if match is None:
            out[key] = tensor
            continue
        prefix = match.group("prefix") or ""
        if to_fused:
            groups.setdefault((prefix, match.group("kind")), {})[match.group("name")] = tensor
            continue
        if tensor.shape[0] != sum(widths):
            raise ValueError(f"{key} has {tensor.shape[0]} rows, expected {sum(widths)} (= layout {layout})")
        for (name, _), part in zip(layout, torch.split(tensor, widths, dim=0)):
            out[f"{prefix}hem.W_{name}.{match.group('kind')}"] = part.clone()
    for (prefix, kind), parts in groups.items():
        missing = [name for name, _ in layout if name not in parts]
        if missing:
            raise ValueError(f"cannot fuse {prefix}hem: missing W_{missing} {kind} for recurrence_gate={config.recurrence_gate!r}")
        for name, width in layout:
            if parts[name].shape[0] != width:
                raise ValueError(f"{prefix}hem.W_{name}.{kind} has {parts[name].shape[0]} rows, expected {width}")
        out[f"{prefix}hem.W_fused.{kind}"] = torch.cat([parts[name] for name, _ in layout], dim=0)
    return out
