"""MMRecCache: the whole recurrent state of a stream (docs/ARCHITECTURE.md section 3).

Per layer (``LayerState``): the fp32 state h (the recurrence's), the short convolution's window
of the last K - 1 real inputs of its C channels (conv.py; empty without it) and the ``MemoryState`` (the memory
attention's: the open block's sums and count, the completed block summaries of the current
segment, the long-term slots).
Per row: the position of the next real token. Nothing grows with the context: decoding a
token reads only this.
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass, fields
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.utils._pytree as pytree
from safetensors.torch import load_file, save_file
from torch import Tensor

from .conv import conv_channels
from .memory import MemoryState, memory_folds, with_pending_fold

# 2 added each layer's ``conv``; version-1 files (no conv) still load for models without one.
# 3 added the memory's accumulated fold (fold_*), which older files get recomputed from their slots and summaries.
CACHE_FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
_FOLD_FIELDS = ("fold_key_sum", "fold_value_sum", "fold_keep")
CACHE_FILE_FORMAT = "mmrec-cache"


@dataclass
class LayerState:
    """One layer's state for B rows: the level-0 state ``h`` [B, d] (float32), owned by the
    recurrence (recurrence.py); ``conv`` [B, K-1, C] (float32), the short convolution's last
    K - 1 real inputs, oldest first (conv.py; C = ``conv_channels(config)``: d with
    ``short_conv_inputs="all"``, the widths of z, g~, p with "recurrence"; [B, 0, d] with
    ``short_conv_size`` 0); and the
    hierarchical ``memory`` (``MemoryState``), owned by the memory attention (memory.py). On disk
    and in a CUDA graph it is the flat tensors of ``tensors()``, in the order of ``LayerState.shapes``."""

    h: Tensor
    conv: Tensor
    memory: MemoryState

    @staticmethod
    def shapes(batch_size: int, hidden_size: int, blocks_per_segment: int, num_slots: int,
               short_conv_size: int = 0, conv_channels: Optional[int] = None) -> Dict[str, tuple]:
        """The shape of every tensor, by name: the one statement of the state's shape contract.
        conv_channels: C, the conv window's channels (default hidden_size)."""
        conv = (batch_size, max(short_conv_size - 1, 0), hidden_size if conv_channels is None else conv_channels)
        return {"h": (batch_size, hidden_size), "conv": conv,
                **MemoryState.shapes(batch_size, hidden_size, blocks_per_segment, num_slots)}

    @staticmethod
    def config_shapes(config, batch_size: int) -> Dict[str, tuple]:
        """``shapes`` for a model of ``config``."""
        return LayerState.shapes(batch_size, config.hidden_size, config.blocks_per_segment, config.num_memory_slots,
                                 getattr(config, "short_conv_size", 0), conv_channels(config))

    @staticmethod
    def names() -> List[str]:
        """The tensors' names, in the order of ``shapes`` and ``tensors()``."""
        return ["h", "conv", *(f.name for f in fields(MemoryState))]

    def tensors(self) -> Dict[str, Tensor]:
        return {"h": self.h, "conv": self.conv, **self.memory.tensors()}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> "LayerState":
        return cls(h=tensors["h"], conv=tensors["conv"],
                   memory=MemoryState(**{f.name: tensors[f.name] for f in fields(MemoryState)}))

    def map(self, fn) -> "LayerState":
        return LayerState.from_tensors({name: fn(t) for name, t in self.tensors().items()})


