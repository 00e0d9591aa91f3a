"""Whether a checkpoint fits the model it is loaded into (``MMRecPreTrainedModel.from_pretrained``).

transformers re-initialises a tensor whose shape does not match and warns; MM-Rec refuses such a
checkpoint instead, naming the config field that differs.
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional

_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Config fields that set a tensor dimension, in the order they are named when sizes clash.
_WIDTH_FIELDS = ("hidden_size", "intermediate_size", "vocab_size", "pe_dim", "num_memory_slots", "short_conv_size")


def check_loading_info(model, path, loading_info: Mapping, ignore_mismatched_sizes: bool) -> None:
    """Raise ValueError when the checkpoint at ``path`` does not fit ``model``'s config, naming the
    config field: a different number of layers (``num_hidden_layers``), a different layer layout
    (``use_hem`` / ``recurrence_gate`` / ``memory_levels`` / ``short_conv_size``), or (unless
    ``ignore_mismatched_sizes``) other widths (the short convolution's channels:
    ``short_conv_inputs``).

    A tensor the checkpoint lacks inside layers that it has is not an error: transformers has
    initialised it as ``__init__`` would and lists it in ``loading_info["missing_keys"]``
    (transformers' ``output_loading_info``)."""
    where = f"cannot load {type(model).__name__} from {path!r}"
    config = model.config
    missing = set(loading_info.get("missing_keys") or ())
    unexpected = sorted(loading_info.get("unexpected_keys") or ())

    def layer_of(key: str) -> Optional[int]:
        match = _LAYER_KEY.search(key)
        return int(match.group(1)) if match else None

    layer_keys: Dict[int, List[str]] = {}
    for key in model.state_dict():
        if layer_of(key) is not None:
            layer_keys.setdefault(layer_of(key), []).append(key)
    present = {i for i, keys in layer_keys.items() if not missing.issuperset(keys)}
    present |= {layer_of(key) for key in unexpected if layer_of(key) is not None}
    # A checkpoint without any layer tensor has no layer count to disagree with: like any missing
    # tensor, its layers are initialised and reported (transformers' contract).
    saved_layers = max(present) + 1 if present else config.num_hidden_layers
    if saved_layers != config.num_hidden_layers:
        raise ValueError(f"{where}: num_hidden_layers: the checkpoint has {saved_layers} layers, the config "
                         f"{config.num_hidden_layers}")
    in_layers = [key for key in unexpected if layer_of(key) is not None]
    if in_layers:
        fields = [name for name, marker in (("use_hem", "hem.W_"), ("recurrence_gate", "state_gate."),
                                                   ("memory_levels", "memory.slot_"),
                                                   ("short_conv_size", "short_conv.")) if
                  any(marker in key for key in in_layers + sorted(missing))]
        raise ValueError(f"{where}: the checkpoint's layers hold tensors this config has no place for: {in_layers}"
                         + (f"; check {' and '.join(fields)}" if fields else ""))

    mismatched = sorted(loading_info.get("mismatched_keys") or [])
    if mismatched and not ignore_mismatched_sizes:
        described = []
        for key, saved, expected in mismatched:
            sizes = {e for s, e in zip(saved, expected) if s != e} if len(saved) == len(expected) else set(expected)
            fields = [name for name in _WIDTH_FIELDS if getattr(config, name, None) in sizes]
            if key.endswith("short_conv.weight") and saved[:1] != expected[:1]:  # its channels: what it reads
                fields.append("short_conv_inputs")
            fields = fields or ["a width"]
            described.append(f"{' / '.join(fields)}: {key} (checkpoint {tuple(saved)}, model {tuple(expected)})")
        raise ValueError(
            f"{where}: tensor shapes do not match the config: {'; '.join(described)}; "
            "pass ignore_mismatched_sizes=True to re-initialise those tensors instead"
        )
