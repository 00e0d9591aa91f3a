"""Profile full training steps of one model: the kernels that take the GPU time.

    python research/profile_train.py --seq 2048 --batch 16                    # MM-Rec, the gpu-130m preset
    python research/profile_train.py --mmrec-overrides '{"memory_block_size": 1}'
    python research/profile_train.py --model hgrn                             # a peer (fla), same size

Runs warm-up steps, then ``--steps`` steps (bf16 autocast, AdamW) under torch.profiler and prints
the ``--top`` kernels by total CUDA time, their share of it, the step time and tokens/s; with
``--trace FILE`` also writes a Chrome trace. ``--by-line`` also charges each kernel to the line of ``mm_rec``
that ran it (forward) or whose forward made its autograd node (backward), the way ``op_traffic.py`` counts bytes:

    python research/profile_train.py --by-line --top 30                      # GPU ms per source line
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import re
import time
import traceback
import warnings

import torch
from benchmark import build
from torch.utils._python_dispatch import TorchDispatchMode

import mm_rec.memory as memory

_MARK = "line "


def line_of_node() -> str:
    """The mm_rec line whose forward made the running autograd node ('' if none)."""
    node = torch._C._current_autograd_node()
    stack = node.metadata.get("traceback_", []) if node is not None else []
    frames = [re.search(r'mm_rec/(\w+\.py)", line (\d+)', entry) for entry in stack if "mm_rec/" in entry]
    frames = [f for f in frames if f]
    return f"{frames[-1].group(1)}:{frames[-1].group(2)} (backward)" if frames else ""


def mm_rec_frames() -> list:
    """The frames of mm_rec on the running stack, innermost last."""
    return [f for f in traceback.extract_stack()[:-2] if "mm_rec/" in f.filename]


def frame_line(frame) -> str:
    return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"


class LineRanges(TorchDispatchMode):
    """Runs every aten operation inside a profiler range named after the mm_rec line that ran it (forward) or
    whose forward made the running autograd node (backward; anomaly mode records it): the range's kernels are
    that line's GPU time. Outside mm_rec (the loss's callers, the optimiser) the range names the operation."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch._C._current_autograd_node() is not None:
            line = line_of_node() or "(outside mm_rec) (backward)"
        else:
            frames = mm_rec_frames()
            line = frame_line(frames[-1]) if frames else "(outside mm_rec)"
        with torch.profiler.record_function(f"{_MARK}{line}|{func.overloadpacket.__name__}"):
            return func(*args, **(kwargs or {}))


def by_line(profile, steps: int, total_us: float, top: int) -> None:
    """Prints GPU ms per step for each line (``LineRanges``), with the operations that ran there, and the kernels
    launched outside any operation (the Triton kernels, by name)."""
    times, ops = collections.Counter(), collections.defaultdict(collections.Counter)
    for event in profile.events():  # the ranges on the host (the profiler mirrors each on the GPU as well)
        if event.name.startswith(_MARK) and event.device_type == torch.autograd.DeviceType.CPU:
            line, op = event.name[len(_MARK):].rsplit("|", 1)
            times[line] += event.device_time_total
            ops[line][op] += 1
    print(f"\nGPU time by line: {sum(times.values()) / 1e3 / steps:.1f} of {total_us / 1e3 / steps:.1f} ms per step "
          "in aten operations; the rest is launched directly (Triton kernels, above)")
    print("| line | ms per step | share | operations per step |\n|---|---|---|---|")
    for line, time_us in times.most_common(top):
        names = " ".join(f"{op} x{n // steps}" for op, n in ops[line].most_common(6))
        print(f"| {line} | {time_us / 1e3 / steps:.2f} | {100 * time_us / total_us:.1f}% | {names} |")


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
    parser.add_argument("--by-line", action="store_true", help="also GPU time per mm_rec line (eager only)")
    args = parser.parse_args(argv)
    if args.by_line and args.compile:
        parser.error("--by-line: eager steps only (a compiled step runs no aten operations one by one)")
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

    if args.by_line:  # SDPA's CausalBias, a tensor subclass, cannot be made inside a dispatch mode: made once, kept
        memory.causal_lower_right = functools.lru_cache(None)(memory.causal_lower_right)
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as profile:
        with contextlib.ExitStack() as stack:
            if args.by_line:
                stack.enter_context(warnings.catch_warnings())
                warnings.simplefilter("ignore")  # anomaly mode's warning: it records each node's forward line
                stack.enter_context(LineRanges())
                stack.enter_context(torch.autograd.detect_anomaly(check_nan=False))
            for _ in range(args.steps):
                step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / args.steps
    events = [e for e in profile.key_averages()  # kernels, not the GPU mirrors of the --by-line ranges
              if e.device_type == torch.autograd.DeviceType.CUDA and not e.key.startswith(_MARK)]
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
    if args.by_line:
        by_line(profile, args.steps, total, args.top)
    if args.trace:
        profile.export_chrome_trace(args.trace)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
