"""The long-context study (issue 26): does MM-Rec's memory carry anything across segments, and how far?

    python research/long_study.py --smoke                                       # tiny, CPU, under a minute
    python research/long_study.py --plan --task all                             # the runs, their sizes, train nothing
    python research/long_study.py --task lm --lm-lengths 4096 --models mmrec-default mmrec-no-fold --seeds 0 1 2
    python research/long_study.py --task passkey --models mmrec-default llama
    python research/long_study.py --task far_mqar --models mmrec-default gdn llama
    python research/long_study.py --report                                      # README.md + plots from OUT/runs

Tasks (each a function below with a dataclass protocol: GPU defaults, and a SMOKE_* dict for the CPU):

* ``lm`` (``lm_task``, ``LMProtocol``): train on rows of ``train_len`` tokens of the bundled Shakespeare
  (whole works held out; every row lies inside one work, so position p of a row has p tokens of its own
  work before it), then held-out bits per byte by position bucket (0-512, 512-1k, 1k-2k, ...) at
  ``train_len`` and at 4x it, and by offset inside MM-Rec's memory segment (the sawtooth check; the
  peers at the default segment length, as a control). Protocols at 4096 and 16384 tokens.
* ``passkey`` (``passkey_task``, ``PasskeyProtocol``): train on passkey rows of 1k-4k tokens at random
  depths, then exact-answer accuracy for lengths 1k .. 64k x depths 0 .. 1.
* ``far_mqar`` (``far_mqar_task``, ``FarMQARProtocol``): multi-query recall whose every query is at least
  one memory segment after its key, trained with a curriculum (the row length doubles from 1k to 8k
  over the budget), accuracy at each length.

Models: MM-Rec (MMRecConfig's defaults, ``MMREC_VARIANTS`` for the ablations), fla's HGRN (the size
reference) and Gated DeltaNet, HF Llama; every model but HGRN and Gated DeltaNet matched to HGRN's
parameter count by its FFN width (``quality.match_intermediate_size``), all trained by the quality
study's loop (``quality.train_loop``: the main job's Trainer, AdamW, warm-up + cosine, bf16 on CUDA).
Llama is built with as many positions as its longest training row and not evaluated beyond them.
fla runs need CUDA and fla; elsewhere they are skipped with a one-line reason.

Runs: one JSON per (task, setting, model, seed) in OUT/runs/, written atomically when the run ends.
Its name carries a hash of everything that defines it, MM-Rec's source code included
(``quality.code_fingerprint``), so a recorded run is skipped (``--rerun`` repeats it) and changed
model code makes new runs. OUT/README.md (``write_report``) holds the tables, the plots, and which of
the issue's targets are met, missed or not measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import long_context as lc
import memory_variants
import quality
import torch

from mm_rec import MMRecConfig
from mm_rec_train.cli import ArgumentParser, device_type, non_negative_int, positive_float, positive_int, run_main, set_threads
from mm_rec_train.runs import REPOSITORY

PROTOCOL_VERSION = 1
TASKS = ("lm", "passkey", "far_mqar")
RUNS, CACHE, INVOCATIONS, REPORT = quality.RUNS, quality.CACHE, quality.INVOCATIONS, "README.md"

# ----------------------------------------------------------------------------- models

# The study's MM-Rec is MMRecConfig's defaults: quality's "mmrec-default" overrides every field of the quality
# study's STUDY_BASE (which build_model applies first), so these variants are the defaults plus one ablated field.
MMREC_BASE = quality.MMREC_VARIANTS["mmrec-default"]
ABLATIONS: Dict[str, dict] = {
    "default": {},                                   # "slots+blocks": the whole memory
    "no-fold": {"memory_levels": "blocks"},          # segments never fold into the slots
    "no-memory": {"memory_levels": "none"},          # a pure recurrence
    "slots-4": {"num_memory_slots": 4},
    "slots-64": {"num_memory_slots": 64},
    "segment-256": {"memory_segment_length": 256},
    "segment-1024": {"memory_segment_length": 1024},
    "fold-decay-0.9": {"memory_decay": 0.9},
    "fold-decay-0.5": {"memory_decay": 0.5},        # each routed block replaces half its slot: recent blocks dominate
}
MMREC_VARIANTS: Dict[str, dict] = {f"mmrec-{name}": {**MMREC_BASE, **fields} for name, fields in ABLATIONS.items()}
# Prototypes of the memory's write rule (research/memory_variants.py): the default config, then the prototype
# applied to the built model. Parallel forward only: scored on whole rows from a fresh state, as every task is.
MMREC_VARIANTS.update({f"mmrec-{name}": dict(MMREC_BASE) for name in memory_variants.PROTOTYPES})
PEERS = ("hgrn", "gdn", "llama")
# Most informative first: the model, its no-fold ablation and the peers, then the other ablations.
MODELS = ("mmrec-default", "mmrec-no-fold", "hgrn", "gdn", "llama",
          *(name for name in MMREC_VARIANTS if name not in ("mmrec-default", "mmrec-no-fold")))
REFERENCE = "mmrec-default"
DEFAULT_SEGMENT = MMRecConfig().memory_segment_length


def family_of(model: str) -> str:
    """"mmrec" for an MM-Rec variant, else the peer's own name (hgrn, gdn, llama)."""
    if model in MMREC_VARIANTS:
        return "mmrec"
    if model in PEERS:
        return model
    raise ValueError(f"--models: unknown model {model!r}; known: {', '.join(MODELS)}")


def variant_overrides(model: str, segment_length: Optional[int] = None) -> dict:
    """The MMRecConfig fields of an MM-Rec variant. ``segment_length`` (a protocol's, e.g. the smoke
    study's short rows) replaces the default segment length in every variant that does not ablate it."""
    fields = dict(MMREC_BASE)
    if segment_length is not None:
        fields["memory_segment_length"] = segment_length
    fields.update(ABLATIONS.get(model.removeprefix("mmrec-"), {}))
    return fields


def prototype_of(model: str) -> Optional[str]:
    """The memory_variants prototype an MM-Rec variant applies, or None."""
    name = model.removeprefix("mmrec-")
    return name if model.startswith("mmrec-") and name in memory_variants.PROTOTYPES else None


def segment_of(model: str, segment_length: Optional[int]) -> int:
    """The memory segment length the offsets are taken over: an MM-Rec variant's own; for the peers,
    which have none, the default MM-Rec's (a control: their curve should be flat)."""
    if model in MMREC_VARIANTS:
        return variant_overrides(model, segment_length).get("memory_segment_length", DEFAULT_SEGMENT)
    return segment_length or DEFAULT_SEGMENT


def refusal(model: str, device: torch.device) -> Optional[str]:
    """Why ``model`` cannot run on ``device`` (one line), or None."""
    family = family_of(model)
    return quality.refusal_reason(family, model, variant_overrides(model) if family == "mmrec" else None, device)


# ----------------------------------------------------------------------------- protocols

