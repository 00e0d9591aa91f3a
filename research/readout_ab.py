"""The compiled training step of the benchmark's MM-Rec (gpu-130m at ~130M, as research/benchmark.py builds it) with the
gated readout traced as its two library ops (readout_triton.py, the default) against inductor's fusion of the PyTorch
path, one after the other in one process: tokens/s, step time and peak memory (docs/benchmarks/train_gpu_compiled.md).

    python research/readout_ab.py              # 2048 x 16
    python research/readout_ab.py 8192 4
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from benchmark import build  # noqa: E402
from timing import training_throughput  # noqa: E402

from mm_rec import block as block_module  # noqa: E402

with_ops = block_module.MMRecBlock._reads_out_in_one_kernel


def inductors(self, h):
    """The PyTorch path whenever the step is traced (inductor fuses it), the kernels eagerly."""
    return not torch.compiler.is_compiling() and with_ops(self, h)


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("seq", type=int, nargs="?", default=2048)
parser.add_argument("batch", type=int, nargs="?", default=16)
args = parser.parse_args()
if args.seq < 1 or args.batch < 1:
    parser.error("seq and batch must be positive")
if not torch.cuda.is_available():
    parser.error("needs a CUDA device (the Triton kernels and the step's timing)")
seq, batch = args.seq, args.batch
for name, rule in (("readout ops", with_ops), ("inductor's readout", inductors)):
    block_module.MMRecBlock._reads_out_in_one_kernel = rule
    torch._dynamo.reset()
    model, params = build("mmrec", "gpu", torch.device("cuda"))
    result = training_throughput(torch.compile(model, dynamic=False), batch, seq, steps=8, bf16=True)
    print(f"| {name} | {seq} x {batch} | {result['tokens_per_s'] / 1e3:.1f}k tok/s | {1e3 * result['step_s']:.1f} ms | "
          f"peak {result['peak_gib']:.1f} GiB |", flush=True)
    del model
    torch.cuda.empty_cache()