class MMRecCache:
    """The recurrent state of a batch of streams.

    Returned by the model when ``use_cache=True``; pass it back (as ``cache=`` or
    ``past_key_values=``) to continue the streams exactly where they stopped.
    """

    is_compileable = False
    # Every copy of this code (the package, a checkpoint's transformers_modules copy) defines its
    # own class; is_mmrec_cache recognises any of them by this marker.
    _mmrec_cache_format = CACHE_FORMAT_VERSION

    def __init__(self, layers: List[LayerState], position: Tensor, stale_folds: bool = False):
        self.layers = layers
        self.position = position  # [B] long: the next real token's position per row
        # read from a file older than the fold fields without a config: the model recomputes them
        # (``refresh_folds``) before its first step
        self.stale_folds = stale_folds

    def refresh_folds(self, config) -> None:
        """Recompute every layer's accumulated fold from its slots and summaries, for ``config``'s memory."""
        folds = memory_folds(config.memory_levels)
        self.layers = [LayerState(h=layer.h, conv=layer.conv,
                                  memory=with_pending_fold(layer.memory, config.memory_decay, folds))
                       for layer in self.layers]
        self.stale_folds = False

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
        return type(self)([layer.map(lambda t: t.detach()) for layer in self.layers], self.position.detach())

    def to(self, device=None) -> "MMRecCache":
        return type(self)([layer.map(lambda t: t.to(device)) for layer in self.layers], self.position.to(device))

    # ------------------------------------------------------------------ disk
    def save(self, path: str | os.PathLike, metadata: Optional[Mapping[str, str]] = None) -> None:
        """Write the cache to one safetensors file, atomically: a temporary file in the same
        folder, renamed over ``path`` once complete; on any error it is removed. The file gets the
        mode of any new file (0666 less the umask), or keeps the mode of the file it replaces.
        ``metadata``: extra string entries stored in the file's header (``load_metadata`` reads
        them back), e.g. which model wrote the state; the cache's own entries cannot be replaced."""
        path = os.fspath(path)
        if os.path.isdir(path):
            raise ValueError(f"MMRecCache.save: path {path!r} is a directory, expected a file name")
        meta = {"format": CACHE_FILE_FORMAT, "version": str(CACHE_FORMAT_VERSION), "num_layers": str(len(self.layers))}
        extra = dict(metadata or {})
        clash = sorted(meta.keys() & extra.keys())
        if clash:
            raise ValueError(f"MMRecCache.save: metadata may not set the cache's own entries {clash}")
        bad = sorted(k for k, v in extra.items() if not (isinstance(k, str) and isinstance(v, str)))
        if bad:
            raise ValueError(f"MMRecCache.save: metadata keys and values must be strings, got {bad}")
        tensors = {"position": self.position.detach().contiguous()}
        for i, layer in enumerate(self.layers):
            for name, t in layer.tensors().items():
                tensors[f"layers.{i}.{name}"] = t.detach().contiguous()
        tmp, mode = _new_temporary(path)
        try:
            save_file(tensors, tmp, metadata={**extra, **meta})
            os.chmod(tmp, mode)  # safetensors writes its files 0600
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @staticmethod
    def load_metadata(path: str | os.PathLike) -> Dict[str, str]:
        """The string entries of a cache file's header (those ``save`` wrote, its ``metadata``
        included), read without its tensors; ValueError for a folder or a file that is not a
        readable safetensors file."""
        from safetensors import safe_open

        _check_not_a_folder(path)
        try:
            with safe_open(os.fspath(path), framework="pt") as handle:
                return dict(handle.metadata() or {})
        except Exception as err:  # safetensors raises its own types for corrupt files
            raise ValueError(f"cannot read an MMRecCache from {os.fspath(path)!r}: {err}") from err

    @classmethod
    def load(cls, path: str | os.PathLike, config=None, device=None) -> "MMRecCache":
        """Read a cache written by ``save``; every field is checked (ValueError naming it).
        With ``config``, also check it fits that model."""
        meta = cls.load_metadata(path)
        try:
            tensors = load_file(os.fspath(path), device=str(device) if device is not None else "cpu")
        except Exception as err:  # safetensors raises its own types for corrupt files
            raise ValueError(f"cannot read an MMRecCache from {os.fspath(path)!r}: {err}") from err
        where = f"MMRecCache file {path!r}"
        if meta.get("format") != CACHE_FILE_FORMAT:
            raise ValueError(f"{path!r} is not an MMRecCache file (metadata {meta})")
        version = _int_field(meta, "version", where)
        if version not in READABLE_VERSIONS:
            newer = " (written by a newer mm_rec)" if version > CACHE_FORMAT_VERSION else ""
            raise ValueError(f"{where} has format version {version}{newer}; this mm_rec reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))}")
        num_layers = _int_field(meta, "num_layers", where)
        if num_layers < 1:
            raise ValueError(f"{where}: num_layers must be at least 1, got {num_layers}")
        names = LayerState.names()
        if version == 1:  # before the short convolution: its window is empty
            if config is not None and getattr(config, "short_conv_size", 0) > 0:
                raise ValueError(f"{where} has format version 1, written before the short convolution: it holds no "
                                 f"conv state, but the model has short_conv_size={config.short_conv_size}")
            names = [n for n in names if n != "conv"]
        if version < 3:  # before the accumulated fold: recomputed below
            names = [n for n in names if n not in _FOLD_FIELDS]
        expected = {"position"} | {f"layers.{i}.{n}" for i in range(num_layers) for n in names}
        missing, extra = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
        if missing:
            raise ValueError(f"{where} (num_layers={num_layers}) is missing tensors {missing}")
        if extra:
            raise ValueError(f"{where} (num_layers={num_layers}) has unexpected tensors {extra}")
        layers = []
        for i in range(num_layers):
            flat = {n: tensors[f"layers.{i}.{n}"] for n in names}
            if version == 1:
                flat["conv"] = _empty_conv(flat["h"])
            if version < 3:
                slots = flat["slot_keys"]
                flat.update(fold_key_sum=torch.zeros_like(slots), fold_value_sum=torch.zeros_like(slots),
                            fold_keep=slots.new_ones(slots.shape[:2]))
            layers.append(LayerState.from_tensors(flat))
        cache = cls(layers, tensors["position"], stale_folds=version < 3)
        cache.check_consistent(where)
        if config is not None:
            cache.check_compatible(config, cache.batch_size)
            if cache.stale_folds:
                cache.refresh_folds(config)
        return cache

    def check_consistent(self, where: str = "MMRecCache") -> None:
        """Raise ValueError unless every tensor has the dtype and a shape consistent with the others
        (one B, d, C, S across layers) and the positions and counts are not negative."""
        position = self.position
        if position.dim() != 1 or position.shape[0] < 1 or position.dtype != torch.long:
            raise ValueError(f"{where}: position must be a [B] int64 tensor with B >= 1, "
                             f"got {position.dtype} {tuple(position.shape)}")
        if not self.layers:
            raise ValueError(f"{where}: the cache has no layers")
        h, conv, memory = self.layers[0].h, self.layers[0].conv, self.layers[0].memory
        if h.dim() != 2 or conv.dim() != 3 or memory.block_keys.dim() != 3 or memory.slot_keys.dim() != 3:
            raise ValueError(f"{where} layer 0: h, conv, block_keys, slot_keys must be [B, d], [B, K-1, C'], [B, C, d], "
                             f"[B, S, d], got {tuple(h.shape)}, {tuple(conv.shape)}, {tuple(memory.block_keys.shape)}, "
                             f"{tuple(memory.slot_keys.shape)}")
        B, d, C, S = position.shape[0], h.shape[1], memory.block_keys.shape[1], memory.slot_keys.shape[1]
        self._check_layers(where, LayerState.shapes(B, d, C, S, conv.shape[1] + 1, conv.shape[2]))
        if bool((position < 0).any()) or any(bool((layer.memory.open_count < 0).any() | (layer.memory.block_count < 0).any())
                                              for layer in self.layers):
            raise ValueError(f"{where}: position, open_count and block_count must not be negative")

    def check_compatible(self, config, batch_size: int) -> None:
        """Raise ValueError unless this cache belongs to a model of ``config`` and ``batch_size`` rows."""
        if len(self.layers) != config.num_hidden_layers:
            raise ValueError(f"cache has {len(self.layers)} layers, the model has {config.num_hidden_layers}")
        if self.batch_size != batch_size:
            raise ValueError(f"cache holds {self.batch_size} rows but the input has batch size {batch_size}")
        conv_fields = (f" (the model has short_conv_size={getattr(config, 'short_conv_size', 0)}, "
                       f"short_conv_inputs={getattr(config, 'short_conv_inputs', 'all')!r})")
        self._check_layers("cache", LayerState.config_shapes(config, batch_size), {"conv": conv_fields})

    def _check_layers(self, where: str, expected: Dict[str, tuple], hints: Optional[Mapping[str, str]] = None) -> None:
        """hints: text to add, by tensor name, to a shape error (the config fields that set it)."""
        for i, layer in enumerate(self.layers):
            for name, t in layer.tensors().items():
                if tuple(t.shape) != expected[name]:
                    raise ValueError(f"{where} layer {i} {name} has shape {tuple(t.shape)}, expected {expected[name]}"
                                     + (hints or {}).get(name, ""))
                want = torch.long if name.endswith("count") else torch.float32
                if t.dtype != want:
                    raise ValueError(f"{where} layer {i} {name} has dtype {t.dtype}, expected {want}")


