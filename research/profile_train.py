"""Profile full training steps of one model: the kernels that take the GPU time.

    python research/profile_train.py --seq 2048 --batch 16                    # MM-Rec, the gpu-130m preset
    python research/profile_train.py --mmrec-overrides '{"memory_block_size": 1}'
    python research/profile_train.py --model hgrn                             # a peer (fla), same size

Runs warm-up steps, then ``--steps`` steps (bf16 autocast, AdamW) under torch.profiler and prints
the ``--top`` kernels by total CUDA time, their share of it, the step time and tokens/s; with
``--trace FILE`` also writes a Chrome trace.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from benchmark import build


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mmrec", choices=["mmrec", "hgrn", "gdn", "llama"])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--mmrec-overrides", type=json.loads, default=None, metavar="JSON")
    parser.add_argument("--compile", action="store_true", help="profile the step through torch.compile (compiled in the warm-up)")
    parser.add_argument("--trace", default=None, help="write a Chrome trace here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("profiling needs a CUDA device")
    device = torch.device("cuda")
    built = build(args.model, "gpu", device, mmrec_overrides=args.mmrec_overrides)
    if built is None:
        parser.error(f"{args.model}: fla is not installed")
    model, params = built
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    forward = torch.compile(model, dynamic=False) if args.compile else model

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / args.steps
    events = [e for e in profile.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = sorted(((e.key, e.self_device_time_total, e.count) for e in events if e.self_device_time_total > 0),
                     key=lambda item: -item[1])
    total = sum(t for _, t, _ in kernels)
    label = args.model + (f" {json.dumps(args.mmrec_overrides)}" if args.mmrec_overrides else "") + (
        " (torch.compile)" if args.compile else "")
    print(f"{label}: {params / 1e6:.1f}M parameters, {args.seq} x {args.batch}; {1e3 * wall:.1f} ms per step under "
          f"the profiler ({args.batch * args.seq / wall / 1e3:.1f}k tokens/s); GPU time {total / 1e3 / args.steps:.1f} ms "
          "per step")
    print("| kernel | ms per step | share | calls per step |\n|---|---|---|---|")
    for name, time_us, count in kernels[:args.top]:
        print(f"| {name[:90]} | {time_us / 1e3 / args.steps:.2f} | {100 * time_us / total:.1f}% | {count // args.steps} |")
    if args.trace:
        profile.export_chrome_trace(args.trace)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
