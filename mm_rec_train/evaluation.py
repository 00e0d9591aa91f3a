"""Held-out evaluation: cross-entropy, perplexity and bits per byte.

Bits per byte: total cross-entropy (nats) over the predicted held-out tokens / ln 2 / the
number of UTF-8 bytes those tokens stand for. Unlike perplexity it does not depend on the
tokenizer, so runs with different tokenizers compare. The main job's final evaluation
(``evaluate_rows``), its Trainer's periodic one and the quality study's (research/quality.py)
all count through ``predicted_bytes`` and ``bits_per_byte`` below.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Sequence

import torch

from .data import blocks


def bits_per_byte(nats: float, n_bytes: float) -> float:
    """``nats`` of cross-entropy over text of ``n_bytes`` UTF-8 bytes, in bits per byte (NaN for no
    bytes). Also per predicted token: mean nats per token over mean bytes per token."""
    return nats / math.log(2) / n_bytes if n_bytes else float("nan")


def _byte_level_lengths(tokenizer) -> Optional[torch.Tensor]:
    """``token_byte_lengths`` of a byte-level tokenizer, None for any other."""
    from tokenizers import decoders, pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(getattr(backend, "decoder", None), decoders.ByteLevel):
        return None
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    added = tokenizer.added_tokens_decoder
    special = set(tokenizer.all_special_ids) | {i for i, token in added.items() if token.special}
    lengths = torch.zeros(len(tokenizer), dtype=torch.long)
    for token, index in tokenizer.get_vocab().items():
        if index in special:
            continue
        if index in added:
            lengths[index] = len(added[index].content.encode("utf-8"))
        elif set(token) <= alphabet:
            lengths[index] = len(token)
        else:  # a vocabulary token not spelt in bytes: not a byte-level BPE after all
            return None
    return lengths


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """[vocab] UTF-8 bytes each token of a byte-level BPE tokenizer (GPT-2 style, as
    mm_rec_train.data trains: a ByteLevel decoder, each character of a vocabulary token stands for
    one byte) decodes to: the characters of a vocabulary token, the UTF-8 bytes of an added token's
    text, 0 for special tokens (which decoding skips). ValueError for other tokenizers."""
    lengths = _byte_level_lengths(tokenizer)
    if lengths is None:
        raise ValueError(f"token_byte_lengths: expected a byte-level BPE tokenizer (ByteLevel decoder), got "
                         f"{type(tokenizer).__name__}; count bytes with predicted_bytes(rows, tokenizer) instead")
    return lengths


def predicted_bytes(rows, tokenizer=None, byte_lengths: Optional[torch.Tensor] = None) -> int:
    """UTF-8 bytes of the predicted tokens of ``rows`` (token id rows, each read from a fresh
    state): every token of a row but its first, which is context only. Counted with
    ``byte_lengths`` (``token_byte_lengths``), computed here for a byte-level ``tokenizer``; for
    other tokenizers each row's predicted tokens are decoded (special tokens skipped)."""
    if byte_lengths is None:
        if tokenizer is None:
            raise ValueError("predicted_bytes: pass the tokenizer or its byte_lengths")
        byte_lengths = _byte_level_lengths(tokenizer)
        if byte_lengths is None:
            return sum(len(tokenizer.decode(list(r)[1:], skip_special_tokens=True).encode("utf-8")) for r in rows)
    if isinstance(rows, torch.Tensor):
        targets = rows[:, 1:]
    else:
        targets = torch.tensor([int(t) for r in rows for t in list(r)[1:]], dtype=torch.long)
    return int(byte_lengths.to(targets.device)[targets].sum())


def evaluate_rows(model, rows: Sequence[Sequence[int]], tokenizer, batch_size: int = 8, progress: bool = True,
                  description: str = "evaluating") -> Dict[str, float]:
    """Cross-entropy of ``rows`` (equal-length token id lists, each read from a fresh state; the
    first token of a row is context, the rest are predicted). Returns loss (nats per predicted
    token), perplexity, bits_per_byte, tokens, bytes."""
    from tqdm.auto import tqdm

    if not rows:
        raise ValueError("no held-out rows to evaluate")
    was_training = model.training
    model.eval()
    device = model.device
    nats, tokens = 0.0, 0
    n_bytes = predicted_bytes(rows, tokenizer)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=model.dtype == torch.bfloat16)
    with torch.no_grad(), autocast:
        for start in tqdm(range(0, len(rows), batch_size), desc=description, disable=not progress, leave=False):
            batch = torch.tensor([list(r) for r in rows[start:start + batch_size]], device=device)
            logits = model(batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            nats += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                      reduction="sum").item()
            tokens += targets.numel()
    model.train(was_training)
    loss = nats / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bits_per_byte": bits_per_byte(nats, n_bytes),
            "tokens": tokens, "bytes": n_bytes}


def evaluate_texts(model, tokenizer, texts: Iterable[str], block_size: int, batch_size: int = 8,
                   max_blocks: Optional[int] = None, progress: bool = True) -> Dict[str, float]:
    """``evaluate_rows`` over ``texts`` cut into blocks as in training (EOS after each text)."""
    rows = blocks(texts, tokenizer, block_size, "held-out")["input_ids"]
    return evaluate_rows(model, rows[:max_blocks] if max_blocks else rows, tokenizer, batch_size, progress)