def _check_not_a_folder(path: str | os.PathLike) -> None:
    if os.path.isdir(path):
        raise ValueError(f"cannot read an MMRecCache from {os.fspath(path)!r}: it is a folder, expected a file")


def _new_temporary(path: str) -> Tuple[str, int]:
    """(a new empty file beside ``path``, hidden and uniquely named; the mode the saved file is to
    have): that of an existing ``path`` it replaces, else that of any new file, 0666 less the
    umask (read off the temporary file as created, which needs no process-wide umask call)."""
    folder, name = os.path.split(os.path.abspath(path))
    for _ in range(100):
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        try:
            return tmp, stat.S_IMODE(os.stat(path if os.path.isfile(path) else tmp).st_mode)
        except BaseException:
            os.unlink(tmp)
            raise
    raise FileExistsError(f"cannot create a temporary file beside {path!r}")


def _empty_conv(h: Tensor) -> Tensor:
    """The empty conv window [B, 0, d] of a version-1 file's layer, shaped after its h [B, d]
    (a malformed h is reported by ``check_consistent``)."""
    return h.new_zeros(h.shape[0], 0, h.shape[1]) if h.dim() == 2 else h.new_zeros(0, 0, 0)


def _int_field(meta: Dict[str, str], name: str, where: str) -> int:
    value = meta.get(name)
    if value is None:
        raise ValueError(f"{where} has no {name!r} in its metadata")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{where}: {name} must be an integer, got {value!r}") from None


