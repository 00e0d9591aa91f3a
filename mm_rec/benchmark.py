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


def cuda_median_ms(fn, warmup_ms: int = 50, rep_ms: int = 300) -> float:
    """Median time of ``fn()`` on the GPU in ms (triton.testing.do_bench: CUDA events, L2
    flushed between runs, at least ~10 repetitions within ``rep_ms``)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def cuda_graph_median_ms(fn, rep_ms: int = 300) -> float:
    """Median GPU time of ``fn()`` in ms, replayed from a CUDA graph
    (triton.testing.do_bench_cudagraph: CUDA events around graph replays), so host-side
    launch and dispatch overhead is excluded. ``fn`` must be capturable."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


def host_us_per_call(fn, calls: int = 300) -> float:
    """CPU time of one ``fn()`` in microseconds, for inputs small enough that the GPU is
    never the bottleneck: the host-side cost of launching the work."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * elapsed / calls


def memory_attention_timings(config, batch_size: int, seq_len: int, dtype=torch.bfloat16) -> List[Dict[str, float]]:
    """Time one layer's multi-memory attention (forward, forward+backward) and its peak memory
    under each SDPA backend that can run the masked attention on CUDA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .block import MMRecBlock
    from .positions import token_layout

    block = MMRecBlock(config, 0).to("cuda", dtype)
    torch.nn.init.normal_(block.memory.slot_keys)
    torch.nn.init.normal_(block.memory.slot_values)
    d = config.hidden_size
    q, k, v = (torch.randn(batch_size, seq_len, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    layout = token_layout(torch.ones(batch_size, seq_len, device="cuda"), None,
                          torch.zeros(batch_size, dtype=torch.long, device="cuda"))

    def forward():
        return block.memory(q, k, v, layout, block.fresh_state(batch_size))[0]

    def forward_backward():
        forward().float().square().mean().backward()

    rows = []
    everything = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    for name, backends in (("sdpa default dispatch (the model)", everything),
                           ("sdpa mem-efficient kernel", [SDPBackend.EFFICIENT_ATTENTION]),
                           ("sdpa math (materialised scores)", [SDPBackend.MATH])):
        with sdpa_kernel(backends):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fwd = cuda_median_ms(forward)
            fwd_bwd = cuda_median_ms(forward_backward)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        rows.append({"backend": name, "forward_ms": fwd, "forward_backward_ms": fwd_bwd, "peak_extra_mib": peak})
    return rows