@dataclasses.dataclass
class Protocol:
    """What every task shares: the model's size, the optimiser's settings (the quality study's), the
    tokens per evaluation batch, and ``segment_length``: MM-Rec's memory segment in every variant that
    does not ablate it (None: MMRecConfig's default)."""

    hidden_size: int = 384
    layers: int = 6
    steps: int = 600
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    eval_tokens: int = 65536
    segment_length: Optional[int] = None

    def check(self) -> None:
        for name in ("hidden_size", "layers", "steps", "eval_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.segment_length is not None and self.segment_length <= 0:
            raise ValueError(f"segment_length must be positive or None, got {self.segment_length}")

    def eval_batch(self, length: int) -> int:
        return max(1, self.eval_tokens // length)


@dataclasses.dataclass
class LMProtocol(Protocol):
    """Held-out bits per byte by position. Train on ``batch_size`` rows of ``train_len`` tokens for
    ``steps`` steps (32k tokens a step by default, as 8 x 4096 or 2 x 16384); evaluate every held-out
    row at ``train_len`` and at ``eval_factor`` x it, in buckets doubling from ``bucket_first``;
    ``beyond``: the issue's boundary (positions from 1,024 on). ``eval_every``: a held-out estimate on
    ``curve_rows`` rows for the learning curve."""

    tokenization: str = "bytes"
    train_len: int = 4096
    batch_size: int = 8
    eval_every: int = 100
    curve_rows: int = 8
    eval_factor: int = 4
    eval_rows: Optional[int] = None
    bucket_first: int = 512
    beyond: int = 1024
    bpe_vocab: int = 4096
    validation_fraction: float = 0.05
    max_works: Optional[int] = None
    max_chars: Optional[int] = None

    @property
    def setting(self) -> str:
        return f"{self.tokenization}-{self.train_len}"

    @property
    def vocab_size(self) -> int:
        return 258 if self.tokenization == "bytes" else self.bpe_vocab

    @property
    def eval_lengths(self) -> Tuple[int, ...]:
        return (self.train_len, self.eval_factor * self.train_len)

    @property
    def max_train_length(self) -> int:
        return self.train_len

    @property
    def train_tokens(self) -> int:
        return self.steps * self.batch_size * self.train_len

    def check(self) -> None:
        super().check()
        if self.tokenization not in ("bytes", "bpe"):
            raise ValueError(f"tokenization must be 'bytes' or 'bpe', got {self.tokenization!r}")
        for name in ("train_len", "batch_size", "eval_every", "curve_rows", "eval_factor", "bucket_first", "beyond"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.train_len < 2:
            raise ValueError(f"train_len must be at least 2, got {self.train_len}")


@dataclasses.dataclass
class PasskeyProtocol(Protocol):
    """Passkey retrieval on the byte-level tokenizer. Train ``steps`` steps, each on rows of one of
    ``train_lengths`` (drawn per step) with the key at a uniform depth per row, ~``tokens_per_batch``
    tokens a step; then ``test_rows`` rows per (length, depth) of ``test_lengths`` x ``depths``."""

    steps: int = 1000
    lr: float = 1e-3
    train_lengths: Tuple[int, ...] = (1024, 2048, 3072, 4096)
    tokens_per_batch: int = 16384
    eval_every: int = 250
    curve_rows: int = 32
    test_lengths: Tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
    depths: Tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    test_rows: int = 20
    digits: int = 5

    @property
    def setting(self) -> str:
        return f"train-{min(self.train_lengths)}-{max(self.train_lengths)}"

    @property
    def vocab_size(self) -> int:
        return 258

    @property
    def max_train_length(self) -> int:
        return max(self.train_lengths)

    @property
    def train_tokens(self) -> int:
        """Expected: each length equally likely at every step."""
        per_step = sum(self.batch_size(n) * n for n in self.train_lengths) / len(self.train_lengths)
        return round(self.steps * per_step)

    def check(self) -> None:
        super().check()
        for name in ("tokens_per_batch", "eval_every", "curve_rows", "test_rows", "digits"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.train_lengths or not self.test_lengths or not self.depths:
            raise ValueError("train_lengths, test_lengths and depths must each name at least one value")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must lie in [0, 1], got {self.depths}")

    def batch_size(self, length: int) -> int:
        return max(1, self.tokens_per_batch // length)


@dataclasses.dataclass
class FarMQARProtocol(Protocol):
    """MQAR with every query at least ``min_query_position`` tokens in (None: the segment length, so no
    query shares MM-Rec's segment with its keys): ``num_kv_pairs`` pairs, Zoology's vocabulary. A
    curriculum: the budget of ``steps`` steps is split evenly over ``lengths`` from short to long
    (doubling), ~``tokens_per_batch`` tokens a step; the fixed test sets (``test_size`` rows per
    length) are scored at the end of each stage."""

    hidden_size: int = 128
    layers: int = 2
    steps: int = 1600
    lr: float = 1e-3
    vocab_size: int = 8192
    num_kv_pairs: int = 16
    lengths: Tuple[int, ...] = (1024, 2048, 4096, 8192)
    tokens_per_batch: int = 32768
    test_size: int = 256
    min_query_position: Optional[int] = None

    @property
    def setting(self) -> str:
        return f"p{self.num_kv_pairs}-{min(self.lengths)}-{max(self.lengths)}"

    @property
    def query_start(self) -> int:
        return self.min_query_position or self.segment_length or DEFAULT_SEGMENT

    @property
    def max_train_length(self) -> int:
        return max(self.lengths)

    @property
    def train_tokens(self) -> int:
        return sum(s["steps"] * s["batch_size"] * s["length"] for s in self.curriculum())

    def check(self) -> None:
        super().check()
        for name in ("vocab_size", "num_kv_pairs", "tokens_per_batch", "test_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.lengths:
            raise ValueError("lengths must name at least one length")
        if self.steps < len(self.lengths):
            raise ValueError(f"steps ({self.steps}) must give every one of the {len(self.lengths)} lengths a step")
        for length in self.lengths:  # far_mqar_batch's own check, before any training
            lc.far_mqar_batch(length, self.num_kv_pairs, self.query_start, self.vocab_size, 1, torch.Generator())

    def curriculum(self) -> List[Dict[str, int]]:
        """The stages in order: {"length", "steps", "batch_size"}; lengths ascending, the steps split
        evenly (the remainder to the last stage)."""
        lengths = sorted(self.lengths)
        share = self.steps // len(lengths)
        return [{"length": n, "steps": share + (self.steps - share * len(lengths) if i == len(lengths) - 1 else 0),
                 "batch_size": max(1, self.tokens_per_batch // n)} for i, n in enumerate(lengths)]


# A few seconds per run on CPU: tiny models, rows of tens to hundreds of tokens, memory segments of 16.
SMOKE_LM = dict(hidden_size=32, layers=2, steps=2, lr=3e-3, train_len=64, batch_size=2, eval_every=2, curve_rows=2,
                eval_rows=3, bucket_first=8, beyond=16, segment_length=16, bpe_vocab=300, max_works=4, max_chars=2000)
SMOKE_PASSKEY = dict(hidden_size=32, layers=2, steps=2, lr=3e-3, train_lengths=(128, 256), tokens_per_batch=512,
                     eval_every=2, curve_rows=2, test_lengths=(128, 256, 512), depths=(0.0, 0.5, 1.0), test_rows=2,
                     segment_length=16)
SMOKE_FAR_MQAR = dict(hidden_size=32, layers=2, steps=4, lr=3e-3, vocab_size=64, num_kv_pairs=4, lengths=(64, 128),
                      tokens_per_batch=256, test_size=8, segment_length=16)
SMOKE = {"lm": SMOKE_LM, "passkey": SMOKE_PASSKEY, "far_mqar": SMOKE_FAR_MQAR}
# The CPU probe (--probe): the LM task at a size two laptop cores train in minutes, rows of 1024 bytes over
# eight memory segments of 128, so the slots fold seven times a row. A direction between GPU sessions,
# reported in its own folder; the issue's targets are the GPU protocols'.
PROBE_LM = dict(hidden_size=128, layers=4, steps=400, lr=3e-3, train_len=1024, batch_size=4, eval_every=100, curve_rows=4,
                eval_rows=48, bucket_first=128, beyond=256, segment_length=128, eval_tokens=16384)
# ... and far MQAR at a size two cores train in minutes: 4 pairs, rows of 128 and 256 over memory segments of 32,
# so every query sits one to seven segments after its pair.
PROBE_FAR_MQAR = dict(hidden_size=64, layers=2, steps=4000, lr=3e-3, vocab_size=1024, num_kv_pairs=4, lengths=(128, 256),
                      tokens_per_batch=4096, test_size=256, segment_length=32)
PROBE = {"lm": PROBE_LM, "far_mqar": PROBE_FAR_MQAR}
# The language-modelling protocols: rows of 4096 tokens, and of 16384 (the same 32k tokens a step).
LM_BATCH = {4096: 8, 16384: 2}


def protocols(smoke: bool = False, lm_lengths: Sequence[int] = (4096, 16384), tokenizations: Sequence[str] = ("bytes",),
              probe: bool = False, **overrides) -> Dict[str, list]:
    """{task: [protocol, ...]}: the LM task one per (tokenization, training length), the others one each.
    ``overrides`` (steps, lr, ...) apply to every protocol; with ``smoke``, the SMOKE_* sizes (the LM's
    training length then the smoke's unless ``lm_lengths`` says otherwise); with ``probe``, the LM task and far
    MQAR at PROBE's sizes (passkey keeps its own)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    out: Dict[str, list] = {}
    lm = []
    for tokenization in tokenizations:
        for length in lm_lengths:
            base = (dict(SMOKE_LM) if smoke else dict(PROBE_LM) if probe
                    else {"batch_size": LM_BATCH.get(length, max(1, 32768 // length))})
            lm.append(LMProtocol(**{**base, "tokenization": tokenization, "train_len": length, **given}))
    out["lm"] = lm
    out["passkey"] = [PasskeyProtocol(**{**(SMOKE_PASSKEY if smoke else {}), **given})]
    out["far_mqar"] = [FarMQARProtocol(**{**(SMOKE_FAR_MQAR if smoke else PROBE_FAR_MQAR if probe else {}), **given})]
    for items in out.values():
        for protocol in items:
            protocol.check()
    return out


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass
class Documents:
    """The corpus's works as token ids, whole works held out: ``train`` and ``held_out`` {work: [n] long},
    ``byte_lengths`` [vocab] (UTF-8 bytes per token), ``vocab_size``."""

    train: Dict[str, torch.Tensor]
    held_out: Dict[str, torch.Tensor]
    byte_lengths: torch.Tensor
    vocab_size: int


_DOCUMENTS: Dict[str, Documents] = {}


def load_documents(protocol: LMProtocol, cache_dir: Optional[Path] = None) -> Documents:
    """Shakespeare's works tokenized as ``quality.lm_data`` does (the same corpus, split and tokenizers:
    bytes, or BPE trained on the training works) but kept one tensor per work rather than packed into
    rows, so rows can be cut inside each work (``document_rows``). Cached in memory and in ``cache_dir``."""
    from mm_rec_train.data import byte_level_tokenizer, load_shakespeare, split_works, train_tokenizer
    from mm_rec_train.evaluation import token_byte_lengths

    p = protocol
    key = (f"documents-{p.tokenization}{'-' + str(p.bpe_vocab) if p.tokenization == 'bpe' else ''}"
           f"-f{p.validation_fraction}-w{p.max_works}-c{p.max_chars}")
    if key in _DOCUMENTS:
        return _DOCUMENTS[key]
    cached = cache_dir / f"{key}.pt" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        _DOCUMENTS[key] = Documents(**torch.load(cached))
        return _DOCUMENTS[key]
    texts = load_shakespeare(p.max_works)
    if p.max_chars is not None:
        texts = {name: text[:p.max_chars] for name, text in texts.items()}
    train_texts, held_out_texts = split_works(texts, p.validation_fraction)
    tokenizer = byte_level_tokenizer() if p.tokenization == "bytes" else train_tokenizer(train_texts.values(), p.bpe_vocab)

    def encode(works: Dict[str, str]) -> Dict[str, torch.Tensor]:
        ids = tokenizer(list(works.values()), add_special_tokens=False)["input_ids"]
        return {name: torch.tensor(row, dtype=torch.long) for name, row in zip(works, ids)}

    documents = Documents(encode(train_texts), encode(held_out_texts), token_byte_lengths(tokenizer), len(tokenizer))
    if cached is not None:
        if not cached.parent.is_dir():
            cached.parent.mkdir(parents=True, exist_ok=True)
            (cached.parent / ".gitignore").write_text("*\n")  # token caches are rebuilt on demand
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        torch.save(dataclasses.asdict(documents), tmp)
        os.replace(tmp, cached)
    _DOCUMENTS[key] = documents
    return documents


def document_rows(documents: Dict[str, torch.Tensor], length: int) -> torch.Tensor:
    """[N, length]: each document cut into consecutive rows of ``length`` tokens, its tail (shorter than
    a row) dropped, so no row crosses a document boundary. Documents in name order."""
    rows = [ids[:len(ids) // length * length].view(-1, length) for _, ids in sorted(documents.items())
            if len(ids) >= length]
    return torch.cat(rows) if rows else torch.empty(0, length, dtype=torch.long)


# ----------------------------------------------------------------------------- tasks

@dataclasses.dataclass
class Context:
    """How a task runs: the device, the progress bar, the deadline (time.time(); a run past it raises
    quality.BudgetExhausted), a description for the bar, the cache folder."""

    device: torch.device
    progress: bool = True
    deadline: Optional[float] = None
    description: str = ""
    cache_dir: Optional[Path] = None


def _train(model, protocol: Protocol, next_batch, evaluate, eval_every: int, batch_size: int, seed: int,
           context: Context) -> Tuple[List[dict], int]:
    return quality.train_loop(model, next_batch, evaluate, protocol.steps, protocol.lr, eval_every,
                              protocol.weight_decay, protocol.warmup_fraction, deadline=context.deadline,
                              progress=context.progress, description=context.description, seed=seed,
                              batch_size=batch_size)


def _beyond_positions(model, length: int, max_positions: Optional[int]) -> Optional[str]:
    if max_positions is not None and length > max_positions:
        return f"{model}: rows of {length} tokens are beyond its {max_positions} positions"
    return None


def offset_summary(nats: torch.Tensor, n_bytes: torch.Tensor, rows: int, segment_length: int) -> dict:
    """Bits per byte at each offset p mod L over the positions after the first segment, and a summary:
    ``head`` over the first L/16 offsets of a segment (at least one), ``rest`` over the others, ``rise``
    = head - rest (a sawtooth makes it positive)."""
    L = segment_length
    by_nats = lc.loss_by_offset(nats, rows, L)
    by_bytes = lc.loss_by_offset(n_bytes.double(), rows, L)
    head = max(1, L // 16)

    def bpb(part: slice) -> float:
        return float(by_nats[part].sum() / math.log(2) / by_bytes[part].sum()) if float(by_bytes[part].sum()) else math.nan

    per_offset = [float(n / math.log(2) / b) if float(b) else math.nan for n, b in zip(by_nats, by_bytes)]
    summary = {"head_offsets": head, "head": bpb(slice(0, head)), "rest": bpb(slice(head, L))}
    summary["rise"] = summary["head"] - summary["rest"]
    return {"segment_length": L, "nats": by_nats.tolist(), "bits_per_byte": per_offset, "summary": summary}


def evaluate_positions(model, rows: torch.Tensor, byte_lengths: torch.Tensor, protocol: LMProtocol,
                       segment_length: int) -> dict:
    """One evaluation of held-out ``rows`` [N, T]: bits per byte by position bucket, over the positions
    from ``protocol.beyond`` on, and by offset inside a segment of ``segment_length``."""
    T = rows.shape[1]
    nats = lc.per_position_nats(model, rows, protocol.eval_batch(T))
    n_bytes = lc.per_position_bytes(rows, byte_lengths)
    result = {"length": T, "rows": len(rows),
              "buckets": lc.bucket_metrics(nats, n_bytes, len(rows), lc.position_buckets(T, protocol.bucket_first))}
    if T > protocol.beyond:
        (result["beyond"],) = lc.bucket_metrics(nats, n_bytes, len(rows), [(protocol.beyond, T)])
    if T >= 2 * segment_length:
        result["offsets"] = offset_summary(nats, n_bytes, len(rows), segment_length)
    return result


def lm_task(model, protocol: LMProtocol, seed: int, context: Context, name: str = "model",
            segment_length: int = DEFAULT_SEGMENT, max_positions: Optional[int] = None) -> dict:
    """Train ``model`` on rows of ``protocol.train_len`` (seeded order, the same for every model), then
    ``evaluate_positions`` on the held-out works at each of ``protocol.eval_lengths`` (skipped, with the
    reason, beyond ``max_positions`` or where the held-out works hold no row that long).
    Returns {"curve", "steps_done", "result"}."""
    documents = load_documents(protocol, context.cache_dir)
    if documents.vocab_size != protocol.vocab_size:
        raise ValueError(f"the {protocol.tokenization} tokenizer has {documents.vocab_size} tokens, "
                         f"the protocol expected {protocol.vocab_size}")
    train = document_rows(documents.train, protocol.train_len)
    if not len(train):
        raise ValueError(f"train_len {protocol.train_len}: no training work holds a row that long")
    held_out = {n: document_rows(documents.held_out, n)[:protocol.eval_rows] for n in protocol.eval_lengths}
    train = train.to(context.device)
    order = quality.batch_order(len(train), protocol.steps, protocol.batch_size, seed).to(context.device)
    curve_rows = held_out[protocol.train_len][:protocol.curve_rows]

    def next_batch(step):
        batch = train[order[step]]
        return batch, batch

    def evaluate():
        if not len(curve_rows):
            return {}
        return quality.lm_metrics(model, curve_rows, documents.byte_lengths, protocol.eval_batch(protocol.train_len))

    curve, steps_done = _train(model, protocol, next_batch, evaluate, protocol.eval_every, protocol.batch_size, seed,
                               context)
    evaluations = []
    for length, rows in held_out.items():
        reason = _beyond_positions(name, length, max_positions)
        if reason is None and not len(rows):
            reason = f"the held-out works hold no row of {length} tokens"
        evaluations.append({"length": length, "skipped": reason} if reason else
                           evaluate_positions(model, rows, documents.byte_lengths, protocol, segment_length))
    result = {"tokenization": protocol.tokenization, "train_len": protocol.train_len, "segment_length": segment_length,
              "train_rows": len(train), "evaluations": evaluations}
    return {"curve": curve, "steps_done": steps_done, "result": result}


def passkey_task(model, protocol: PasskeyProtocol, seed: int, context: Context, name: str = "model",
                 max_positions: Optional[int] = None) -> dict:
    """Train ``model`` on passkey rows (a length of ``protocol.train_lengths`` per step, a uniform depth
    per row, seeded: the same rows for every model), then the accuracy grid: ``test_rows`` fresh rows per
    (length, depth), exact match of the key's digits (``long_context.answer_accuracy``)."""
    from mm_rec_train.data import byte_level_tokenizer

    tokenizer = byte_level_tokenizer()
    generator = torch.Generator().manual_seed(seed)
    lengths = tuple(protocol.train_lengths)

    def next_batch(step):
        length = lengths[int(torch.randint(len(lengths), (), generator=generator))]
        ids, labels, _ = lc.passkey_batch(tokenizer, length, protocol.batch_size(length), generator, digits=protocol.digits)
        return ids.to(context.device), labels.to(context.device)

    longest = max(lengths)
    check_ids, check_labels, _ = lc.passkey_batch(tokenizer, longest, protocol.curve_rows,
                                                  torch.Generator().manual_seed(2_000_003 + seed), digits=protocol.digits)

    def evaluate():
        correct = lc.answer_accuracy(model, check_ids, check_labels, protocol.eval_batch(longest))
        return {"accuracy": float(correct.float().mean())}

    curve, steps_done = _train(model, protocol, next_batch, evaluate, protocol.eval_every,
                               protocol.batch_size(longest), seed, context)
    test = torch.Generator().manual_seed(1_000_003 + seed)  # another stream than training's
    cells = []
    for length in protocol.test_lengths:
        reason = _beyond_positions(name, length, max_positions)
        for depth in protocol.depths:
            if reason:
                cells.append({"length": length, "depth": depth, "skipped": reason})
                continue
            ids, labels, _ = lc.passkey_batch(tokenizer, length, protocol.test_rows, test, depth=depth,
                                              digits=protocol.digits)
            correct = lc.answer_accuracy(model, ids, labels, protocol.eval_batch(length))
            cells.append({"length": length, "depth": depth, "rows": len(correct), "correct": int(correct.sum()),
                          "accuracy": float(correct.float().mean())})
    result = {"train_lengths": list(lengths), "cells": cells}
    return {"curve": curve, "steps_done": steps_done, "result": result}


def far_mqar_task(model, protocol: FarMQARProtocol, seed: int, context: Context, name: str = "model",
                  max_positions: Optional[int] = None) -> dict:
    """Train ``model`` through the curriculum (``protocol.curriculum()``: each stage's rows drawn fresh
    from a seeded generator on the device), scoring every length's fixed test set (drawn on the CPU from
    another seed) at the end of each stage. The result holds the last scores and the budget."""
    stages = protocol.curriculum()
    ends = [sum(s["steps"] for s in stages[:i + 1]) for i in range(len(stages))]
    generator = torch.Generator(context.device).manual_seed(seed)
    P, start, V = protocol.num_kv_pairs, protocol.query_start, protocol.vocab_size
    tests = {}
    for length in protocol.lengths:
        test = torch.Generator().manual_seed(1_000_003 + seed + length)
        tests[length] = lc.far_mqar_batch(length, P, start, V, protocol.test_size, test)

    def next_batch(step):
        stage = stages[next(i for i, end in enumerate(ends) if step < end)]
        inputs, targets = lc.far_mqar_batch(stage["length"], P, start, V, stage["batch_size"], generator)
        return inputs, quality.hf_labels(targets)

    def evaluate():
        scores = []
        for length, (inputs, targets) in tests.items():
            reason = _beyond_positions(name, length, max_positions)
            if reason:
                scores.append({"length": length, "skipped": reason})
                continue
            scores.append({"length": length, **quality.mqar_metrics(model, inputs, targets, protocol.eval_batch(length))})
        measured = [s["accuracy"] for s in scores if "accuracy" in s]
        return {"accuracy": sum(measured) / len(measured) if measured else math.nan, "lengths": scores}

    curve, steps_done = _train(model, protocol, next_batch, evaluate, stages[0]["steps"], stages[0]["batch_size"], seed,
                               context)
    final = curve[-1] if curve and "lengths" in curve[-1] else evaluate()  # a diverged run was not evaluated
    budget = {"steps": protocol.steps, "tokens": protocol.train_tokens, "stages": stages}
    result = {"num_kv_pairs": P, "min_query_position": start, "budget": budget, "lengths": final["lengths"]}
    return {"curve": curve, "steps_done": steps_done, "result": result}


# ----------------------------------------------------------------------------- plans

@dataclasses.dataclass
class Run:
    """One training run of one model on one task's protocol with one seed; ``spec`` (JSON) defines it."""

    task: str
    model: str
    seed: int
    protocol: Protocol
    spec: dict
    refused: Optional[str] = None

    @property
    def setting(self) -> str:
        return self.protocol.setting

    @property
    def family(self) -> str:
        return family_of(self.model)

    @property
    def name(self) -> str:
        digest = hashlib.sha1(json.dumps(self.spec, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.task}-{self.setting}-{self.model}-s{self.seed}-{digest}"


def size(model: str, protocol: Protocol) -> dict:
    """``quality.matched_size`` at the protocol's vocabulary, width and depth."""
    family = family_of(model)
    overrides = variant_overrides(model, protocol.segment_length) if family == "mmrec" else None
    return quality.matched_size(family, protocol.vocab_size, protocol.hidden_size, protocol.layers, overrides)


def plan_runs(tasks: Sequence[str], models: Sequence[str], seeds: Sequence[int], by_task: Dict[str, list],
              device: torch.device) -> List[Run]:
    """Every (task, protocol, seed, model) in that order; runs that cannot be made are marked ``refused``."""
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"--task: expected one of {', '.join(TASKS)} or all, got {task!r}")
    for model in models:
        family_of(model)
    code = quality.code_fingerprint()
    memory_variants_code = hashlib.sha256(Path(memory_variants.__file__).read_bytes()).hexdigest()[:12]
    runs = []
    for task in tasks:
        for protocol in by_task[task]:
            for seed in seeds:
                for model in models:
                    reason = refusal(model, device)
                    spec = {"task": task, "setting": protocol.setting, "model": model, "family": family_of(model),
                            "seed": seed, "protocol": dataclasses.asdict(protocol), "protocol_version": PROTOCOL_VERSION}
                    if family_of(model) == "mmrec":
                        spec.update(overrides=variant_overrides(model, protocol.segment_length), mmrec_code=code)
                        if prototype_of(model):
                            spec.update(prototype=prototype_of(model), prototype_code=memory_variants_code)
                    if reason is None:
                        try:
                            spec.update(size(model, protocol))
                        except ValueError as err:  # RefusedRun included
                            reason = f"{model}: {' '.join(str(err).split())}"
                    runs.append(Run(task, model, seed, protocol, spec, reason))
    return runs


# ----------------------------------------------------------------------------- running

class LongStudy:
    """Runs a plan into ``out``: each run built, trained, measured and written to ``out/runs``; recorded
    runs skipped unless ``rerun``. With ``max_minutes``, a run is not started when the time left is
    shorter than the longest run of this call so far took, and one still going at the limit is stopped
    unsaved (so a call can be sized to a machine's time limit)."""

    def __init__(self, out, device: Optional[str] = None, rerun: bool = False, max_minutes: Optional[float] = None,
                 progress: bool = True, log: Callable[[str], None] = print, command: str = ""):
        self.out = Path(out)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.rerun, self.max_minutes, self.progress, self.log, self.command = rerun, max_minutes, progress, log, command
        self.device_name = quality.device_name(self.device)

    def path(self, run: Run) -> Path:
        return self.out / RUNS / f"{run.name}.json"

    def status(self, run: Run) -> str:
        """"refused", "done" (recorded, same spec and code) or "todo"."""
        if run.refused:
            return "refused"
        if not self.rerun and self.path(run).is_file():
            return "done"
        return "todo"

    def print_plan(self, runs: Sequence[Run]) -> None:
        self.log(f"planned runs: {len(runs)} on {self.device_name}")
        for reason in sorted({r.refused for r in runs if r.refused}):
            self.log(f"  refused: {reason}")
        for i, run in enumerate(runs, 1):
            params = run.spec.get("parameters")
            shown = f"{params / 1e6:.2f}M" if params else "-"
            self.log(f"  {i:3d}. {run.task:<8} {run.setting:<16} {run.model:<20} seed {run.seed}  {shown:>8} "
                     f"{_count(run.protocol.train_tokens):>7} tokens  {self.status(run)}")

    def run_all(self, runs: Sequence[Run]) -> Dict[str, List[str]]:
        """Run the plan in order. Returns {"done", "skipped", "refused", "over_budget", "failed"}: run names."""
        from tqdm.auto import tqdm

        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device here")
        started = time.time()
        deadline = None if self.max_minutes is None else started + 60 * self.max_minutes
        outcome: Dict[str, List[str]] = {k: [] for k in ("done", "skipped", "refused", "over_budget", "failed")}
        longest = 0.0  # seconds of the longest run of this call: the estimate of the next one
        bar = tqdm(runs, desc="long study", disable=not self.progress, leave=False, dynamic_ncols=True)
        for run in bar:
            status = self.status(run)
            if status != "todo":
                outcome["refused" if status == "refused" else "skipped"].append(run.name)
                continue
            if deadline is not None and time.time() + longest > deadline:
                outcome["over_budget"].append(run.name)
                continue
            kind, record = quality.attempt(lambda: self.train(run, deadline), run.name, self.log, self.device)
            outcome[kind].append(run.name)
            if kind != "done":
                continue
            longest = max(longest, record["seconds"]["total"])
            self.log(f"done: {run.name}: {summary_line(record)} ({record['seconds']['total']:.0f} s)")
        bar.close()
        wall = quality.log_invocation(self.out, self.command, self.device_name, started,
                                      {k: len(v) for k, v in outcome.items()}, [r.refused for r in runs if r.refused])
        self.log(f"runs: {len(outcome['done'])} done, {len(outcome['skipped'])} already recorded (skipped), "
                 f"{len(outcome['refused'])} refused, {len(outcome['over_budget'])} over budget, "
                 f"{len(outcome['failed'])} failed; wall time {wall / 60:.1f} min")
        if outcome["over_budget"]:
            self.log("rerun the same command to continue: recorded runs are skipped")
        return outcome

    def train(self, run: Run, deadline: Optional[float] = None) -> dict:
        s, protocol = run.spec, run.protocol
        started = time.time()
        torch.manual_seed(run.seed)
        longest = protocol.max_train_length
        model = quality.build_model(run.family, protocol.vocab_size, protocol.hidden_size, protocol.layers,
                                    s["intermediate_size"], s.get("overrides"), max_length=longest)
        if s.get("prototype"):
            model = memory_variants.PROTOTYPES[s["prototype"]](model)
        model = model.to(self.device)
        parameters = quality.count_parameters(model)
        # Llama's positions end at its longest training row; the recurrent models have no such limit
        max_positions = longest if run.family == "llama" else None
        context = Context(self.device, self.progress, deadline, f"{run.task} {run.setting} {run.model} s{run.seed}",
                          self.out / CACHE)
        built = time.time()
        if run.task == "lm":
            outcome = lm_task(model, protocol, run.seed, context, run.model, segment_of(run.model, protocol.segment_length),
                              max_positions)
        elif run.task == "passkey":
            outcome = passkey_task(model, protocol, run.seed, context, run.model, max_positions)
        else:
            outcome = far_mqar_task(model, protocol, run.seed, context, run.model, max_positions)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        ended = time.time()
        curve = outcome["curve"]
        record = {
            "finished": True, "name": run.name, "task": run.task, "setting": run.setting, "model": run.model,
            "family": run.family, "seed": run.seed, "spec": s, "parameters": parameters,
            "steps_done": outcome["steps_done"],
            "diverged": not (curve and math.isfinite(curve[-1].get("train_loss", math.nan))),
            "curve": curve, "result": outcome["result"], "device": self.device_name, "versions": quality.versions(),
            "git": quality.git_commit(), "command": self.command,
            "seconds": {"build": built - started, "train_and_measure": ended - built, "total": ended - started},
            "ended": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ended)),
        }
        quality.atomic_write_json(self.path(run), record)
        del model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return record


def _count(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:g}"


def summary_line(record: dict) -> str:
    result = record["result"]
    if record["task"] == "lm":
        parts = [f"{e['length']}: {e['beyond']['bits_per_byte']:.4f}" for e in result["evaluations"] if "beyond" in e]
        return "bits per byte beyond position " + str(record["spec"]["protocol"]["beyond"]) + " at " + \
            (", ".join(parts) or "-")
    if record["task"] == "passkey":
        measured = [c["accuracy"] for c in result["cells"] if "accuracy" in c]
        return f"passkey accuracy {100 * sum(measured) / max(1, len(measured)):.1f}% over {len(measured)} cells"
    return "far MQAR accuracy " + ", ".join(f"{s['length']}: {100 * s['accuracy']:.1f}%" for s in result["lengths"]
                                            if "accuracy" in s)


# ----------------------------------------------------------------------------- records and targets

def load_records(out) -> List[dict]:
    """The newest finished record of each (task, setting, model, seed) under ``out/runs`` (a record of
    older MM-Rec code is superseded by a newer one)."""
    return quality.newest_records(out, lambda r: r.get("task") in TASKS,
                                  lambda r: (r["task"], r["setting"], r["model"], r["seed"]))


def _cells(records: Sequence[dict], task: str) -> Dict[str, Dict[str, List[dict]]]:
    """{setting: {model: [records by seed]}} of one task."""
    out: Dict[str, Dict[str, List[dict]]] = {}
    for record in sorted(records, key=lambda r: r["seed"]):
        if record["task"] == task:
            out.setdefault(record["setting"], {}).setdefault(record["model"], []).append(record)
    return out


def _ordered(models) -> List[str]:
    rank = {name: i for i, name in enumerate(MODELS)}
    return sorted(models, key=lambda m: (rank.get(m, len(rank)), m))


def _evaluation(record: dict, length: int) -> Optional[dict]:
    for evaluation in record["result"]["evaluations"]:
        if evaluation["length"] == length and "skipped" not in evaluation:
            return evaluation
    return None


def beyond_values(runs: Sequence[dict], length: int) -> List[float]:
    """Each seed's bits per byte over the positions from the protocol's ``beyond`` on, at ``length``."""
    values = []
    for record in runs:
        evaluation = _evaluation(record, length)
        if evaluation is not None and "beyond" in evaluation:
            values.append(evaluation["beyond"]["bits_per_byte"])
    return values


def spread(values: Sequence[float]) -> float:
    """The seeds' spread: max - min (0 for one value)."""
    return max(values) - min(values) if values else math.nan


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def passkey_grid(runs: Sequence[dict]) -> Dict[Tuple[int, float], float]:
    """{(length, depth): accuracy averaged over the seeds} of the measured cells."""
    cells: Dict[Tuple[int, float], List[float]] = {}
    for record in runs:
        for cell in record["result"]["cells"]:
            if "accuracy" in cell:
                cells.setdefault((cell["length"], cell["depth"]), []).append(cell["accuracy"])
    return {key: _mean(values) for key, values in cells.items()}


def mqar_accuracy(runs: Sequence[dict]) -> Dict[int, float]:
    """{length: accuracy averaged over the seeds} of the measured lengths."""
    by_length: Dict[int, List[float]] = {}
    for record in runs:
        for score in record["result"]["lengths"]:
            if "accuracy" in score:
                by_length.setdefault(score["length"], []).append(score["accuracy"])
    return {length: _mean(values) for length, values in sorted(by_length.items())}


MET, MISSED, NOT_MEASURED = "met", "missed", "not measured"


def targets(records: Sequence[dict]) -> List[Tuple[str, str]]:
    """The issue's targets as (status, text), status one of "met", "missed", "not measured"; MM-Rec is
    ``REFERENCE`` (MMRecConfig's defaults), each value a mean over the recorded seeds."""
    lines: List[Tuple[str, str]] = []
    lm = _cells(records, "lm")
    if not lm:
        lines.append((NOT_MEASURED, "LM beyond the first 1,024 tokens (MM-Rec < no-fold by more than the seed spread; "
                                    "MM-Rec <= HGRN and Gated DeltaNet): no LM runs recorded"))
    for setting, models in sorted(lm.items()):
        mine = models.get(REFERENCE, [])
        lengths = sorted({e["length"] for r in (mine or next(iter(models.values()))) for e in r["result"]["evaluations"]})
        for length in lengths:
            boundary = (mine or next(iter(models.values())))[0]["spec"]["protocol"]["beyond"]
            where = f"LM {setting}, evaluated at {length} tokens, positions from {boundary} on"
            ours = beyond_values(mine, length)
            fold_off = beyond_values(models.get("mmrec-no-fold", []), length)
            if not ours or not fold_off:
                lines.append((NOT_MEASURED, f"{where}: MM-Rec < its no-fold ablation (needs runs of both "
                                            f"{REFERENCE} and mmrec-no-fold measured at this length)"))
            elif len(ours) < 2 or len(fold_off) < 2:
                lines.append((NOT_MEASURED, f"{where}: MM-Rec {_mean(ours):.4f} vs no-fold {_mean(fold_off):.4f} bits "
                                            f"per byte, but the seed spread needs at least 2 seeds of each "
                                            f"({len(ours)} and {len(fold_off)})"))
            else:
                gap, noise = _mean(fold_off) - _mean(ours), max(spread(ours), spread(fold_off))
                lines.append((MET if gap > noise else MISSED,
                              f"{where}: MM-Rec {_mean(ours):.4f} vs no-fold {_mean(fold_off):.4f} bits per byte "
                              f"(gap {gap:+.4f}, seed spread {noise:.4f}; {len(ours)} and {len(fold_off)} seeds)"))
            for peer, title in (("hgrn", "HGRN"), ("gdn", "Gated DeltaNet")):
                theirs = beyond_values(models.get(peer, []), length)
                if not ours or not theirs:
                    lines.append((NOT_MEASURED, f"{where}: MM-Rec <= {title} (no {REFERENCE if not ours else peer} "
                                                f"run measured at this length)"))
                else:
                    lines.append((MET if _mean(ours) <= _mean(theirs) else MISSED,
                                  f"{where}: MM-Rec {_mean(ours):.4f} vs {title} {_mean(theirs):.4f} bits per byte"))
    passkey = _cells(records, "passkey")
    if not passkey:
        lines.append((NOT_MEASURED, "passkey >= 90% at 4x the training length at every depth: no passkey runs recorded"))
    for setting, models in sorted(passkey.items()):
        mine = models.get(REFERENCE, [])
        if not mine:
            lines.append((NOT_MEASURED, f"passkey {setting}: no {REFERENCE} run recorded"))
            continue
        protocol = mine[0]["spec"]["protocol"]
        length = 4 * max(protocol["train_lengths"])
        grid = passkey_grid(mine)
        at = {depth: grid[(length, depth)] for depth in protocol["depths"] if (length, depth) in grid}
        if len(at) < len(protocol["depths"]):
            lines.append((NOT_MEASURED, f"passkey {setting}: {length} tokens (4x the longest training row) not tested "
                                        "at every depth"))
        else:
            worst = min(at.values())
            lines.append((MET if worst >= 0.9 else MISSED,
                          f"passkey {setting}: at {length} tokens the worst depth scores {100 * worst:.1f}% "
                          f"(>= 90% needed; {len(mine)} seeds)"))
    mqar = _cells(records, "far_mqar")
    if not mqar:
        lines.append((NOT_MEASURED, "far MQAR >= Gated DeltaNet, and >= 90% where attention reaches 99%: "
                                    "no far-MQAR runs recorded"))
    for setting, models in sorted(mqar.items()):
        mine = mqar_accuracy(models.get(REFERENCE, []))
        if not mine:
            lines.append((NOT_MEASURED, f"far MQAR {setting}: no {REFERENCE} run recorded"))
            continue
        gdn = mqar_accuracy(models.get("gdn", []))
        shared = [n for n in mine if n in gdn]
        if not shared:
            lines.append((NOT_MEASURED, f"far MQAR {setting}: MM-Rec >= Gated DeltaNet (no gdn run recorded)"))
        else:
            behind = [n for n in shared if mine[n] < gdn[n]]
            lines.append((MISSED if behind else MET, f"far MQAR {setting}: MM-Rec >= Gated DeltaNet at every length "
                          + ", ".join(f"{n}: {100 * mine[n]:.1f}% vs {100 * gdn[n]:.1f}%" for n in shared)))
        attention = mqar_accuracy(models.get("llama", []))
        solved = [n for n in mine if attention.get(n, 0.0) >= 0.99]
        if not attention:
            lines.append((NOT_MEASURED, f"far MQAR {setting}: >= 90% where attention reaches 99% (no llama run recorded)"))
        elif not solved:
            lines.append((NOT_MEASURED, f"far MQAR {setting}: attention reached 99% at no length, so the 90% target "
                                        "applies nowhere"))
        else:
            short = [n for n in solved if mine[n] < 0.9]
            lines.append((MISSED if short else MET, f"far MQAR {setting}: >= 90% where attention reaches 99%: "
                          + ", ".join(f"{n}: {100 * mine[n]:.1f}% (attention {100 * attention[n]:.1f}%)" for n in solved)))
    return lines


# ----------------------------------------------------------------------------- the report

def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _with_spread(values: Sequence[float], digits: int = 4, scale: float = 1.0) -> str:
    if not values:
        return "-"
    shown = f"{scale * _mean(values):.{digits}f}"
    return shown + (f" ±{scale * spread(values) / 2:.{digits}f}" if len(values) > 1 else "")


def _protocol_line(protocol: dict, parameters: Dict[str, int]) -> str:
    sizes = ", ".join(f"{m} {p / 1e6:.2f}M" for m, p in parameters.items())
    fields = ", ".join(f"{k} {v}" for k, v in protocol.items() if v is not None and k not in ("max_works", "max_chars"))
    return f"Protocol: {fields}. Parameters: {sizes}."


def _environment(records: Sequence[dict], out: Path) -> List[str]:
    return quality.environment_lines(records, out, "Training and measuring time of these runs")


def _lm_section(records: Sequence[dict], out: Path) -> List[str]:
    lines = []
    for setting, models in sorted(_cells(records, "lm").items()):
        first = next(iter(models.values()))[0]
        protocol = first["spec"]["protocol"]
        parameters = {m: models[m][0]["parameters"] for m in _ordered(models)}
        lines += [f"### {protocol['tokenization']}, trained on rows of {protocol['train_len']} tokens", "",
                  _protocol_line(protocol, parameters), ""]
        lengths = sorted({e["length"] for runs in models.values() for r in runs for e in r["result"]["evaluations"]})
        for length in lengths:
            buckets = lc.position_buckets(length, protocol["bucket_first"])
            names = [f"{_tokens(a)}-{_tokens(b)}" for a, b in buckets]
            lines += [f"Held-out bits per byte by position, rows of {length} tokens (mean over seeds ± half their "
                      "range):", "", "| model | seeds | rows | " + " | ".join(names)
                      + f" | from {_tokens(protocol['beyond'])} on |", "|---|---|---|" + "---|" * (len(names) + 1)]
            curves, skipped = {}, []
            for model in _ordered(models):
                runs = models[model]
                measured = [e for e in (_evaluation(r, length) for r in runs) if e is not None]
                if not measured:
                    reasons = {e.get("skipped") for r in runs for e in r["result"]["evaluations"] if e["length"] == length}
                    skipped += sorted(str(x) for x in reasons)  # each names its model
                    continue
                cells = [_with_spread([e["buckets"][i]["bits_per_byte"] for e in measured]) for i in range(len(buckets))]
                beyond = _with_spread([e["beyond"]["bits_per_byte"] for e in measured if "beyond" in e])
                lines.append(f"| {model} | {len(measured)} | {measured[0]['rows']} | " + " | ".join(cells)
                             + f" | {beyond} |")
                curves[model] = [{"end": b["end"], "bits_per_byte": _mean([e["buckets"][i]["bits_per_byte"] for e in measured])}
                                 for i, b in enumerate(measured[0]["buckets"])]
            if skipped:
                lines += ["", "Not measured at this length: " + "; ".join(sorted(set(skipped))) + "."]
            if curves:
                png = f"lm-{setting}-at-{length}.png"
                lc.plot_loss_by_position(curves, out / png, f"LM {setting}: held-out bits per byte by position, "
                                                            f"rows of {length} tokens")
                lines += ["", f"![bits per byte by position]({png})"]
            lines.append("")
        lines += ["Offsets inside the memory segment (positions after the first segment, rows of the training length; "
                  "the head is the first sixteenth of a segment; the peers at the default segment, as a control): "
                  "a rise says a segment's first tokens miss the previous segment.", "",
                  "| model | segment | bits per byte, head | rest | rise |", "|---|---|---|---|---|"]
        for model in _ordered(models):
            measured = [e["offsets"] for e in (_evaluation(r, protocol["train_len"]) for r in models[model])
                        if e is not None and "offsets" in e]
            if measured:
                s = [m["summary"] for m in measured]
                lines.append(f"| {model} | {measured[0]['segment_length']} (head {s[0]['head_offsets']}) | "
                             f"{_with_spread([x['head'] for x in s])} | {_with_spread([x['rest'] for x in s])} | "
                             f"{_with_spread([x['rise'] for x in s])} |")
        lines.append("")
    return lines


def _passkey_section(records: Sequence[dict], out: Path) -> List[str]:
    lines = []
    for setting, models in sorted(_cells(records, "passkey").items()):
        protocol = next(iter(models.values()))[0]["spec"]["protocol"]
        parameters = {m: models[m][0]["parameters"] for m in _ordered(models)}
        lines += [f"### Trained on rows of {', '.join(map(str, protocol['train_lengths']))} tokens", "",
                  _protocol_line(protocol, parameters), ""]
        lengths, depths = protocol["test_lengths"], protocol["depths"]
        for model in _ordered(models):
            grid = passkey_grid(models[model])
            lines += [f"**{model}** ({len(models[model])} seeds): accuracy (%) by depth (rows) and length (columns)", "",
                      "| depth | " + " | ".join(_tokens(n) for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
            for depth in depths:
                lines.append(f"| {depth:g} | " + " | ".join(f"{100 * grid[(n, depth)]:.0f}" if (n, depth) in grid else "-"
                                                            for n in lengths) + " |")
            reasons = sorted({c["skipped"] for r in models[model] for c in r["result"]["cells"] if "skipped" in c})
            if reasons:
                lines += ["", "Not measured: " + "; ".join(reasons) + "."]
            if grid:
                png = f"passkey-{setting}-{model}.png"
                lc.plot_passkey(grid, out / png, f"passkey, {model}: accuracy by length and depth")
                lines += ["", f"![passkey accuracy]({png})"]
            lines.append("")
    return lines


def _far_mqar_section(records: Sequence[dict]) -> List[str]:
    lines = []
    for setting, models in sorted(_cells(records, "far_mqar").items()):
        first = next(iter(models.values()))[0]
        protocol, budget = first["spec"]["protocol"], first["result"]["budget"]
        parameters = {m: models[m][0]["parameters"] for m in _ordered(models)}
        stages = ", ".join(f"{s['steps']} steps of {s['batch_size']} x {s['length']}" for s in budget["stages"])
        lengths = sorted(protocol["lengths"])
        lines += [f"### {protocol['num_kv_pairs']} pairs, every query from position {first['result']['min_query_position']} "
                  "on", "", _protocol_line(protocol, parameters), "",
                  f"Budget: {budget['steps']} steps, {budget['tokens']:,} tokens, the curriculum {stages}.", "",
                  "Test accuracy (%) by length, at the end of the curriculum (mean over seeds ± half their range):", "",
                  "| model | seeds | " + " | ".join(_tokens(n) for n in lengths) + " |", "|---|---|" + "---|" * len(lengths)]
        for model in _ordered(models):
            runs = models[model]
            cells = []
            for n in lengths:
                values = [s["accuracy"] for r in runs for s in r["result"]["lengths"] if s["length"] == n and "accuracy" in s]
                cells.append(_with_spread(values, 1, 100.0))
            lines.append(f"| {model} | {len(runs)} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


PROBE_NOTE = ("**The CPU probe** (`--probe`): models trained for minutes on two cores: language modelling at about 1M "
              "parameters, with memory segments of 128 so that rows of 1024 cross eight of them, and far MQAR at hidden "
              "64 with segments of 32, so that every query sits one to seven segments after its pair. It points a "
              "direction between GPU sessions; the issue's targets below are checked at this size, not at the issue's.")


def write_report(out, probe: bool = False) -> Optional[Path]:
    """``out``/README.md and its plots from the recorded runs; None (nothing written) without runs.
    ``probe``: the runs are the CPU probe's (a note under the title says what that means)."""
    out = Path(out)
    records = load_records(out)
    if not records:
        return None
    lines = ["# The long-context study (issue 26)" + (": CPU probe" if probe else ""), ""]
    lines += [PROBE_NOTE, ""] if probe else []
    lines += ["Does MM-Rec's memory carry information across its segments? Written by `research/long_study.py "
              "--report` from the runs in `runs/` (one JSON per task, setting, model and seed). MM-Rec is "
              f"`{REFERENCE}` (MMRecConfig's defaults); `mmrec-<ablation>` changes one field of it. Every model is "
              "matched to HGRN's parameter count where its FFN width allows; bits per byte = held-out nats / ln 2 / "
              "UTF-8 bytes of the predicted tokens; every held-out row is read from a fresh state. Llama is not "
              "evaluated beyond its longest training row.", "", "## The issue's targets", ""]
    for status, text in targets(records):
        lines.append(f"* **{status}**: {text}")
    lines.append("")
    lines += quality.skipped_lines(records, out)
    sections = (("## Language modelling: bits per byte by position", _lm_section(records, out)),
                ("## Passkey retrieval", _passkey_section(records, out)),
                ("## MQAR beyond a segment (far MQAR)", _far_mqar_section(records)))
    for title, body in sections:
        lines += [title, ""] + (body or ["No runs recorded.", ""])
    lines += _environment(records, out)
    path = out / REPORT
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- command line


def parse_args(argv):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=(*TASKS, "all"), default="all")
    parser.add_argument("--models", nargs="+", choices=MODELS, metavar="MODEL",
                        help=f"any of {' '.join(MODELS)} (default all; --smoke: mmrec-default llama)")
    parser.add_argument("--seeds", nargs="+", type=non_negative_int, default=[0], help="seeds (default 0)")
    parser.add_argument("--out", help="output folder (default docs/quality/long; --smoke: a new temporary folder)")
    parser.add_argument("--device", type=device_type, help="cuda or cpu (default cuda when available; --smoke: cpu)")
    parser.add_argument("--smoke", action="store_true", help="tiny protocols on CPU, seconds per run")
    parser.add_argument("--probe", action="store_true",
                        help="the lm task (hidden 128, 4 layers, rows of 1024 over segments of 128) or far MQAR "
                             "(hidden 64, 2 layers, rows of 128-256 over segments of 32) at a CPU size, minutes per "
                             "run, written to docs/quality/long_probe")
    parser.add_argument("--lm-lengths", nargs="+", type=positive_int,
                        help="LM training lengths, one protocol each (default 4096 16384; --smoke 64)")
    parser.add_argument("--tokenizations", nargs="+", choices=("bytes", "bpe"), default=["bytes"],
                        help="LM tokenizations (default bytes)")
    parser.add_argument("--steps", type=positive_int, help="training steps of every task (defaults: LM 600, passkey 1000, "
                                                           "far MQAR 1600)")
    parser.add_argument("--lr", type=positive_float, help="learning rate of every task (defaults: LM 2e-3, others 1e-3)")
    parser.add_argument("--rerun", action="store_true", help="repeat runs already recorded and replace their records")
    parser.add_argument("--max-minutes", type=positive_float,
                        help="time limit of this call: a run is not started when the time left is shorter than "
                             "this call's longest run so far; a run still going at the limit is stopped, not saved")
    parser.add_argument("--plan", action="store_true", help="list the runs, their sizes and status; train nothing")
    parser.add_argument("--report", action="store_true", help="write OUT/README.md and the plots from OUT/runs; train nothing")
    parser.add_argument("--threads", type=positive_int, help="CPU threads (default: the idle cores)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = parser.parse_args(argv)
    if args.probe and (args.smoke or (args.task not in PROBE and not args.report)):
        parser.error(f"--probe: measures the tasks {' and '.join(PROBE)} (--task), and not with --smoke")
    return args


def output_folder(args) -> Path:
    default = REPOSITORY / "docs" / "quality" / "long"
    if args.probe:
        default = default.with_name("long_probe")
    return quality.study_folder(args.out, default, "mmrec-long-smoke-" if args.smoke else None, "--out", "docs/quality/long")


def main(argv=None) -> int:
    return run_main(lambda: _main(argv))


def _main(argv) -> int:
    args = parse_args(argv)
    out = output_folder(args)
    if args.report:
        path = write_report(out, probe=args.probe)
        print(f"wrote {path}" if path else f"no recorded runs in {out / RUNS}: nothing to report")
        return 0
    given = list(sys.argv[1:] if argv is None else argv)
    command = "python research/long_study.py " + " ".join(shlex.quote(a) for a in given)
    tasks = TASKS if args.task == "all" else (args.task,)
    models = args.models or (("mmrec-default", "llama") if args.smoke else MODELS)
    lengths = args.lm_lengths or ((SMOKE_LM["train_len"],) if args.smoke else (PROBE_LM["train_len"],) if args.probe
                                  else (4096, 16384))
    by_task = protocols(args.smoke, lengths, args.tokenizations, probe=args.probe, steps=args.steps, lr=args.lr)
    device = torch.device(args.device or ("cpu" if args.smoke else ("cuda" if torch.cuda.is_available() else "cpu")))
    set_threads(args.threads)
    runs = plan_runs(tasks, models, args.seeds, by_task, device)
    study = LongStudy(out, str(device), rerun=args.rerun, max_minutes=args.max_minutes, progress=not args.no_progress,
                      command=command)
    print(f"output: {out}")
    study.print_plan(runs)
    if args.plan:
        return 0
    outcome = study.run_all(runs)
    path = write_report(out, probe=args.probe)
    if path:
        print(f"wrote {path}")
    return 1 if outcome["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
