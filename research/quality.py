"""The model-quality study (issue 15): MM-Rec beside HF Llama and fla HGRN at equal size.

Two studies, each a list of independent runs (one model, one learning rate, one setting):

* ``mqar``: Zoology's multi-query associative recall. Key-value pairs open the sequence, each key
  is queried once later on; the model is scored only at the queries (accuracy = fraction of
  answers predicted exactly, on a fixed seeded test set). One model per setting, as in Zoology's
  figure 2; fresh training batches every step; a run stops early once the test accuracy reaches
  ``stop_accuracy``.
* ``lm``: causal language modelling on the bundled Shakespeare corpus with three whole plays held
  out, byte-level and BPE. Held-out loss and bits per byte every ``eval_every`` steps.

    plan = plan_runs(study="lm", models=("mmrec", "llama"), variants=("mmrec-input",))
    run_plan(plan, out="docs/quality")       # one JSON per run, skipped when already finished
    write_reports("docs/quality")            # lm.md, mqar.md, learning-curve PNGs

Every model is matched to HGRN's parameter count (embedding included, tied embeddings for all)
by its FFN width (``intermediate_size``); hidden size and depth stay equal. MM-Rec variants are
named dicts of MMRecConfig overrides; a variant naming a field MMRecConfig does not have is
refused with a message, not a crash. fla is imported only when an HGRN run needs it.

Training goes through the main job's loop, transformers' Trainer with the project's subclass
(``mm_rec_train.trainer``; ``study_trainer_class`` adds the study's schedule and data order):
AdamW with its weight-decay rule, linear warm-up then cosine decay, gradient clipping at 1, bf16
autocast and fused AdamW on CUDA, seeded: every model sees the same batches in the same order.
Held-out bits per byte are ``mm_rec_train.evaluation``'s, as the main job reports them. Runs
write ``<out>/runs/<name>.json`` atomically when they finish; a finished run is skipped unless
``overwrite``. The name carries a hash of everything that defines the run,
MM-Rec's source code included, so changing the model makes its runs new ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

import mm_rec
from mm_rec import MMRecConfig
from mm_rec_train.evaluation import bits_per_byte, predicted_bytes, token_byte_lengths
from mm_rec_train.runs import PACKAGES

PROTOCOL_VERSION = 1
MODEL_PACKAGE = Path(mm_rec.__file__).resolve().parent
RUNS = "runs"
CACHE = "cache"
INVOCATIONS = "invocations.jsonl"
IGNORE_INDEX = -100

# ----------------------------------------------------------------------------- models and variants

# Every variant is a set of MMRecConfig fields over STUDY_BASE, the design the study started from (MMRecConfig's
# defaults before the study's best choices became them), so a variant name keeps meaning the model its results
# in docs/quality/ were measured on. "hidden_size" stands for the model's width, "hidden_size/4" for a quarter of it.
STUDY_BASE = {"hidden_act": "gelu", "ffn_gate": False, "decay_init_max": 0.1, "pe_dim": "hidden_size/4",
              "memory_block_size": 32, "output_gate": False, "gate_memory": False, "short_conv_size": 0,
              "short_conv_inputs": "all"}
# The second round's choices (output gate, fast and full-width decay, SwiGLU).
_CHOICES = {"output_gate": True, "decay_init_max": 0.5, "pe_dim": "hidden_size", "ffn_gate": True, "hidden_act": "silu"}
MMREC_VARIANTS: Dict[str, dict] = {
    "mmrec-input": {"recurrence_gate": "input"},
    "mmrec-state": {"recurrence_gate": "state"},
    "mmrec-no-memory": {"memory_levels": "none"},
    "mmrec-slots-only": {"memory_levels": "slots"},
    "mmrec-blocks-only": {"memory_levels": "blocks"},
    "mmrec-block16": {"memory_block_size": 16},
    "mmrec-block64": {"memory_block_size": 64},
    "mmrec-block4": {"memory_block_size": 4},
    "mmrec-block1": {"memory_block_size": 1},
    "mmrec-output-gate": {"output_gate": True},
    "mmrec-output-gate-block1": {"output_gate": True, "memory_block_size": 1},
    "mmrec-output-gate-fast-decay": {"output_gate": True, "decay_init_max": 0.5},
    "mmrec-output-gate-full-decay": {"output_gate": True, "pe_dim": "hidden_size"},
    "mmrec-output-gate-fast-full-decay": {"output_gate": True, "decay_init_max": 0.5, "pe_dim": "hidden_size"},
    "mmrec-output-gate-fast-full-decay-swiglu": _CHOICES,
    "mmrec-output-gate-fast-full-decay-swiglu-block1": {**_CHOICES, "memory_block_size": 1},
    "mmrec-output-gate-fast-full-decay-swiglu-gate-memory": {**_CHOICES, "gate_memory": True},
    "mmrec-output-gate-fast-full-decay-swiglu-gate-memory-block1": {**_CHOICES, "gate_memory": True,
                                                                    "memory_block_size": 1},
    # the choices without the memory attention (its q, k, v parameters go to the FFN), and with the seed's state gate
    "mmrec-output-gate-fast-full-decay-swiglu-no-memory": {**_CHOICES, "memory_levels": "none"},
    "mmrec-output-gate-fast-full-decay-swiglu-state-block1": {**_CHOICES, "recurrence_gate": "state",
                                                              "memory_block_size": 1},
    # the choices with a short convolution (width 4) before the fused projection
    "mmrec-output-gate-fast-full-decay-swiglu-conv4": {**_CHOICES, "short_conv_size": 4},
    "mmrec-output-gate-fast-full-decay-swiglu-conv4-block1": {**_CHOICES, "short_conv_size": 4, "memory_block_size": 1},
    # ... convolving only the recurrence's inputs (z, g, p): the memory's q, k, v stay per token
    "mmrec-output-gate-fast-full-decay-swiglu-conv4rec-block1": {**_CHOICES, "short_conv_size": 4,
                                                                 "short_conv_inputs": "recurrence",
                                                                 "memory_block_size": 1},
    # MMRecConfig's defaults (tests/test_quality.py checks they agree): the variant above, the best measured on
    # bytes, with the output gate over the memory read too (docs/ARCHITECTURE.md section 7, "One default architecture")
    "mmrec-default": {**_CHOICES, "short_conv_size": 4, "short_conv_inputs": "recurrence", "memory_block_size": 1,
                      "gate_memory": True},
}
VARIANT_GROUPS = {
    "main": ("mmrec-input", "mmrec-state"),
    "ablations": ("mmrec-no-memory", "mmrec-slots-only", "mmrec-blocks-only", "mmrec-block16", "mmrec-block64",
                  "mmrec-block4", "mmrec-block1", "mmrec-output-gate-fast-full-decay-swiglu-no-memory"),
    "improvements": ("mmrec-output-gate", "mmrec-output-gate-block1", "mmrec-output-gate-fast-decay",
                     "mmrec-output-gate-full-decay", "mmrec-output-gate-fast-full-decay",
                     "mmrec-output-gate-fast-full-decay-swiglu", "mmrec-output-gate-fast-full-decay-swiglu-block1",
                     "mmrec-output-gate-fast-full-decay-swiglu-gate-memory",
                     "mmrec-output-gate-fast-full-decay-swiglu-gate-memory-block1",
                     "mmrec-output-gate-fast-full-decay-swiglu-state-block1",
                     "mmrec-output-gate-fast-full-decay-swiglu-conv4",
                     "mmrec-output-gate-fast-full-decay-swiglu-conv4-block1",
                     "mmrec-output-gate-fast-full-decay-swiglu-conv4rec-block1"),
    "all": tuple(MMREC_VARIANTS),
}
# The sequential gate loops over t in Python: one learning rate (the first of the sweep) only.
SINGLE_LR_VARIANTS = {"mmrec-state", "mmrec-output-gate-fast-full-decay-swiglu-state-block1"}
FAMILIES = ("mmrec", "hgrn", "llama")
# Every family build_model knows: the quality study's plans default to FAMILIES; fla's Gated DeltaNet ("gdn")
# joins in the long-context study (research/long_study.py).
ALL_FAMILIES = (*FAMILIES, "gdn")
FLA_FAMILIES = ("hgrn", "gdn")
FLA_MISSING = "hgrn: fla is not installed (pip install flash-linear-attention); hgrn runs skipped"


def fla_missing(family: str) -> str:
    """The one-line reason a run of an fla family (hgrn, gdn) is skipped where fla is not installed."""
    return FLA_MISSING.replace("hgrn", family)


class RefusedRun(ValueError):
    """A run that cannot be built (unknown config field, bad value, fla missing): skipped, said why."""


def heads_for(hidden_size: int) -> int:
    """Heads of width 64 (one below 128), for Llama's attention and MM-Rec's readout/memory heads."""
    return max(1, hidden_size // 64)


def resolve_overrides(overrides: Optional[dict], hidden_size: int) -> dict:
    """A variant's MMRecConfig fields for one model width: STUDY_BASE, then the overrides; the value
    "hidden_size" stands for that width (e.g. {"pe_dim": "hidden_size"}: a full-width decay generator
    at every size) and "hidden_size/4" for a quarter of it."""
    widths = {"hidden_size": hidden_size, "hidden_size/4": max(1, hidden_size // 4)}
    fields = {**STUDY_BASE, **(overrides or {})}
    return {k: widths.get(v, v) if isinstance(v, str) else v for k, v in fields.items()}


def check_variant(name: str, overrides: dict) -> None:
    """RefusedRun unless every override is a field MMRecConfig accepts (PretrainedConfig would
    silently store an unknown one as an attribute) and the config builds."""
    unknown = MMRecConfig.unknown_fields(overrides)
    if unknown:
        raise RefusedRun(f"variant {name}: MMRecConfig has no field {', '.join(unknown)} (yet); variant skipped")
    try:
        MMRecConfig(**resolve_overrides(overrides, MMRecConfig().hidden_size))
    except ValueError as err:
        raise RefusedRun(f"variant {name}: {' '.join(str(err).split())}; variant skipped") from None


def hgrn_parameter_count(vocab_size: int, hidden_size: int, num_layers: int) -> int:
    """Parameters of fla's ``HGRNForCausalLM(HGRNConfig(vocab_size, hidden_size, num_layers,
    tie_word_embeddings=True))`` with its defaults (expand_ratio 1, no short convolution, learned
    lower bounds, GatedMLP of hidden_ratio 4), without importing fla: embedding V*d, per-layer
    lower bounds L*d, per layer two RMSNorms, i/f/g/o projections 4*d^2, the gated output norm
    d and the SwiGLU MLP 3*d*I (I = 2/3 * 4d rounded up to a multiple of 256), the final norm d."""
    intermediate = int(hidden_size * 4 * 2 / 3)
    intermediate = 256 * ((intermediate + 255) // 256)
    per_layer = 2 * hidden_size + 4 * hidden_size * hidden_size + hidden_size + 3 * hidden_size * intermediate
    return vocab_size * hidden_size + num_layers * hidden_size + num_layers * per_layer + hidden_size


def fla_available() -> bool:
    try:
        import fla  # noqa: F401
    except ImportError:
        return False
    return True


def build_model(family: str, vocab_size: int, hidden_size: int, num_layers: int, intermediate_size: Optional[int],
                overrides: Optional[dict] = None, max_length: int = 4096):
    """An untrained causal LM with tied embeddings. family: "mmrec" (``overrides``: MMRecConfig
    fields), "llama" (SDPA attention, ``max_length`` positions), "hgrn" (fla; ``intermediate_size``
    ignored, HGRN is the size reference) or "gdn" (fla's Gated DeltaNet: heads of ``heads_for``,
    fla's own FFN width, so ``intermediate_size`` is ignored too). Builds on the current default
    device (``torch.device("meta")`` to count)."""
    if family == "mmrec":
        from mm_rec import MMRecForCausalLM

        config = MMRecConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                             num_attention_heads=heads_for(hidden_size), intermediate_size=intermediate_size,
                             tie_word_embeddings=True, **resolve_overrides(overrides, hidden_size))
        return MMRecForCausalLM(config)
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        heads = heads_for(hidden_size)
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                             num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=intermediate_size,
                             max_position_embeddings=max_length, tie_word_embeddings=True, attn_implementation="sdpa")
        return LlamaForCausalLM(config)
    if family == "hgrn":
        try:
            from fla.models import HGRNConfig, HGRNForCausalLM
        except ImportError:
            raise RefusedRun(FLA_MISSING) from None
        # fla's fused norm / SwiGLU / cross-entropy kernels autotune dozens of configurations on first
        # use (minutes per process); their PyTorch forms compute the same model, and HGRN's own
        # recurrence kernel is kept
        return HGRNForCausalLM(HGRNConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                                          tie_word_embeddings=True, fuse_norm=False, fuse_swiglu=False,
                                          fuse_cross_entropy=False))
    if family == "gdn":
        try:
            from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
        except ImportError:
            raise RefusedRun(fla_missing("gdn")) from None
        heads = heads_for(hidden_size)
        # the fused kernels left out as for HGRN; the delta rule's own kernels are kept
        return GatedDeltaNetForCausalLM(GatedDeltaNetConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_heads=heads,
            head_dim=hidden_size // heads, tie_word_embeddings=True, fuse_norm=False, fuse_swiglu=False,
            fuse_cross_entropy=False))
    raise ValueError(f"model family must be one of {ALL_FAMILIES}, got {family!r}")


def count_parameters(model) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())


@lru_cache(maxsize=None)
def _meta_count(family: str, vocab_size: int, hidden_size: int, num_layers: int, intermediate_size: Optional[int],
                overrides_json: str) -> int:
    with torch.device("meta"):
        model = build_model(family, vocab_size, hidden_size, num_layers, intermediate_size, json.loads(overrides_json))
    return count_parameters(model)


def parameter_count(family: str, vocab_size: int, hidden_size: int, num_layers: int,
                    intermediate_size: Optional[int] = None, overrides: Optional[dict] = None) -> int:
    """Total parameters (embedding included) of ``build_model(...)``, counted on the meta device;
    HGRN by ``hgrn_parameter_count`` when fla is not installed; Gated DeltaNet only with fla (else
    RefusedRun), on the CPU where its modules do not build on the meta device."""
    if family == "gdn":
        if not fla_available():
            raise RefusedRun(fla_missing("gdn"))
        try:
            return _meta_count(family, vocab_size, hidden_size, num_layers, None, "{}")
        except RefusedRun:
            raise
        except Exception:
            return count_parameters(build_model(family, vocab_size, hidden_size, num_layers, None))
    if family == "hgrn":
        if fla_available():
            try:
                return _meta_count(family, vocab_size, hidden_size, num_layers, None, "{}")
            except Exception:  # fla's modules may not build on the meta device; the formula is the fallback
                pass
        return hgrn_parameter_count(vocab_size, hidden_size, num_layers)
    return _meta_count(family, vocab_size, hidden_size, num_layers, intermediate_size,
                       json.dumps(overrides or {}, sort_keys=True))


def match_intermediate_size(family: str, target: int, vocab_size: int, hidden_size: int, num_layers: int,
                            overrides: Optional[dict] = None, multiple: int = 32, tolerance: float = 0.10) -> Tuple[int, int]:
    """The FFN width (a multiple of ``multiple``) that brings ``family``'s total parameter count
    closest to ``target``; the count is affine in it, so two counts fix the line. Returns
    (intermediate_size, parameters); ValueError if no width lands within ``tolerance``."""
    a, b = multiple, 4 * hidden_size
    p_a = parameter_count(family, vocab_size, hidden_size, num_layers, a, overrides)
    p_b = parameter_count(family, vocab_size, hidden_size, num_layers, b, overrides)
    slope = (p_b - p_a) / (b - a)
    width = max(multiple, multiple * round((a + (target - p_a) / slope) / multiple))
    count = parameter_count(family, vocab_size, hidden_size, num_layers, width, overrides)
    if abs(count - target) > tolerance * target:
        raise ValueError(f"{family} {overrides or ''}: no intermediate_size brings it within {tolerance:.0%} of "
                         f"{target:,} parameters at hidden {hidden_size}, {num_layers} layers (closest: {width} -> {count:,})")
    return width, count


def refusal_reason(family: str, name: str, overrides: Optional[dict], device: torch.device) -> Optional[str]:
    """Why a model of ``family`` (an MM-Rec variant ``name`` with ``overrides``) cannot run on
    ``device``, in one line, or None: fla missing or not on CUDA, or a variant MMRecConfig refuses."""
    if family in FLA_FAMILIES:
        if not fla_available():
            return fla_missing(family)
        if device.type != "cuda":
            return f"{family}: fla's kernels need CUDA; {family} runs skipped on {device.type}"
    if family == "mmrec":
        try:
            check_variant(name, overrides)
        except RefusedRun as err:
            return str(err)
    return None


def matched_size(family: str, vocab_size: int, hidden_size: int, num_layers: int, overrides: Optional[dict]) -> dict:
    """{"intermediate_size", "parameters", "target_parameters"}: HGRN's count at this vocabulary, width
    and depth is the target; MM-Rec and Llama match it by their FFN width; HGRN and Gated DeltaNet keep
    fla's own."""
    target = parameter_count("hgrn", vocab_size, hidden_size, num_layers)
    if family == "hgrn":
        width, count = None, target
    elif family == "gdn":
        width, count = None, parameter_count("gdn", vocab_size, hidden_size, num_layers)
    else:
        width, count = match_intermediate_size(family, target, vocab_size, hidden_size, num_layers,
                                               overrides if family == "mmrec" else None)
    return {"intermediate_size": width, "parameters": count, "target_parameters": target}


# ----------------------------------------------------------------------------- MQAR data

@dataclasses.dataclass(frozen=True)
class MQARSetting:
    """One MQAR task: ``seq_len`` tokens, ``num_kv_pairs`` pairs. ``power_a``: Zoology's power law
    of the query gaps (0.01: queries mostly right after the pairs; 1.0: uniform)."""

    seq_len: int
    num_kv_pairs: int
    power_a: float = 0.01

    @property
    def name(self) -> str:
        return f"{self.seq_len}x{self.num_kv_pairs}"

    @classmethod
    def parse(cls, text: str, long_from: int = 1024) -> "MQARSetting":
        """"256x64" -> 256 tokens, 64 pairs. Settings of ``long_from`` tokens or more spread their
        queries uniformly (power_a 1), so most queries sit segments away from their keys."""
        try:
            length, pairs = (int(part) for part in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"--settings: expected LENGTHxPAIRS such as 256x64, got {text!r}") from None
        setting = cls(length, pairs, 1.0 if length >= long_from else 0.01)
        setting.check(vocab_size=None)
        return setting

    def check(self, vocab_size: Optional[int]) -> None:
        if self.seq_len <= 0 or self.seq_len % 2 or self.num_kv_pairs <= 0 or 4 * self.num_kv_pairs > self.seq_len:
            raise ValueError(f"MQAR setting {self.name}: the length must be even and hold 4 tokens per pair "
                             "(pairs, then room for a query every other position)")
        if vocab_size is not None and vocab_size <= self.seq_len:
            raise ValueError(f"MQAR setting {self.name}: the vocabulary ({vocab_size}) must exceed the length")
        if vocab_size is not None and vocab_size // 2 - 1 < self.num_kv_pairs:
            raise ValueError(f"MQAR setting {self.name}: {vocab_size // 2 - 1} key tokens cannot give "
                             f"{self.num_kv_pairs} distinct keys")


def mqar_batch(setting: MQARSetting, batch_size: int, vocab_size: int, generator: torch.Generator,
               random_non_queries: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """A batch of Zoology's MQAR on ``generator``'s device.

    Keys are drawn without replacement from [1, V/2), values from [V/2, V). The first 2P tokens
    are k1 v1 k2 v2 ...; every key is then queried once, at position 2P + 2g with distinct gaps g
    drawn from the power law p(g) ~ (g + 1)^(power_a - 1); the other positions hold 0, or random
    tokens with ``random_non_queries``. Returns (inputs, targets), both [B, T] int64: the target
    at a query position is the value paired with that key (what the model must predict there),
    IGNORE_INDEX elsewhere. ``hf_labels`` turns targets into shifted-inside HF labels.
    """
    T, P, V = setting.seq_len, setting.num_kv_pairs, vocab_size
    device = generator.device
    key_vocab = V // 2
    keys = torch.rand(batch_size, key_vocab - 1, generator=generator, device=device).topk(P, dim=1).indices + 1
    values = torch.rand(batch_size, V - key_vocab, generator=generator, device=device).topk(P, dim=1).indices + key_vocab
    context = 2 * P
    space = (T - context) // 2
    weights = setting.power_a * torch.arange(1, space + 1, device=device, dtype=torch.float64) ** (setting.power_a - 1)
    probabilities = (weights / weights.sum()).float().expand(batch_size, space).contiguous()
    gaps = torch.multinomial(probabilities, P, replacement=False, generator=generator)
    inputs = torch.zeros(batch_size, T, dtype=torch.long, device=device)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    queries = context + 2 * gaps
    inputs.scatter_(1, queries, keys)
    targets = torch.full_like(inputs, IGNORE_INDEX).scatter_(1, queries, values)
    if random_non_queries:
        noise = torch.randint(V, inputs.shape, generator=generator, device=device)
        inputs = torch.where(inputs == 0, noise, inputs)
    return inputs, targets


def hf_labels(targets: torch.Tensor) -> torch.Tensor:
    """Targets aligned with the inputs -> HF causal-LM labels (the model shifts them back inside)."""
    labels = torch.full_like(targets, IGNORE_INDEX)
    labels[:, 1:] = targets[:, :-1]
    return labels


def mqar_test_set(setting: MQARSetting, size: int, vocab_size: int, seed: int,
                  random_non_queries: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fixed test set of a setting: drawn on the CPU from ``seed`` (the training batches come
    from another seed), so it is the same on every machine and for every model."""
    generator = torch.Generator().manual_seed(seed)
    return mqar_batch(setting, size, vocab_size, generator, random_non_queries)


# ----------------------------------------------------------------------------- LM data

@dataclasses.dataclass
class LMData:
    """Token rows of one tokenization: train [N, T], held_out [M, T], byte_lengths [vocab]."""

    train: torch.Tensor
    held_out: torch.Tensor
    byte_lengths: torch.Tensor
    vocab_size: int
    held_out_works: List[str]


def lm_data(tokenization: str, seq_len: int, bpe_vocab: int = 4096, validation_fraction: float = 0.05,
            max_works: Optional[int] = None, max_chars: Optional[int] = None, cache_dir: Optional[Path] = None) -> LMData:
    """The Shakespeare corpus in rows of ``seq_len`` tokens, whole works held out (``split_works``;
    0.05 holds out three plays). tokenization: "bytes" (256 bytes + 2 special tokens) or "bpe"
    (``train_tokenizer`` on the training works, ``bpe_vocab`` tokens). Cached in ``cache_dir``."""
    from mm_rec_train.data import byte_level_tokenizer, load_shakespeare, split_works, token_rows, train_tokenizer

    if tokenization not in ("bytes", "bpe"):
        raise ValueError(f"tokenization must be 'bytes' or 'bpe', got {tokenization!r}")
    key = f"lm-{tokenization}{'-' + str(bpe_vocab) if tokenization == 'bpe' else ''}-T{seq_len}-f{validation_fraction}" \
          f"-w{max_works}-c{max_chars}"
    cached = cache_dir / f"{key}.pt" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        return LMData(**torch.load(cached))
    texts = load_shakespeare(max_works)
    if max_chars is not None:
        texts = {name: text[:max_chars] for name, text in texts.items()}
    train_texts, held_out = split_works(texts, validation_fraction)
    tokenizer = byte_level_tokenizer() if tokenization == "bytes" else train_tokenizer(train_texts.values(), bpe_vocab)
    data = LMData(
        train=torch.tensor(token_rows(train_texts.values(), tokenizer, seq_len)),
        held_out=torch.tensor(token_rows(held_out.values(), tokenizer, seq_len)),
        byte_lengths=token_byte_lengths(tokenizer), vocab_size=len(tokenizer), held_out_works=sorted(held_out))
    if cached is not None:
        if not cached.parent.is_dir():
            cached.parent.mkdir(parents=True, exist_ok=True)
            (cached.parent / ".gitignore").write_text("*\n")  # token caches are large and rebuilt on demand
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")  # studies may run side by side
        torch.save(dataclasses.asdict(data), tmp)
        os.replace(tmp, cached)
    return data


def batch_order(num_rows: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """[steps, batch_size] row indices: epoch after epoch of seeded permutations, the same for every model."""
    generator = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    order = torch.cat([torch.randperm(num_rows, generator=generator) for _ in range(-(-needed // num_rows))])
    return order[:needed].view(steps, batch_size)


# ----------------------------------------------------------------------------- evaluation

def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, use_cache=False).logits.float()


@torch.no_grad()
def lm_metrics(model, rows: torch.Tensor, byte_lengths: torch.Tensor, batch_size: int = 32) -> Dict[str, float]:
    """Held-out cross-entropy of ``rows`` [M, T] (each read from a fresh state, the first token of a
    row is context only), in eval mode and float32 (no autocast: the logits are not rounded to
    bf16, the same for every model). Returns loss (nats per predicted token), bits_per_byte
    (``mm_rec_train.evaluation``'s: total nats / ln 2 / UTF-8 bytes of the predicted tokens,
    counted by ``byte_lengths``), tokens, bytes."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nats = torch.zeros((), dtype=torch.float64, device=device)
    for batch in rows.split(batch_size):
        batch = batch.to(device)
        logits = _logits(model, batch)[:, :-1]
        targets = batch[:, 1:]
        nats += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").double()
    model.train(was_training)
    total, tokens, n_bytes = float(nats), rows[:, 1:].numel(), predicted_bytes(rows, byte_lengths=byte_lengths)
    return {"loss": total / tokens, "bits_per_byte": bits_per_byte(total, n_bytes), "tokens": tokens, "bytes": n_bytes}


@torch.no_grad()
def mqar_metrics(model, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 128) -> Dict[str, float]:
    """Accuracy (answers predicted exactly / answers) and loss on the answers of a test set, in
    eval mode and float32. inputs, targets: [N, T] (``mqar_batch``)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, answers, nats = 0, 0, 0.0
    for x, y in zip(inputs.split(batch_size), targets.split(batch_size)):
        x, y = x.to(device), y.to(device)
        logits = _logits(model, x)
        scored = y != IGNORE_INDEX
        picked = logits[scored]
        correct += int((picked.argmax(-1) == y[scored]).sum())
        nats += float(F.cross_entropy(picked, y[scored], reduction="sum"))
        answers += int(scored.sum())
    model.train(was_training)
    return {"accuracy": correct / answers, "loss": nats / answers, "answers": answers}


# ----------------------------------------------------------------------------- training

class BudgetExhausted(Exception):
    """The time budget ran out inside a run; the run is not saved."""


def free_device(device: torch.device) -> None:
    """Hand the CUDA caching allocator's free blocks back (after a run, before the next model)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def attempt(work: Callable[[], dict], label: str, log: Callable[[str], None], device: torch.device,
            unsaved: str = "the run is not saved") -> Tuple[str, Optional[dict]]:
    """One unit of a study's work (a run, a timing): ("done", its record), or, logged with ``label``,
    ("over_budget", None) where the time budget ran out inside it and ("failed", None) where it raised:
    one broken model (OOM, a kernel that fails to compile) must not end the study. The device's cache
    is freed after either."""
    try:
        return "done", work()
    except BudgetExhausted as err:
        log(f"budget: {err}; {unsaved}")
    except Exception as err:
        log(f"failed: {label}: {type(err).__name__}: {' '.join(str(err).split())[:300]}")
        free_device(device)
        return "failed", None
    free_device(device)
    return "over_budget", None


def log_invocation(out: Path, command: str, device_name: str, started: float, counts: Dict[str, int],
                   refusals: Optional[Sequence[str]] = None) -> float:
    """Append this call's line to ``out``/invocations.jsonl (the command, device, versions, commit, start,
    wall time, the outcome's ``counts`` and, where given, the refusals' reasons); returns the wall seconds."""
    wall = time.time() - started
    entry = {"command": command, "device": device_name, "versions": versions(), "git": git_commit(),
             "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)), "wall_seconds": wall, **counts}
    if refusals is not None:
        entry["refusals"] = sorted(set(refusals))
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / INVOCATIONS, "a", encoding="utf-8") as log_file:
        log_file.write(json.dumps(entry) + "\n")
    return wall


def warmup_cosine(step: int, steps: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class StepBatches(torch.utils.data.IterableDataset):
    """The training data of a run: ``next_batch(step)`` -> (input_ids, HF labels) for step 0 ..
    ``steps - 1``, in that order; one item is one step's whole batch, as the model takes it."""

    def __init__(self, next_batch: Callable[[int], Tuple[torch.Tensor, torch.Tensor]], steps: int):
        self.next_batch, self.steps = next_batch, steps

    def __iter__(self):
        for step in range(self.steps):
            input_ids, labels = self.next_batch(step)
            yield {"input_ids": input_ids, "labels": labels, "use_cache": False}


def study_arguments(output_dir: str, steps: int, lr: float, weight_decay: float, device: torch.device, seed: int = 0,
                    batch_size: Optional[int] = None, compile: Union[bool, str] = False):
    """TrainingArguments of a study run: AdamW (betas 0.9/0.95; fused on CUDA) with weight decay on
    matrices (the Trainer's ``decays`` rule), gradient clipping at 1, ``steps`` steps of one batch
    each on one device; the Trainer evaluates, logs and saves nothing (the study's callback does
    what it needs), no progress bar, no host syncs for logging. ``compile``: the Trainer's
    ``torch_compile`` (the training step through torch.compile); a string is also its mode
    (``torch_compile_mode``: "reduce-overhead" replays the step as CUDA graphs)."""
    from transformers import TrainingArguments

    extra = {} if batch_size is None else {"per_device_train_batch_size": batch_size}
    if isinstance(compile, str):
        from mm_rec_train.runs import CUDA_GRAPH_MODES

        if device.type != "cuda" and compile in CUDA_GRAPH_MODES:
            raise ValueError(f"compile={compile!r} replays CUDA graphs: it needs a CUDA device, not {device}")
        extra["torch_compile_mode"] = compile
    args = TrainingArguments(
        output_dir=output_dir, max_steps=steps, learning_rate=lr, weight_decay=weight_decay, adam_beta1=0.9,
        adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0,
        optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch", use_cpu=device.type != "cuda",
        seed=seed, eval_strategy="no", save_strategy="no", logging_strategy="no", logging_nan_inf_filter=False,
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
        remove_unused_columns=False, accelerator_config={"dispatch_batches": False}, torch_compile=bool(compile), **extra,
    )
    if args.n_gpu > 1:  # one GPU per run: several visible GPUs would make the Trainer split each batch (DataParallel)
        args._n_gpu = 1
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.device != device:
        raise ValueError(f"the study trains on {args.device} (the Trainer's device), not on {device}; "
                         "choose the GPU with CUDA_VISIBLE_DEVICES")
    return args


@lru_cache(maxsize=None)
def study_trainer_class():
    """The main job's Trainer (``mm_rec_train.trainer._trainer_class``) with the study's protocol:
    the warm-up + cosine schedule of ``warmup_cosine``; bf16 autocast around the forward and loss
    on CUDA (the model's own forward stays float32, so the periodic evaluations run in float32); the
    training data as ``StepBatches`` gives it (not shuffled, not batched again); each step's loss
    kept on the device (``step_losses``), read at evaluations only."""
    from torch.utils.data import DataLoader

    from mm_rec_train.trainer import _trainer_class

    class StudyTrainer(_trainer_class()):
        def __init__(self, *args, warmup_steps: int, step_losses: Optional[list] = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.warmup_steps = warmup_steps
            self.step_losses = [] if step_losses is None else step_losses
            # The model's own mean loss over the batch, for every family (fla's models take no loss
            # keywords); with one batch per step it is the Trainer's normalisation anyway.
            self.model_accepts_loss_kwargs = False
            self._non_embedding_parameters = None

        def get_train_dataloader(self):
            return self.accelerator.prepare(DataLoader(self.train_dataset, batch_size=None, num_workers=0))

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                warmup = self.warmup_steps
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer, lambda step: warmup_cosine(step, num_training_steps, warmup))
            return self.lr_scheduler

        def autocast_smart_context_manager(self, cache_enabled: Optional[bool] = True):
            # accelerate's mixed precision (args.bf16) would wrap model.forward in autocast for good
            if self.args.device.type == "cuda":
                return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache_enabled)
            return nullcontext()

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if self.args.torch_compile_mode == "reduce-overhead":
                # the loss lives in the CUDA graphs' memory, which the next step's replay overwrites
                loss = loss.clone()
            self.step_losses.append(loss)
            return loss

        def floating_point_ops(self, inputs) -> int:
            # the Trainer's estimate, with the parameter count taken once rather than every step
            if self._non_embedding_parameters is None:
                self._non_embedding_parameters = self.model.num_parameters(exclude_embeddings=True)
            return 6 * inputs["input_ids"].numel() * self._non_embedding_parameters

    return StudyTrainer


def optimizer_for(model, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """The AdamW a study run trains ``model`` with, built by its Trainer (``study_arguments``;
    building one seeds the global RNG with 0 and places ``model`` on ``device``)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mmrec-study-") as scratch:
        trainer = study_trainer_class()(model=model, args=study_arguments(scratch, 1, lr, weight_decay, device),
                                        warmup_steps=1)
        return trainer.create_optimizer()


def _study_callback(losses: list, evaluate: Callable[[], dict], steps: int, eval_every: int,
                    stop: Optional[Callable[[dict], bool]], deadline: Optional[float], progress: bool, description: str):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class StudyCallback(TrainerCallback):
        """Every ``eval_every`` steps and at the last: {"step", "train_loss" (mean since the last
        evaluation), **evaluate()} into ``curve``; stops the run when the loss is not finite or
        ``stop(metrics)``; raises BudgetExhausted past ``deadline`` (time.time())."""

        def __init__(self):
            self.curve: List[dict] = []
            self.bar = tqdm(total=steps, desc=description, disable=not progress, leave=False, dynamic_ncols=True,
                            mininterval=1.0 if sys.stderr.isatty() else 15.0)

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            self.bar.update()
            if step % eval_every == 0 or step == steps:
                train_loss = float(torch.stack(losses).float().mean())
                losses.clear()
                metrics = evaluate() if math.isfinite(train_loss) else {}
                self.curve.append({"step": step, "train_loss": train_loss, **metrics})
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in self.curve[-1].items()
                                      if k in ("train_loss", "bits_per_byte", "accuracy")})
                if not math.isfinite(train_loss) or (stop is not None and stop(metrics)):
                    control.should_training_stop = True
                    return control
            if deadline is not None and step < steps and time.time() > deadline:
                self.bar.close()
                raise BudgetExhausted(f"the time budget ran out at step {step} of {description}")
            return control

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return StudyCallback()


def train_loop(model, next_batch: Callable[[int], Tuple[torch.Tensor, torch.Tensor]], evaluate: Callable[[], dict],
               steps: int, lr: float, eval_every: int, weight_decay: float = 0.1, warmup_fraction: float = 0.05,
               stop: Optional[Callable[[dict], bool]] = None, deadline: Optional[float] = None,
               progress: bool = True, description: str = "", seed: int = 0,
               batch_size: Optional[int] = None, compile: Union[bool, str] = False) -> Tuple[List[dict], int]:
    """Train ``model`` (already on its device) for ``steps`` steps on ``next_batch(step)`` ->
    (input_ids, HF labels), through the main job's Trainer (``study_trainer_class``); ``evaluate()``
    every ``eval_every`` steps and at the end. Stops early when ``stop(metrics)`` or when the
    training loss is not finite. Returns (curve, steps done): curve entries are {"step",
    "train_loss" (mean since the last evaluation), **metrics}. Raises BudgetExhausted past
    ``deadline`` (time.time()). ``batch_size``: the rows of a batch, for the Trainer's bookkeeping;
    ``compile``: train through torch.compile, a string naming its mode (``study_arguments``)."""
    import tempfile

    from transformers import PrinterCallback

    device = next(model.parameters()).device
    losses: List[torch.Tensor] = []
    callback = _study_callback(losses, evaluate, steps, eval_every, stop, deadline, progress, description)
    try:
        with tempfile.TemporaryDirectory(prefix="mmrec-study-") as scratch:
            trainer = study_trainer_class()(
                model=model, args=study_arguments(scratch, steps, lr, weight_decay, device, seed, batch_size, compile),
                train_dataset=StepBatches(next_batch, steps), callbacks=[callback],
                warmup_steps=max(1, int(warmup_fraction * steps)), step_losses=losses)
            trainer.remove_callback(PrinterCallback)  # it would print the Trainer's closing metrics
            trainer.train()
    finally:
        callback.bar.close()
    return callback.curve, trainer.state.global_step


# ----------------------------------------------------------------------------- protocols and plans

@dataclasses.dataclass
class MQARProtocol:
    """Defaults: Zoology's vocabulary and depth; per-setting batches of ~``tokens_per_batch``
    tokens (Zoology: 512 x 64 ... 128 x 512), at most ``steps`` steps, early stop at 99%."""

    settings: Tuple[str, ...] = ("256x64", "1024x16", "512x128", "4096x16", "64x4", "128x8", "256x16", "512x64", "2048x16")
    widths: Tuple[int, ...] = (128, 256, 64)
    layers: int = 2
    vocab_size: int = 8192
    steps: int = 2000
    tokens_per_batch: int = 32768
    min_batch: int = 8
    max_batch: int = 256
    eval_every: int = 200
    test_size: int = 1000
    stop_accuracy: float = 0.99
    random_non_queries: bool = True
    sequential_max_length: int = 512
    lrs: Tuple[float, ...] = (3e-3, 1e-3, 3e-4)
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    seed: int = 0

    def batch_size(self, seq_len: int) -> int:
        return max(self.min_batch, min(self.max_batch, self.tokens_per_batch // seq_len))


@dataclasses.dataclass
class LMProtocol:
    """The issue's protocol: 800 steps of 32 x 512 tokens, hidden 384, 6 layers, three plays held out."""

    tokenizations: Tuple[str, ...] = ("bytes", "bpe")
    hidden_size: int = 384
    layers: int = 6
    seq_len: int = 512
    batch_size: int = 32
    steps: int = 800
    eval_every: int = 100
    eval_batch_size: int = 32
    bpe_vocab: int = 4096
    validation_fraction: float = 0.05
    max_works: Optional[int] = None
    max_chars: Optional[int] = None
    lrs: Tuple[float, ...] = (2e-3, 1e-3, 4e-3)
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    seed: int = 0


SMOKE_MQAR = dict(settings=("32x4",), widths=(32,), vocab_size=64, steps=6, tokens_per_batch=256, min_batch=8,
                  eval_every=3, test_size=32, lrs=(1e-2, 3e-3))
SMOKE_LM = dict(hidden_size=32, layers=2, seq_len=64, batch_size=4, steps=4, eval_every=2, eval_batch_size=32,
                bpe_vocab=300, max_works=4, max_chars=2000, lrs=(3e-3,))


def code_fingerprint() -> str:
    """Hash of the model's source (every mm_rec/*.py, what a checkpoint carries): MM-Rec runs of
    changed model code are new runs."""
    digest = hashlib.sha1()
    for path in sorted(MODEL_PACKAGE.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


@dataclasses.dataclass
class Run:
    """One training run. ``spec`` (JSON-able) defines it; ``name`` is readable + a hash of spec."""

    study: str
    model: str             # display name: a variant (mmrec-...), "llama" or "hgrn"
    family: str
    lr: float
    spec: dict
    refused: Optional[str] = None
    order: tuple = ()

    @property
    def key(self) -> str:
        """What the run measures, without the learning rate: runs of one key form an LR sweep."""
        return self.spec["setting"]

    @property
    def name(self) -> str:
        digest = hashlib.sha1(json.dumps(self.spec, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.study}-{self.key}-{self.model}-lr{self.lr:g}-{digest}"

    @property
    def params(self) -> Optional[int]:
        return self.spec.get("parameters")


def _model_specs(families: Sequence[str], variants: Sequence[str],
                 extra_variants: Dict[str, dict]) -> List[Tuple[str, str, dict, Optional[str]]]:
    """[(name, family, overrides, refusal)] in the order runs are planned."""
    table = {**MMREC_VARIANTS, **extra_variants}
    specs = []
    for family in families:
        if family not in FAMILIES:
            raise ValueError(f"--models: expected some of {', '.join(FAMILIES)}, got {family!r}")
    if "mmrec" in families:
        for variant in variants:
            if variant not in table:
                raise ValueError(f"--variants: unknown variant {variant!r}; known: {', '.join(table)} "
                                 f"(groups: {', '.join(VARIANT_GROUPS)})")
            refusal = None
            try:
                check_variant(variant, table[variant])
            except RefusedRun as err:
                refusal = str(err)
            specs.append((variant, "mmrec", table[variant], refusal))
    baselines = []
    for family in ("hgrn", "llama"):
        if family in families:
            refusal = None if family != "hgrn" or fla_available() else FLA_MISSING
            baselines.append((family, family, {}, refusal))
    # the first variant against the baselines first, then the other variants; the slow sequential
    # gate last: the comparisons that matter most finish first when the budget is short
    specs = specs[:1] + baselines + specs[1:]
    specs.sort(key=lambda s: s[0] in SINGLE_LR_VARIANTS)
    return specs


def expand_variants(names: Iterable[str]) -> List[str]:
    out: List[str] = []
    for name in names:
        for variant in VARIANT_GROUPS.get(name, (name,)):
            if variant not in out:
                out.append(variant)
    return out


def _sized(family: str, overrides: dict, vocab: int, hidden: int, layers: int, target: int) -> Tuple[Optional[int], int]:
    if family == "hgrn":
        return None, target
    return match_intermediate_size(family, target, vocab, hidden, layers, overrides)


def plan_runs(study: str = "all", models: Sequence[str] = FAMILIES, variants: Sequence[str] = ("main",),
              extra_variants: Optional[Dict[str, dict]] = None, mqar: Optional[MQARProtocol] = None,
              lm: Optional[LMProtocol] = None) -> List[Run]:
    """The runs of ``study`` ("mqar", "lm" or "all"), most informative first: for LM, tokenization,
    then learning rate (the first of the sweep for every model first), then model; for MQAR,
    learning rate, width, setting (in the protocol's order), model. Parameter counts are matched
    here (``describe_sizes`` prints them); a refused variant or missing fla gives runs marked
    ``refused``."""
    if study not in ("mqar", "lm", "all"):
        raise ValueError(f"--study must be mqar, lm or all, got {study!r}")
    mqar, lm = mqar or MQARProtocol(), lm or LMProtocol()
    specs = _model_specs(models, expand_variants(variants), extra_variants or {})
    mmrec_code = code_fingerprint()
    runs: List[Run] = []

    def add(study_name, base, vocab, hidden, layers, lrs, order_key):
        target = parameter_count("hgrn", vocab, hidden, layers)
        for name, family, overrides, refusal in specs:
            width, count = None, None
            if refusal is None and name in SINGLE_LR_VARIANTS and base["seq_len"] > base.get("sequential_max_length", 1 << 30):
                refusal = (f"{name}: its loop over t is too slow beyond {base['sequential_max_length']} tokens; "
                           "raise --sequential-max-length to run it")
            if refusal is None:
                try:
                    width, count = _sized(family, overrides, vocab, hidden, layers, target)
                except ValueError as err:
                    refusal = f"{name}: {err}"
            spec = {**base, "model": name, "family": family, "overrides": overrides, "intermediate_size": width,
                    "parameters": count, "target_parameters": target, "protocol_version": PROTOCOL_VERSION}
            if family == "mmrec":
                spec["mmrec_code"] = mmrec_code
            for rank, lr in enumerate(lrs[:1] if name in SINGLE_LR_VARIANTS else lrs):
                runs.append(Run(study_name, name, family, lr, {**spec, "lr": lr}, refusal, order_key(rank, len(runs))))

    if study in ("lm", "all"):
        for t_rank, tokenization in enumerate(lm.tokenizations):
            vocab = 258 if tokenization == "bytes" else lm.bpe_vocab
            base = {"study": "lm", "setting": tokenization, "tokenization": tokenization, "hidden_size": lm.hidden_size,
                    "layers": lm.layers, "seq_len": lm.seq_len, "batch_size": lm.batch_size, "steps": lm.steps,
                    "eval_every": lm.eval_every, "vocab_size": vocab, "validation_fraction": lm.validation_fraction,
                    "max_works": lm.max_works, "max_chars": lm.max_chars, "weight_decay": lm.weight_decay,
                    "warmup_fraction": lm.warmup_fraction, "seed": lm.seed}
            add("lm", base, vocab, lm.hidden_size, lm.layers, lm.lrs, lambda lr_rank, i, t=t_rank: (0, t, lr_rank, i))
    if study in ("mqar", "all"):
        settings = [MQARSetting.parse(s) for s in mqar.settings]
        for setting in settings:
            setting.check(mqar.vocab_size)
        for w_rank, width in enumerate(mqar.widths):
            for s_rank, setting in enumerate(settings):
                base = {"study": "mqar", "setting": f"{setting.name}-d{width}", "seq_len": setting.seq_len,
                        "num_kv_pairs": setting.num_kv_pairs, "power_a": setting.power_a, "hidden_size": width,
                        "layers": mqar.layers, "vocab_size": mqar.vocab_size, "steps": mqar.steps,
                        "batch_size": mqar.batch_size(setting.seq_len), "eval_every": mqar.eval_every,
                        "test_size": mqar.test_size, "stop_accuracy": mqar.stop_accuracy,
                        "random_non_queries": mqar.random_non_queries, "weight_decay": mqar.weight_decay,
                        "warmup_fraction": mqar.warmup_fraction, "seed": mqar.seed,
                        "sequential_max_length": mqar.sequential_max_length}
                add("mqar", base, mqar.vocab_size, width, mqar.layers, mqar.lrs,
                    lambda lr_rank, i, w=w_rank, r=s_rank: (1, lr_rank, w, r, i))
    runs.sort(key=lambda r: r.order)
    return runs


def describe_sizes(runs: Sequence[Run]) -> List[str]:
    """One line per (setting, model): parameters against HGRN's and the FFN width chosen."""
    seen, lines = set(), []
    for run in runs:
        s = run.spec
        shape = f"vocab {s['vocab_size']}, hidden {s['hidden_size']}, {s['layers']} layers"
        if (shape, run.model) in seen or run.refused:
            continue
        seen.add((shape, run.model))
        p, target = s["parameters"], s["target_parameters"]
        non_embedding = p - s["vocab_size"] * s["hidden_size"]
        width = s["intermediate_size"]
        lines.append(f"  {shape}: {run.model:<18} {p / 1e6:7.3f}M ({non_embedding / 1e6:.3f}M non-embedding, "
                     f"{100 * (p / target - 1):+.1f}% vs HGRN){'' if width is None else f', intermediate_size {width}'}")
    return lines


# ----------------------------------------------------------------------------- time estimates

# Prior seconds per step: a per-layer launch cost plus 6 * parameters * tokens at an effective rate;
# the sequential gate adds a per-token, per-layer cost. Refined by the finished runs on the same device.
PRIOR_LAYER_SECONDS = {"cuda": {"mmrec": 2.5e-3, "llama": 1.0e-3, "hgrn": 1.0e-3},
                       "cpu": {"mmrec": 4e-3, "llama": 2e-3, "hgrn": 2e-3}}
PRIOR_FLOPS = {"cuda": 40e12, "cpu": 2e10}
STATE_GATE_SECONDS = {"cuda": 3.4e-5, "cpu": 5e-5}  # cuda: the Triton walk, 17.2 ms fwd+bwd a layer at B=32, T=512, d=384


def prior_seconds(run: Run, device_type: str) -> float:
    s = run.spec
    per_step = s["layers"] * PRIOR_LAYER_SECONDS[device_type][run.family]
    per_step += 6 * (s["parameters"] or 0) * s["batch_size"] * s["seq_len"] / PRIOR_FLOPS[device_type]
    if s.get("overrides", {}).get("recurrence_gate") == "state":
        per_step += s["layers"] * s["seq_len"] * STATE_GATE_SECONDS[device_type]
    evals = s["steps"] // s["eval_every"] + 1
    return per_step * s["steps"] * (1.0 + 0.02 * evals)


def calibration(finished: Sequence[dict], device_name: str) -> Dict[str, float]:
    """Median measured / prior time per model family (and "*": all), from finished runs on this device."""
    ratios: Dict[str, List[float]] = {}
    for record in finished:
        if record.get("device") != device_name or not record.get("prior_seconds"):
            continue
        ratio = record["seconds"]["total"] / record["prior_seconds"]
        ratios.setdefault(record["family"], []).append(ratio)
        ratios.setdefault("*", []).append(ratio)
    return {family: statistics.median(values) for family, values in ratios.items()}


def estimate_seconds(run: Run, device_type: str, factors: Dict[str, float]) -> float:
    return prior_seconds(run, device_type) * factors.get(run.family, factors.get("*", 1.0))


# ----------------------------------------------------------------------------- running

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device) if torch.cuda.is_available() else "cuda (not available here)"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads"


def versions() -> Dict[str, str]:
    import transformers

    found = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for module in ("triton", "fla"):
        try:
            found[module] = __import__(module).__version__
        except ImportError:
            pass
    return found


def git_commit() -> Optional[str]:
    try:
        def git(*args):
            return subprocess.run(["git", *args], cwd=MODEL_PACKAGE, capture_output=True, text=True, timeout=10)

        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def atomic_write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # studies may run side by side
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_records(out: Path, study: Optional[str] = None) -> List[dict]:
    """Every finished run record under ``out/runs`` (of ``study`` if given); unreadable files are skipped."""
    records = []
    for path in sorted((Path(out) / RUNS).glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if record.get("finished") and (study is None or record.get("study") == study):
            records.append(record)
    return records


def newest_records(out: Path, accept: Callable[[dict], bool], key: Callable[[dict], tuple]) -> List[dict]:
    """The newest (by "ended") finished record under ``out/runs`` of each ``key(record)`` among those
    ``accept`` takes: a record of older MM-Rec code is superseded by a newer one."""
    chosen: Dict[tuple, dict] = {}
    for record in load_records(out):
        if accept(record) and (key(record) not in chosen or record.get("ended", "") >= chosen[key(record)].get("ended", "")):
            chosen[key(record)] = record
    return list(chosen.values())


def _same_but_code(record: dict, run: Run) -> bool:
    a = {k: v for k, v in record.get("spec", {}).items() if k != "mmrec_code"}
    b = {k: v for k, v in run.spec.items() if k != "mmrec_code"}
    return a == b


class Study:
    """Runs a plan into ``out``: data and test sets built once per call, each run trained,
    evaluated and written; finished runs skipped; the budget checked before and during runs
    (``start_over_budget``: before a run only the running check, for when the estimates are
    stale, e.g. after a speed change)."""

    def __init__(self, out, device: Optional[str] = None, mqar: Optional[MQARProtocol] = None,
                 lm: Optional[LMProtocol] = None, overwrite: bool = False, reuse_older_code: bool = False,
                 max_minutes: Optional[float] = None, progress: bool = True, log: Callable[[str], None] = print,
                 command: str = "", start_over_budget: bool = False):
        self.out = Path(out)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.mqar, self.lm = mqar or MQARProtocol(), lm or LMProtocol()
        self.overwrite, self.reuse_older_code = overwrite, reuse_older_code
        self.max_minutes, self.progress, self.log, self.command = max_minutes, progress, log, command
        self.start_over_budget = start_over_budget  # start runs whose (possibly stale) estimate exceeds the time left
        self.device_name = device_name(self.device)
        self._lm_data: Dict[str, LMData] = {}
        self._tests: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}

    def status(self, run: Run) -> str:
        """"refused", "done" (a finished record exists) or "todo"."""
        if run.refused:
            return "refused"
        if self.overwrite:
            return "todo"
        if (self.out / RUNS / f"{run.name}.json").is_file():
            return "done"
        if self.reuse_older_code and run.family == "mmrec":
            if any(_same_but_code(r, run) for r in load_records(self.out, run.study)):
                return "done"
        return "todo"

    def print_plan(self, runs: Sequence[Run]) -> float:
        """Print the plan (one line per run: status, estimate) and return the estimated seconds to do."""
        factors = calibration(load_records(self.out), self.device_name)
        todo, total = 0, 0.0
        calibrated = f" (estimates calibrated on {len(load_records(self.out))} finished runs)"
        self.log(f"planned runs: {len(runs)} on {self.device_name}" + (calibrated if factors else " (prior estimates)"))
        for line in describe_sizes(runs):
            self.log(line)
        for refusal in sorted({r.refused for r in runs if r.refused}):
            self.log(f"  refused: {refusal}")
        for i, run in enumerate(runs, 1):
            status = self.status(run)
            seconds = estimate_seconds(run, self.device.type, factors) if status == "todo" else 0.0
            if status == "todo":
                todo, total = todo + 1, total + seconds
            self.log(f"  {i:3d}. {run.study} {run.key:<14} {run.model:<18} lr {run.lr:<7g} {status:<7}"
                     f"{f' ~{seconds / 60:.1f} min' if status == 'todo' else ''}")
        self.log(f"to run: {todo} runs, estimated {total / 60:.1f} min"
                 f"{'' if self.max_minutes is None else f' (budget {self.max_minutes:g} min)'}")
        return total

    def run_all(self, runs: Sequence[Run]) -> Dict[str, List[str]]:
        """Run the plan in order. Returns {"done": [...], "skipped": [...], "refused": [...],
        "over_budget": [...], "failed": [...]} of run names."""
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device here")
        started = time.time()
        deadline = started + 60 * self.max_minutes if self.max_minutes is not None else None
        factors = calibration(load_records(self.out), self.device_name)
        outcome: Dict[str, List[str]] = {k: [] for k in ("done", "skipped", "refused", "over_budget", "failed")}
        for run in runs:
            status = self.status(run)
            if status != "todo":
                outcome["refused" if status == "refused" else "skipped"].append(run.name)
                continue
            if deadline is not None:
                estimate = estimate_seconds(run, self.device.type, factors)
                if time.time() + estimate > deadline:
                    if not self.start_over_budget:
                        outcome["over_budget"].append(run.name)
                        self.log(f"budget: {run.name} (~{estimate / 60:.1f} min) does not fit the time left; not started")
                        continue
                    self.log(f"budget: {run.name} (~{estimate / 60:.1f} min) may not fit the time left; started anyway")
            kind, record = attempt(lambda: self.train(run, deadline), run.name, self.log, self.device)
            outcome[kind].append(run.name)
            if kind == "over_budget":
                break
            if kind == "failed":
                continue
            factors = calibration(load_records(self.out), self.device_name)
            self.log(f"done: {run.name}: {summary_line(record)} ({record['seconds']['total']:.0f} s)")
        wall = log_invocation(self.out, self.command, self.device_name, started, {k: len(v) for k, v in outcome.items()})
        self.log(f"runs: {len(outcome['done'])} done, {len(outcome['skipped'])} already finished (skipped), "
                 f"{len(outcome['refused'])} refused, {len(outcome['over_budget'])} over budget, "
                 f"{len(outcome['failed'])} failed; wall time {wall / 60:.1f} min")
        if outcome["over_budget"]:
            self.log("rerun the same command to continue: finished runs are skipped")
        return outcome

    # one run ---------------------------------------------------------------------------------------

    def train(self, run: Run, deadline: Optional[float] = None) -> dict:
        s = run.spec
        started = time.time()
        torch.manual_seed(s["seed"])
        model = build_model(run.family, s["vocab_size"], s["hidden_size"], s["layers"], s["intermediate_size"],
                            s["overrides"], max_length=max(4096, s["seq_len"])).to(self.device)
        parameters = count_parameters(model)
        built = time.time()
        next_batch, evaluate, stop = (self._lm_task if run.study == "lm" else self._mqar_task)(run, model)
        prepared = time.time()
        curve, steps_done = train_loop(model, next_batch, evaluate, s["steps"], run.lr, s["eval_every"], s["weight_decay"],
                                       s["warmup_fraction"], stop=stop, deadline=deadline, progress=self.progress,
                                       description=f"{run.study} {run.key} {run.model} lr {run.lr:g}", seed=s["seed"],
                                       batch_size=s["batch_size"])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        ended = time.time()
        final = curve[-1] if curve else {}
        record = {
            "finished": True, "name": run.name, "study": run.study, "setting": run.key, "model": run.model,
            "family": run.family, "lr": run.lr, "spec": s, "parameters": parameters,
            "non_embedding_parameters": parameters - s["vocab_size"] * s["hidden_size"],
            "steps_done": steps_done, "diverged": not math.isfinite(final.get("train_loss", float("nan"))),
            "final": final, "curve": curve, "device": self.device_name, "versions": versions(), "git": git_commit(),
            "command": self.command, "prior_seconds": prior_seconds(run, self.device.type),
            "seconds": {"build": built - started, "data": prepared - built, "train_and_eval": ended - prepared,
                        "total": ended - started},
            "ended": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ended)),
        }
        if run.study == "lm":
            data = self._lm_data[s["tokenization"]]
            record.update(held_out_works=data.held_out_works, held_out_rows=len(data.held_out))
        atomic_write_json(self.out / RUNS / f"{run.name}.json", record)
        del model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return record

    def _lm_task(self, run: Run, model):
        s = run.spec
        tokenization = s["tokenization"]
        if tokenization not in self._lm_data:
            self._lm_data[tokenization] = lm_data(tokenization, s["seq_len"], self.lm.bpe_vocab, s["validation_fraction"],
                                                  s["max_works"], s["max_chars"], cache_dir=self.out / CACHE)
        data = self._lm_data[tokenization]
        if data.vocab_size != s["vocab_size"]:
            raise ValueError(f"the {tokenization} tokenizer has {data.vocab_size} tokens, the plan expected {s['vocab_size']}")
        rows = data.train.to(self.device)
        order = batch_order(len(rows), s["steps"], s["batch_size"], s["seed"]).to(self.device)

        def next_batch(step):
            batch = rows[order[step]]
            return batch, batch

        def evaluate():
            return lm_metrics(model, data.held_out, data.byte_lengths, self.lm.eval_batch_size)

        return next_batch, evaluate, None

    def _mqar_task(self, run: Run, model):
        s = run.spec
        setting = MQARSetting(s["seq_len"], s["num_kv_pairs"], s["power_a"])
        test_key = f"{setting}-{s['vocab_size']}-{s['test_size']}-{s['seed']}-{s['random_non_queries']}"
        if test_key not in self._tests:
            self._tests[test_key] = mqar_test_set(setting, s["test_size"], s["vocab_size"], seed=1_000_003 + s["seed"],
                                                  random_non_queries=s["random_non_queries"])
        inputs, targets = self._tests[test_key]
        generator = torch.Generator(self.device).manual_seed(s["seed"])

        def next_batch(step):
            x, y = mqar_batch(setting, s["batch_size"], s["vocab_size"], generator, s["random_non_queries"])
            return x, hf_labels(y)

        def evaluate():
            # [B, T, vocab] float logits: ~64k positions per batch keep them near 2 GB at vocab 8192
            return mqar_metrics(model, inputs, targets, batch_size=max(1, 65536 // setting.seq_len))

        return next_batch, evaluate, lambda m: m.get("accuracy", 0.0) >= s["stop_accuracy"]


def summary_line(record: dict) -> str:
    final = record.get("final", {})
    if record["study"] == "lm":
        return f"held-out loss {final.get('loss', float('nan')):.4f}, {final.get('bits_per_byte', float('nan')):.4f} bits/byte"
    return f"accuracy {100 * final.get('accuracy', float('nan')):.1f}% after {record['steps_done']} steps"


# ----------------------------------------------------------------------------- reports

def seed_of(record: dict) -> int:
    return record["spec"].get("seed", 0)


def latest_per_run(records: Iterable[dict]) -> List[dict]:
    """One record per (study, setting, model, lr, seed, protocol): the newest (older MM-Rec code is superseded)."""
    chosen: Dict[tuple, dict] = {}
    for record in records:
        key = (record["study"], record["setting"], record["model"], record["lr"], seed_of(record), protocol_label(record))
        if key not in chosen or record.get("ended", "") >= chosen[key].get("ended", ""):
            chosen[key] = record
    return list(chosen.values())


def protocol_label(record: dict) -> str:
    s = record["spec"]
    if record["study"] == "lm":
        return (f"{s['tokenization']}: {s['steps']} steps of {s['batch_size']} x {s['seq_len']} tokens, hidden "
                f"{s['hidden_size']}, {s['layers']} layers, vocab {s['vocab_size']}")
    default = MQARProtocol()
    if s["batch_size"] == default.batch_size(s["seq_len"]):  # the default rule: one section for every length
        batch = f"~{default.tokens_per_batch} tokens (at most {default.max_batch} rows)"
    else:
        batch = f"~{s['batch_size'] * s['seq_len']} tokens"
    return (f"width {s['hidden_size']}: {s['layers']} layers, vocab {s['vocab_size']}, at most {s['steps']} steps "
            f"of {batch}, stop at {100 * s['stop_accuracy']:g}%")


def _score(record: dict) -> float:
    """Lower is better: bits per byte (LM) or minus accuracy (MQAR); NaN (diverged) last."""
    final = record.get("final", {})
    value = final.get("bits_per_byte") if record["study"] == "lm" else -final.get("accuracy", float("nan"))
    return value if value is not None and math.isfinite(value) else float("inf")


def best_runs(records: Iterable[dict]) -> Dict[str, Dict[Tuple[str, str], List[dict]]]:
    """{protocol label: {(setting, model): [records of the sweep sorted best first]}}.

    The learning-rate sweep is the runs at the cell's lowest seed; runs repeated at other seeds
    do not take part in choosing the best rate (that would pick the luckiest seed), they measure
    its spread (``repeats``)."""
    grouped: Dict[str, Dict[Tuple[str, str], List[dict]]] = {}
    for record in latest_per_run(records):
        grouped.setdefault(protocol_label(record), {}).setdefault((record["setting"], record["model"]), []).append(record)
    for section in grouped.values():
        for cell, runs in section.items():
            sweep_seed = min(seed_of(r) for r in runs)
            section[cell] = sorted((r for r in runs if seed_of(r) == sweep_seed), key=lambda r: (_score(r), r["lr"]))
    return grouped


def repeats(latest: Iterable[dict], best: dict) -> List[dict]:
    """Every seed's run of ``best``'s cell, learning rate and protocol among ``latest`` (the output of
    ``latest_per_run``), by seed (``best`` included)."""
    same = [r for r in latest
            if (r["study"], r["setting"], r["model"], r["lr"], protocol_label(r))
            == (best["study"], best["setting"], best["model"], best["lr"], protocol_label(best))]
    return sorted(same, key=seed_of)


def _model_order(models: Iterable[str]) -> List[str]:
    rank = {name: i for i, name in enumerate([*MMREC_VARIANTS, "hgrn", "llama"])}
    return sorted(set(models), key=lambda m: (rank.get(m, len(rank)), m))


def _environment(records: Sequence[dict], out: Path) -> List[str]:
    lines = []
    devices = sorted({r["device"] for r in records})
    lines.append(f"Device: {', '.join(devices)}")
    seen = sorted({json.dumps(r["versions"], sort_keys=True) for r in records})
    for text in seen:
        lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in json.loads(text).items()))
    total = sum(r["seconds"]["total"] for r in records)
    lines.append(f"Training + evaluation time of these runs: {total / 60:.1f} min")
    entries = _invocations(out)
    if entries is not None:
        lines += ["", "Calls (command, device, wall time):", ""]
        lines += [f"* `{entry.get('command', '')}` on {entry.get('device')}, {entry.get('wall_seconds', 0) / 60:.1f} min "
                  f"({entry.get('done', 0)} runs, git {entry.get('git')})" for entry in entries]
    return lines


def environment_lines(records: Sequence[dict], out: Path, time_label: str,
                      counts: Sequence[Tuple[str, str]] = (("done", "runs done"), ("skipped", "skipped"))) -> List[str]:
    """A report's environment section: devices, versions, the runs' summed time (``time_label``) and
    each logged call of ``out/invocations.jsonl`` with its ``counts`` (entry field, words)."""
    lines = ["## Environment", "", f"Devices: {', '.join(sorted({r['device'] for r in records}))}"]
    for text in sorted({json.dumps(r["versions"], sort_keys=True) for r in records}):
        lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in json.loads(text).items()))
    total = sum(r["seconds"]["total"] for r in records)
    lines.append(f"{time_label}: {total / 60:.1f} min")
    entries = _invocations(out)
    if entries is not None:
        lines += ["", "Calls (exact command, device, wall time):", ""]
        for entry in entries:
            done = ", ".join(f"{entry.get(field, 0)} {words}" for field, words in counts)
            lines.append(f"* `{entry.get('command', '')}` on {entry.get('device')}, "
                         f"{entry.get('wall_seconds', 0) / 60:.1f} min ({done}, git {entry.get('git')})")
    return lines


