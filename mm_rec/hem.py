"""HEM: every per-token projection of a block in ONE GEMM (docs/ARCHITECTURE.md section 1).

u [B, T, d] -> q, k, v (d each; not with memory_levels="none"), z (d), g~ (d, "input" gate
mode only), og (d, with output_gate), p (pe_dim). ``use_hem=True`` holds one
``W_fused = nn.Linear(d, 6d + pe_dim)`` in the default configuration (one d fewer in "state"
mode, where the gate reads h_{t-1} and cannot be fused, and one fewer without the output gate);
``use_hem=False`` holds the same maps as separate linears, one per projection (W_q, W_k, W_v,
W_z, W_g, W_og, W_p).
``convert_hem_state_dict`` maps one layout's weights onto the other.
"""

from __future__ import annotations

import math
import re
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn


class Projections(NamedTuple):
    q: Optional[Tensor]  # q, kv: None with memory_levels="none"
    kv: Optional[Tensor]  # k then v, [..., 2d]: one slice of the fused output, as the memory reads them
    z: Tensor
    gate: Optional[Tensor]  # g~ before the sigmoid; None in "state" gate mode
    out_gate: Optional[Tensor]  # og before the silu; None without output_gate
    p: Tensor


def projection_layout(config) -> List[Tuple[str, int]]:
    """(name, width) of each slice of W_fused, in order."""
    names = (["q", "k", "v"] if config.memory_levels != "none" else []) + ["z"]
    names += (["g"] if config.recurrence_gate == "input" else []) + (["og"] if config.output_gate else []) + ["p"]
    return [(name, config.pe_dim if name == "p" else config.hidden_size) for name in names]


def xavier_uniform_rows(weight: Tensor, sizes: List[int]) -> Tensor:
    """A new tensor like ``weight`` [out, in] whose row blocks of ``sizes`` are each drawn
    Xavier-uniform as a matrix of their own (q, k, v, ... keep their own scale in one GEMM)."""
    rows = [torch.empty(size, weight.shape[1], dtype=weight.dtype, device=weight.device).uniform_(
        -math.sqrt(6.0 / (weight.shape[1] + size)), math.sqrt(6.0 / (weight.shape[1] + size))) for size in sizes]
    return torch.cat(rows)


class HEMProjection(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden_size = config.hidden_size
        self.use_hem = use_hem = config.use_hem
        self.layout = projection_layout(config)
        if use_hem:
            self.W_fused = nn.Linear(hidden_size, sum(w for _, w in self.layout), bias=True)
            # k and v are adjacent rows of W_fused: forward splits them off as one slice, named "k"
            width = dict(self.layout)
            self.split_names = [name for name, _ in self.layout if name != "v"]
            self.split_sizes = [width[name] + width["v"] if name == "k" else width[name] for name in self.split_names]
        else:
            for name, width in self.layout:
                setattr(self, f"W_{name}", nn.Linear(hidden_size, width, bias=True))

    def row_blocks(self) -> List[Tuple[nn.Linear, List[int]]]:
        """Each linear with the widths of the projections it stacks (initialised one by one)."""
        if self.use_hem:
            return [(self.W_fused, [w for _, w in self.layout])]
        return [(getattr(self, f"W_{name}"), [width]) for name, width in self.layout]

    def forward(self, u: Tensor) -> Projections:
        """u: [B, T, d] -> Projections of [B, T, width] each."""
        if self.use_hem:
            out: Dict[str, Tensor] = dict(zip(self.split_names, torch.split(self.W_fused(u), self.split_sizes, dim=-1)))
            kv = out.get("k")
        else:
            out = {name: getattr(self, f"W_{name}")(u) for name, _ in self.layout}
            kv = torch.cat([out["k"], out["v"]], -1) if "k" in out else None
        return Projections(out.get("q"), kv, out["z"], out.get("g"), out.get("og"), out["p"])


_FUSED_KEY = re.compile(r"^(?P<prefix>.*\.)?hem\.W_fused\.(?P<kind>weight|bias)$")
_SPLIT_KEY = re.compile(r"^(?P<prefix>.*\.)?hem\.W_(?P<name>og|[qkvzgp])\.(?P<kind>weight|bias)$")


def convert_hem_state_dict(state_dict: Dict[str, Tensor], config, to_fused: bool) -> Dict[str, Tensor]:
    """Map a state dict between the fused (use_hem=True) and the separate layout.

    Returns a new dict; keys that are not HEM projections are passed through unchanged.
    Raises ValueError when a tensor has the wrong shape for ``config``.
    """
    layout = projection_layout(config)
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
            raise ValueError(f"cannot fuse {prefix}hem: missing W_{missing} {kind} "
                             f"for recurrence_gate={config.recurrence_gate!r}")
        for name, width in layout:
            if parts[name].shape[0] != width:
                raise ValueError(f"{prefix}hem.W_{name}.{kind} has {parts[name].shape[0]} rows, expected {width}")
        out[f"{prefix}hem.W_fused.{kind}"] = torch.cat([parts[name] for name, _ in layout], dim=0)
    return out
