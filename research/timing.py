"""Timing helpers behind the benchmark scripts: whole-model training and generation
(research/benchmark.py), one decoded token (research/bench_decode.py), the kernels."""

from __future__ import annotations

import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch


def mmrec_config(hidden: int, layers: int, heads: int, vocab: int, overrides: Optional[dict] = None):
    """The gpu-130m preset's MM-Rec (the default architecture) at this size: its FFN width scaled
    with the hidden size, then ``overrides`` (MMRecConfig fields) on top."""
    from mm_rec import MMRecConfig
    from mm_rec_train.runs import PRESETS

    preset = PRESETS["gpu-130m"]["model"]
    scaled = {k: preset[k] * hidden // preset["hidden_size"] for k in ("pe_dim", "intermediate_size") if k in preset}
    return MMRecConfig(**{**preset, **scaled, "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
                          "num_attention_heads": heads, **(overrides or {})})


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
        cache = model(ids[:, :n], use_cache=True).cache
        prefill_s = time.perf_counter() - start
        times = []
        for t in range(n, n + steps):
            start = time.perf_counter()
            cache = model(ids[:, t:t + 1], cache=cache, use_cache=True).cache
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

    from mm_rec.block import MMRecBlock
    from mm_rec.positions import token_layout

    block = MMRecBlock(config, 0).to("cuda", dtype)
    torch.nn.init.normal_(block.memory.slot_keys)
    torch.nn.init.normal_(block.memory.slot_values)
    d = config.hidden_size
    q, k, v = (torch.randn(batch_size, seq_len, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    layout = token_layout(torch.ones(batch_size, seq_len, device="cuda"), None,
                          torch.zeros(batch_size, dtype=torch.long, device="cuda"))

    def forward():
        return block.memory(q, torch.cat([k, v], -1), layout, block.memory.fresh_state(batch_size))[0]

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


# ---------------------------------------------------------------------------------------
# Whole-model benchmarks (research/benchmark.py): any causal LM of transformers' interface
# ---------------------------------------------------------------------------------------

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, by GPU name


def peak_bf16_tflops(device: torch.device) -> Optional[float]:
    """The GPU's dense bf16 peak from its name (None where unknown: no MFU is printed)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_throughput(model, batch_size: int, seq_len: int, steps: int = 8, warmup: int = 3,
                        bf16: bool = True, seed: int = 0) -> Dict[str, float]:
    """Full training steps (forward with labels, backward, AdamW step) on random tokens.

    bf16 autocast where ``bf16``; fused AdamW on CUDA. Returns the median step time (s),
    tokens/s, and the peak memory (GiB) on CUDA, or None for a run that did not fit.
    """
    device = next(model.parameters()).device
    model.train()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del optimizer
    return {"step_s": step_s, "tokens_per_s": batch_size * seq_len / step_s, "peak_gib": peak, "loss": loss.item()}


class _StepClock:
    """A generate() streamer that only timestamps: put() is called once with the prompt, then
    once per generated token (after that step's forward and sampling)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def put(self, value) -> None:
        _sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.no_grad()
def generate_throughput(model, batch_size: int, context: int, new_tokens: int = 128, seed: int = 0,
                        **generate_kwargs) -> Dict[str, float]:
    """Greedy ``generate()`` from a random prompt of ``context`` tokens, timed step by step:
    the prefill (prompt to first token) and its peak memory, then the decode rate over
    ``new_tokens`` more tokens (the median step). A first full call at the same shapes warms
    up kernels and captured graphs."""
    device = next(model.parameters()).device
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch_size, context), generator=generator).to(device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, pad_token_id=0,
                  max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, **generate_kwargs)
    model.generate(ids, **kwargs)  # warm-up at these shapes
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    clock = _StepClock(device)
    _sync(device)
    start = time.perf_counter()
    model.generate(ids, streamer=clock, **kwargs)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    prefill_s = clock.times[1] - start  # the prompt's forward and the first token
    steps = [b - a for a, b in zip(clock.times[1:-1], clock.times[2:])]
    step_s = statistics.median(steps)
    return {"prefill_s": prefill_s, "peak_gib": peak, "decode_tokens_per_s": batch_size / step_s,
            "ms_per_step": 1e3 * step_s}