def skipped_lines(records: Sequence[dict], out: Path) -> List[str]:
    """The reasons the logged calls skipped runs, except those of a model that has records since (a
    reason starts with the model it refused: "gdn: fla is not installed ...")."""
    recorded = {r["model"] for r in records}
    reasons = sorted({reason for entry in _invocations(out) or [] for reason in entry.get("refusals", [])
                      if reason.split(":")[0] not in recorded})
    return ["Runs skipped by the calls (not measured): " + "; ".join(reasons) + ".", ""] if reasons else []


def _invocations(out: Path) -> Optional[List[dict]]:
    """The entries of ``out/invocations.jsonl`` (an unreadable line is skipped); None without the file."""
    path = Path(out) / INVOCATIONS
    if not path.is_file():
        return None
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def study_folder(text: Optional[str], default: Path, smoke_prefix: Optional[str], flag: str, example: str) -> Path:
    """A study's output folder: ``text`` resolved, or ``default`` (a fresh temporary folder where
    ``smoke_prefix`` is given); ValueError naming ``flag`` for a file or a folder inside a package."""
    if text is None:
        return Path(tempfile.mkdtemp(prefix=smoke_prefix)) if smoke_prefix else default
    path = Path(text).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {text}: exists and is not a folder")
    for package in PACKAGES:
        if path == package or package in path.parents:
            raise ValueError(f"{flag} {text}: inside the {package.name} package; choose e.g. {example}")
    return path


