"""Prompts and saved streams for scripts/generate.py."""

from __future__ import annotations

import os
import sys
from typing import Callable, List, Optional, Sequence, Tuple

import torch


def model_module(model):
    """The module that defined ``model``'s class: a checkpoint loaded with trust_remote_code has
    its own copy of the MM-Rec code, whose MMRecCache is the one it accepts."""
    return sys.modules[type(model).__module__]


def load_state(model, path: str | os.PathLike):
    """An MMRecCache saved by ``generate.py --state``, checked against ``model``'s config."""
    cache = model_module(model).MMRecCache.load(path, config=model.config, device=model.device)
    if cache.batch_size != 1:
        raise ValueError(f"--state {path}: holds {cache.batch_size} streams, expected 1")
    return cache


def generate_tokens(model, prompt_ids: Sequence[int], cache=None, max_new_tokens: int = 100, greedy: bool = False,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_token_id: Optional[int] = None,
                    generator: Optional[torch.Generator] = None,
                    on_token: Optional[Callable[[int], None]] = None) -> Tuple[List[int], object]:
    """Feed ``prompt_ids`` (continuing ``cache``, an MMRecCache, if given), then pick up to
    ``max_new_tokens`` tokens one at a time, each fed back through the cache; stops after
    ``eos_token_id``. Returns (new token ids, the cache after the prompt and every new token),
    so the cache continues the stream exactly where it stopped. Sampling: temperature, top-k
    and top-p warpers from transformers; ``greedy``: argmax. ``generator`` seeds the draws, made
    on its device (the CPU generator of the scripts gives the same text for a model on any device)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if not prompt_ids:
        raise ValueError("the prompt has no tokens")
    warpers = LogitsProcessorList()
    if not greedy:
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
    device = model.device
    history = torch.tensor([list(prompt_ids)], device=device)
    new: List[int] = []
    with torch.no_grad():
        out = model(history, use_cache=True, cache=cache)
        cache = out.cache
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1].float()
            if greedy:
                token = int(logits.argmax(-1))
            else:
                probs = torch.softmax(warpers(history, logits), dim=-1)
                if generator is not None:  # draw where the seeded generator lives (a CPU one: the same text on any device)
                    probs = probs.to(generator.device)
                token = int(torch.multinomial(probs, 1, generator=generator))
            new.append(token)
            if on_token is not None:
                on_token(token)
            step = torch.tensor([[token]], device=device)
            history = torch.cat([history, step], dim=1)
            out = model(step, use_cache=True, cache=cache)
            cache = out.cache
            if token == eos_token_id:
                break
    return new, cache


def prompt_ids(tokenizer, prompt: str, continuing: bool) -> List[int]:
    """Token ids of ``prompt``. A new stream gets the tokenizer's special tokens (BOS, if it adds
    one); an empty prompt starts from BOS, or from EOS (what precedes every document in training)."""
    ids = tokenizer(prompt, add_special_tokens=not continuing)["input_ids"] if prompt else []
    if not ids and not continuing:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("--prompt is empty and the tokenizer has neither a BOS nor an EOS token to start from")
        ids = [start]
    return ids
