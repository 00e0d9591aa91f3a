"""Profile eager decode steps of the ~130M MM-Rec: the kernels one generated token costs.

    python research/profile_decode.py                       # batch 8, after a 2048-token prompt, bf16
    python research/profile_decode.py --batch 1 --context 16384

Prefills ``--context`` random tokens, runs warm-up steps, times ``--steps`` eager single-token
steps that carry the cache (host-bound: generate() replays them from a CUDA graph), then
profiles ``--steps`` more and prints the ``--top`` kernels by GPU time per step and the step's
GPU time and kernel count (what a CUDA-graph replay still pays).
"""

from __future__ import annotations

import argparse
import time

import torch
from benchmark import build, json_object


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--mmrec-overrides", type=json_object, default=None, metavar="JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("profiling needs a CUDA device")
    if min(args.batch, args.context, args.steps, args.top) < 1:
        parser.error("--batch, --context, --steps and --top must be positive")
    model, params = build("mmrec", "gpu", torch.device("cuda"), torch.bfloat16, args.mmrec_overrides)
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.context + 1), device="cuda")
    token = ids[:, -1:]
    with torch.no_grad():
        cache = model(ids[:, :-1], use_cache=True).cache

        def step():
            nonlocal cache
            cache = model(token, cache=cache, use_cache=True).cache

        for _ in range(5):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        eager_ms = 1e3 * (time.perf_counter() - start) / args.steps
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as profile:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
    events = [e for e in profile.key_averages()
              if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
    events.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events)
    print(f"mmrec: {params / 1e6:.1f}M parameters, batch {args.batch}, context {args.context}; eager step "
          f"{eager_ms:.2f} ms; GPU time {total / 1e3 / args.steps:.3f} ms per step in "
          f"{sum(e.count for e in events) // args.steps} kernels")
    print("| kernel | ms per step | calls per step |\n|---|---|---|")
    for e in events[:args.top]:
        print(f"| {e.key[:80]} | {e.self_device_time_total / 1e3 / args.steps:.3f} | {e.count // args.steps} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
