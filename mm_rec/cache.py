"""MMRecCache: the whole recurrent state of a stream (docs/ARCHITECTURE.md section 3).

Per layer (``LayerState``): the fp32 state h; the running sums and count of the open
memory block; the completed block summaries of the current segment; the long-term slots.
Per row: the position of the next real token. Nothing grows with the context: decoding a
token reads only this.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from typing import Dict, List, Optional

import torch
from torch import Tensor

from safetensors.torch import load_file, save_file

CACHE_FORMAT_VERSION = 1


@dataclass
class LayerState:
    """Shapes: B rows, d = hidden_size, C = blocks per segment, S = memory slots. All float32
    except the counts (long)."""

    h: Tensor  # [B, d]
    open_key_sum: Tensor  # [B, d]
    open_value_sum: Tensor  # [B, d]
    open_count: Tensor  # [B]
    block_keys: Tensor  # [B, C, d] completed block summaries of the current segment
    block_values: Tensor  # [B, C, d]
    block_count: Tensor  # [B] how many of the C summaries are filled
    slot_keys: Tensor  # [B, S, d] long-term memory
    slot_values: Tensor  # [B, S, d]

    @classmethod
    def fresh(cls, batch_size: int, hidden_size: int, blocks_per_segment: int,
              slot_keys: Tensor, slot_values: Tensor) -> "LayerState":
        """The state before any token: zeros, and the layer's learned slots [S, d]."""
        kw = dict(device=slot_keys.device, dtype=torch.float32)
        B, d, C = batch_size, hidden_size, blocks_per_segment
        return cls(
            h=torch.zeros(B, d, **kw),
            open_key_sum=torch.zeros(B, d, **kw),
            open_value_sum=torch.zeros(B, d, **kw),
            open_count=torch.zeros(B, dtype=torch.long, device=slot_keys.device),
            block_keys=torch.zeros(B, C, d, **kw),
            block_values=torch.zeros(B, C, d, **kw),
            block_count=torch.zeros(B, dtype=torch.long, device=slot_keys.device),
            slot_keys=slot_keys.float()[None].expand(B, -1, -1),
            slot_values=slot_values.float()[None].expand(B, -1, -1),
        )

    def tensors(self) -> Dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def map(self, fn) -> "LayerState":
        return LayerState(**{name: fn(t) for name, t in self.tensors().items()})


class MMRecCache:
    """The recurrent state of a batch of streams.

    Returned by the model when ``use_cache=True``; pass it back (as ``cache=`` or
    ``past_key_values=``) to continue the streams exactly where they stopped.
    """

    is_compileable = False

    def __init__(self, layers: List[LayerState], position: Tensor):
        self.layers = layers
        self.position = position  # [B] long: the next real token's position per row

    @classmethod
    def fresh(cls, config, batch_size: int, slot_params: List[tuple]) -> "MMRecCache":
        layers = [
            LayerState.fresh(batch_size, config.hidden_size, config.blocks_per_segment, k, v)
            for k, v in slot_params
        ]
        device = slot_params[0][0].device
        return cls(layers, torch.zeros(batch_size, dtype=torch.long, device=device))

    @property
    def is_linear(self) -> List[bool]:
        """Every layer's state is recurrent (no per-token KV entries): generate() must not slice
        its inputs by a past length."""
        return [True] * len(self.layers)

    @property
    def batch_size(self) -> int:
        return self.position.shape[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The longest stream's number of real tokens (what generate() asks of a cache)."""
        return int(self.position.max()) if self.position.numel() else 0

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Select rows in place (beam search)."""
        self.layers = [layer.map(lambda t: t.index_select(0, beam_idx.to(t.device))) for layer in self.layers]
        self.position = self.position.index_select(0, beam_idx.to(self.position.device))

    def detach(self) -> "MMRecCache":
        return MMRecCache([layer.map(lambda t: t.detach()) for layer in self.layers], self.position.detach())

    def to(self, device=None) -> "MMRecCache":
        return MMRecCache([layer.map(lambda t: t.to(device)) for layer in self.layers], self.position.to(device))

    # ------------------------------------------------------------------ disk
    def save(self, path: str | os.PathLike) -> None:
        """Write the cache to one safetensors file (atomically: a crash leaves no half file)."""
        tensors = {"position": self.position.contiguous()}
        for i, layer in enumerate(self.layers):
            for name, t in layer.tensors().items():
                tensors[f"layers.{i}.{name}"] = t.detach().contiguous()
        meta = {"format": "mmrec-cache", "version": str(CACHE_FORMAT_VERSION), "num_layers": str(len(self.layers))}
        tmp = f"{os.fspath(path)}.tmp"
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, config=None, device=None) -> "MMRecCache":
        """Read a cache written by ``save``. With ``config``, check it fits that model."""
        from safetensors import safe_open

        try:
            with safe_open(os.fspath(path), framework="pt") as handle:
                meta = handle.metadata() or {}
            tensors = load_file(os.fspath(path), device=str(device) if device is not None else "cpu")
        except Exception as err:  # safetensors raises its own types for corrupt files
            raise ValueError(f"cannot read an MMRecCache from {path!r}: {err}") from err
        if meta.get("format") != "mmrec-cache":
            raise ValueError(f"{path!r} is not an MMRecCache file (metadata {meta})")
        num_layers = int(meta["num_layers"])
        names = [f.name for f in fields(LayerState)]
        try:
            layers = [LayerState(**{n: tensors[f"layers.{i}.{n}"] for n in names}) for i in range(num_layers)]
            cache = cls(layers, tensors["position"])
        except KeyError as err:
            raise ValueError(f"MMRecCache file {path!r} is missing tensor {err}") from err
        if config is not None:
            cache.check_compatible(config, cache.batch_size)
        return cache

    def check_compatible(self, config, batch_size: int) -> None:
        """Raise ValueError unless this cache belongs to a model of ``config`` and ``batch_size`` rows."""
        if len(self.layers) != config.num_hidden_layers:
            raise ValueError(f"cache has {len(self.layers)} layers, the model has {config.num_hidden_layers}")
        if self.batch_size != batch_size:
            raise ValueError(f"cache holds {self.batch_size} rows but the input has batch size {batch_size}")
        d, C, S = config.hidden_size, config.blocks_per_segment, config.num_memory_slots
        expected = {
            "h": (batch_size, d), "open_key_sum": (batch_size, d), "open_value_sum": (batch_size, d),
            "open_count": (batch_size,), "block_keys": (batch_size, C, d), "block_values": (batch_size, C, d),
            "block_count": (batch_size,), "slot_keys": (batch_size, S, d), "slot_values": (batch_size, S, d),
        }
        for i, layer in enumerate(self.layers):
            for name, t in layer.tensors().items():
                if tuple(t.shape) != expected[name]:
                    raise ValueError(f"cache layer {i} {name} has shape {tuple(t.shape)}, expected {expected[name]}")
                want = torch.long if name.endswith("count") else torch.float32
                if t.dtype != want:
                    raise ValueError(f"cache layer {i} {name} has dtype {t.dtype}, expected {want}")