def is_mmrec_cache(obj) -> bool:
    """True for an MMRecCache of this format from any copy of the code: the package's class and
    the one transformers imports from a checkpoint folder (trust_remote_code) are different
    classes, so ``isinstance`` accepts only one of them."""
    return getattr(type(obj), "_mmrec_cache_format", None) == CACHE_FORMAT_VERSION and hasattr(obj, "layers") \
        and hasattr(obj, "position")


def _register_pytree_nodes() -> None:
    """torch.export flattens a model's inputs and outputs: it sees a cache as its tensors."""
    if MemoryState not in pytree.SUPPORTED_NODES:
        torch.export.register_dataclass(MemoryState, serialized_type_name=f"{__name__}.MemoryState")
    if LayerState not in pytree.SUPPORTED_NODES:
        torch.export.register_dataclass(LayerState, serialized_type_name=f"{__name__}.LayerState")
    if MMRecCache not in pytree.SUPPORTED_NODES:
        pytree.register_pytree_node(
            MMRecCache,
            lambda cache: ([cache.layers, cache.position], None),
            lambda children, _: MMRecCache(list(children[0]), children[1]),
            serialized_type_name=f"{__name__}.MMRecCache",
            flatten_with_keys_fn=lambda cache: (
                [(pytree.GetAttrKey("layers"), cache.layers), (pytree.GetAttrKey("position"), cache.position)], None),
        )


_register_pytree_nodes()