def _plot(path: Path, title: str, xlabel: str, ylabel: str, series: Dict[str, Tuple[list, list]],
          categories: Optional[Sequence[str]] = None):
    """Line plot of ``series`` {label: (xs, ys)}; with ``categories``, xs are names placed in that order."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label, (xs, ys) in series.items():
        ax.plot([categories.index(x) for x in xs] if categories else xs, ys, "o-", label=label, markersize=3)
    if categories:
        ax.set_xticks(range(len(categories)), categories)
    ax.set_title(textwrap.fill(title, 80), fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _slug(label: str) -> str:
    """File-name part of a protocol label: its head ("bytes", "width-128") and a short hash of the rest."""
    head = "".join(c if c.isalnum() else "-" for c in label.split(":")[0]).strip("-").lower()
    return f"{head}-{hashlib.sha1(label.encode()).hexdigest()[:6]}"


def _over_seeds(latest: Sequence[dict], best: dict, metric: str, scale: float = 1.0) -> List[Tuple[int, float]]:
    """[(seed, metric * scale)] of every seed's run of ``best``'s cell and rate; [] with one seed."""
    runs = repeats(latest, best)
    return [] if len(runs) < 2 else [(seed_of(r), scale * r["final"].get(metric, float("nan"))) for r in runs]


def _seed_cells(latest: Sequence[dict], best: dict) -> str:
    """'seed: bits per byte, ...' and their mean, for the table's last two columns ('-' for one seed)."""
    values = _over_seeds(latest, best, "bits_per_byte")
    if not values:
        return "- | -"
    return (", ".join(f"{seed}: {v:.4f}" for seed, v in values)
            + f" | {sum(v for _, v in values) / len(values):.4f} ({len(values)} seeds)")


