"""Time the memory fold's routing (memory.route_segments) at the 130M model's shapes.

    python research/bench_routing.py [--previous path/to/old_memory_triton.py]

For rows of 2k x 16, 8k x 4 and 32k x 1 tokens (segments of 512, d = 768, 16 slots) and blocks of
1 and 32 tokens: the Triton routing (kernel_backend="triton") and the PyTorch loop ("torch"),
medians of CUDA-event timings of eager calls (triton.testing.do_bench), ms per layer per
forward. ``--previous`` also times another version of memory_triton.py's
``route_segments_triton`` (e.g. the one before a change), side by side in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util

import torch

from mm_rec.memory import route_segments_torch
from mm_rec.memory_triton import route_segments_triton

SHAPES = [(16, 2048), (4, 8192), (1, 32768)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--previous", default=None, help="another memory_triton.py to time beside this one")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--segment", type=int, default=512)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    import triton

    kernels = {"triton": route_segments_triton, "torch": route_segments_torch}
    if args.previous:
        spec = importlib.util.spec_from_file_location("previous_memory_triton", args.previous)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        kernels["triton (previous)"] = module.route_segments_triton
    print(f"| rows | block | {' | '.join(f'{name} ms' for name in kernels)} | agree |")
    print(f"|---|---|{'---|' * len(kernels)}---|")
    for batch, length in SHAPES:
        for block in (1, 32):
            K, C = length // args.segment, args.segment // block
            g = torch.Generator(device="cuda").manual_seed(0)
            block_keys = torch.randn(batch, K, C, args.dim, device="cuda", generator=g)
            slot_keys = torch.randn(batch, args.slots, args.dim, device="cuda", generator=g)
            init = torch.randn(args.slots, args.dim, device="cuda", generator=g)
            restart = torch.zeros(batch, K, dtype=torch.bool, device="cuda")
            times, outputs = [], []
            for fn in kernels.values():
                call = lambda fn=fn: fn(block_keys, slot_keys, init, restart, 0.99)  # noqa: E731
                outputs.append(call())
                times.append(triton.testing.do_bench(call, warmup=5, rep=50, return_mode="median"))
            agree = all(torch.allclose(out[0], outputs[0][0], atol=1e-5) for out in outputs)
            print(f"| {batch} x {length} | {block} | {' | '.join(f'{t:.3f}' for t in times)} | {agree} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
