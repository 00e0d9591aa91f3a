"""Held-out evaluation: cross-entropy, perplexity and bits per byte.

Bits per byte: total cross-entropy (nats) over the predicted held-out tokens / ln 2 / the
number of UTF-8 bytes those tokens decode to. Unlike perplexity it does not depend on the
tokenizer, so runs with different tokenizers compare.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Sequence

import torch

from .data import blocks


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
    nats, tokens, n_bytes = 0.0, 0, 0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=model.dtype == torch.bfloat16)
    with torch.no_grad(), autocast:
        for start in tqdm(range(0, len(rows), batch_size), desc=description, disable=not progress, leave=False):
            batch = torch.tensor([list(r) for r in rows[start:start + batch_size]], device=device)
            logits = model(batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            nats += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                      reduction="sum").item()
            tokens += targets.numel()
            n_bytes += sum(len(tokenizer.decode(r, skip_special_tokens=True).encode("utf-8")) for r in targets.tolist())
    model.train(was_training)
    loss = nats / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": nats / math.log(2) / n_bytes if n_bytes else float("nan"), "tokens": tokens, "bytes": n_bytes}


def evaluate_texts(model, tokenizer, texts: Iterable[str], block_size: int, batch_size: int = 8,
                   max_blocks: Optional[int] = None, progress: bool = True) -> Dict[str, float]:
    """``evaluate_rows`` over ``texts`` cut into blocks as in training (EOS after each text)."""
    rows = blocks(texts, tokenizer, block_size, "held-out")["input_ids"]
    return evaluate_rows(model, rows[:max_blocks] if max_blocks else rows, tokenizer, batch_size, progress)
