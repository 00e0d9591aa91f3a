"""The eager training step of the benchmark's MM-Rec (gpu-130m at ~130M, as research/benchmark.py builds it) with SwiGLU
three ways, one after the other in one process, twice over (A B C A B C) to show the drift: tokens/s, step time and
peak memory (docs/benchmarks/train_gpu.md).

* kernels: the default on CUDA: ``block._SwiGLUDown`` (keeps a and b, recomputes in the backward) with its
  elementwise work as swiglu_triton's two kernels;
* node: the same node with PyTorch's elementwise operations (five passes in the backward);
* module: PyTorch's three operations through the modules (keeps silu(a) and the product too: more memory).

    python research/swiglu_ab.py              # 2048 x 16
    python research/swiglu_ab.py 32768 1
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from benchmark import build  # noqa: E402
from timing import training_throughput  # noqa: E402

from mm_rec.block import FeedForward  # noqa: E402

KERNELS, PLAIN = FeedForward._swiglu_in_kernels, FeedForward._down_is_plain
VARIANTS = {
    "kernels": (KERNELS, PLAIN),
    "node": (lambda self, a, b: False, PLAIN),
    "module": (KERNELS, lambda self: False),
}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("seq", type=int, nargs="?", default=2048)
parser.add_argument("batch", type=int, nargs="?", default=16)
parser.add_argument("--rounds", type=int, default=2, help="times each variant runs, interleaved (default 2)")
args = parser.parse_args()
if args.seq < 1 or args.batch < 1 or args.rounds < 1:
    parser.error("seq, batch and --rounds must be positive")
if not torch.cuda.is_available():
    parser.error("needs a CUDA device (the Triton kernels and the step's timing)")
print("| SwiGLU | seq x batch | tokens/s | step ms | peak GiB |\n|---|---|---|---|---|", flush=True)
for _ in range(args.rounds):
    for name, (kernels, plain) in VARIANTS.items():
        FeedForward._swiglu_in_kernels, FeedForward._down_is_plain = kernels, plain
        model, params = build("mmrec", "gpu", torch.device("cuda"))
        result = training_throughput(model, args.batch, args.seq, steps=8, bf16=True)
        if result is None:
            print(f"| {name} | {args.seq} x {args.batch} | did not fit | | |", flush=True)
            continue
        print(f"| {name} | {args.seq} x {args.batch} | {result['tokens_per_s'] / 1e3:.1f}k | {1e3 * result['step_s']:.1f} | "
              f"{result['peak_gib']:.1f} |", flush=True)
        del model
        torch.cuda.empty_cache()