def write_lm_report(out: Path) -> Optional[Path]:
    records = load_records(out, "lm")
    if not records:
        return None
    lines = ["# Language modelling: held-out bits per byte", "",
             "Shakespeare (the bundled `shksprdata` corpus), whole works held out: "
             f"{', '.join(sorted({w for r in records for w in r.get('held_out_works', [])})) or 'see split_works'}. "
             "Best learning rate of each model (lowest final held-out bits per byte of the sweep, seed 0); every run's "
             "JSON is in `runs/`. Where the best rate was repeated with other seeds, the last columns give each seed's "
             "result and their mean.",
             "Bits per byte = total held-out nats / ln 2 / UTF-8 bytes of the predicted tokens; every held-out row "
             "is read from a fresh state.", ""]
    latest = latest_per_run(records)
    for label, section in sorted(best_runs(latest).items()):
        tokenization = label.split(":")[0]
        lines += [f"## {label}", "", "| model | parameters (non-embedding) | best lr | held-out loss | bits per byte | "
                  "bits per byte at each lr | steps/s | minutes (all lrs) | best lr, each seed | mean over seeds |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        series = {}
        for model in _model_order(m for _, m in section):
            runs = section[(tokenization, model)]
            best = runs[0]
            sweep = ", ".join(f"{r['lr']:g}: {r['final'].get('bits_per_byte', float('nan')):.3f}"
                              for r in sorted(runs, key=lambda r: r["lr"]))
            speed = best["steps_done"] / max(1e-9, best["seconds"]["train_and_eval"])
            lines.append(f"| {model} | {best['parameters'] / 1e6:.2f}M ({best['non_embedding_parameters'] / 1e6:.2f}M) | "
                         f"{best['lr']:g} | {best['final'].get('loss', float('nan')):.4f} | "
                         f"**{best['final'].get('bits_per_byte', float('nan')):.4f}** | {sweep} | {speed:.1f} | "
                         f"{sum(r['seconds']['total'] for r in runs) / 60:.1f} | {_seed_cells(latest, best)} |")
            curve = [c for c in best["curve"] if "bits_per_byte" in c]
            series[f"{model} (lr {best['lr']:g})"] = ([c["step"] for c in curve], [c["bits_per_byte"] for c in curve])
        png = f"lm-{_slug(label)}.png"
        _plot(out / png, label, "optimizer step", "held-out bits per byte", series)
        lines += ["", f"![learning curves]({png})", ""]
    lines += _environment(records, out)
    path = out / "lm.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_mqar_report(out: Path) -> Optional[Path]:
    records = load_records(out, "mqar")
    if not records:
        return None
    lines = ["# Multi-query associative recall (Zoology's MQAR)", "",
             "Accuracy = answers predicted exactly / answers on a fixed seeded test set, best learning rate per cell "
             "(in parentheses: that lr, the steps trained when the run stopped early at the target accuracy, and, "
             "where the best rate was repeated with other seeds, each seed's accuracy and their mean). "
             "Settings are LENGTHxPAIRS; lengths of 1024 and more spread their queries uniformly, so most queries are "
             "more than one 512-token memory segment away from their keys.", ""]
    def by_width(item):  # "width 64: ..." before "width 128: ..."
        return int(item[0].split()[1].rstrip(":")), item[0]

    latest = latest_per_run(records)
    for label, section in sorted(best_runs(latest).items(), key=by_width):
        settings = sorted({s for s, _ in section}, key=lambda s: (int(s.split("x")[0]), int(s.split("x")[1].split("-")[0])))
        names = [s.rsplit("-d", 1)[0] for s in settings]
        lines += [f"## {label}", "", "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        series = {}
        for model in _model_order(m for _, m in section):
            cells, xs, ys = [], [], []
            for setting, name in zip(settings, names):
                runs = section.get((setting, model))
                if not runs:
                    cells.append("-")
                    continue
                best = runs[0]
                accuracy = best["final"].get("accuracy", float("nan"))
                early = f", {best['steps_done']} steps" if best["steps_done"] < best["spec"]["steps"] else ""
                values = _over_seeds(latest, best, "accuracy", 100.0)
                spread = "" if not values else ("; seeds " + ", ".join(f"{seed}: {v:.1f}" for seed, v in values)
                                                + f", mean {sum(v for _, v in values) / len(values):.1f}")
                cells.append(f"{100 * accuracy:.1f}% ({best['lr']:g}{early}{spread})")
                xs.append(name)
                ys.append(100 * accuracy)
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
            series[model] = (xs, ys)
        png = f"mqar-{_slug(label)}.png"
        _plot(out / png, label, "setting (length x pairs)", "test accuracy (%)", series, categories=names)
        lines += ["", f"![accuracy per setting]({png})", ""]
    lines += _environment(records, out)
    path = out / "mqar.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_reports(out) -> List[Path]:
    """lm.md and mqar.md (+ PNGs) from every finished run under ``out``; returns the files written."""
    out = Path(out)
    return [p for p in (write_lm_report(out), write_mqar_report(out)) if p is not None]
