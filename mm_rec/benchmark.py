"""Timing helpers behind scripts/bench_decode.py: the cost of one decoded token."""

from __future__ import annotations

import statistics
import time
from typing import Dict, List, Sequence

import torch

from .modeling_mmrec import CACHE_FIELD


@torch.no_grad()
def decode_latency(model, context_lengths: Sequence[int], steps: int = 32, batch_size: int = 1,
                   recompute: bool = True, seed: int = 0) -> List[Dict[str, float]]:
    """For each context length: prefill that many random tokens, then time ``steps`` single-token
    decode steps that carry the cache (median ms/token). With ``recompute``, also time one step
    without a cache (a full forward over context + 1 tokens), which is what the cache saves.
    """
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in context_lengths:
        ids = torch.randint(0, model.config.vocab_size, (batch_size, n + steps), generator=generator).to(device)
        start = time.perf_counter()
        cache = getattr(model(ids[:, :n], use_cache=True), CACHE_FIELD)
        prefill_s = time.perf_counter() - start
        times = []
        for t in range(n, n + steps):
            start = time.perf_counter()
            cache = getattr(model(ids[:, t:t + 1], cache=cache, use_cache=True), CACHE_FIELD)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        row = {"context": n, "decode_ms_median": 1e3 * statistics.median(times),
               "decode_ms_p90": 1e3 * sorted(times)[int(0.9 * (len(times) - 1))], "prefill_s": prefill_s}
        if recompute:
            start = time.perf_counter()
            model(ids[:, :n + 1], use_cache=False)
            row["recompute_ms"] = 1e3 * (time.perf_counter() - start)
        rows.append(row)
    return rows
