"""GPU timing of the multi-memory attention: the masked SDPA path under its kernels.

    python research/bench_memory.py --batch 8 --seq-len 4096 --hidden-size 2048 --heads 16
"""

import argparse
import sys

import torch
from timing import memory_attention_timings

from mm_rec import MMRecConfig


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--hidden-size", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--segment-length", type=int, default=512)
    parser.add_argument("--slots", type=int, default=16)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_memory.py needs a CUDA device")
    config = MMRecConfig(hidden_size=args.hidden_size, num_attention_heads=args.heads, num_hidden_layers=1,
                         memory_block_size=args.block_size, memory_segment_length=args.segment_length,
                         num_memory_slots=args.slots)
    print(f"memory attention, B={args.batch} T={args.seq_len} d={args.hidden_size} H={args.heads} bf16, "
          f"block {args.block_size}, segment {args.segment_length}, {args.slots} slots, "
          f"{torch.cuda.get_device_name()}, medians (triton.testing.do_bench)")
    print(f"| {'kernel':<32} | {'fwd ms':>8} | {'fwd+bwd ms':>10} | {'peak extra MiB':>14} |")
    print(f"|{'-' * 34}|{'-' * 10}|{'-' * 12}|{'-' * 16}|")
    for row in memory_attention_timings(config, args.batch, args.seq_len):
        print(f"| {row['backend']:<32} | {row['forward_ms']:>8.3f} | {row['forward_backward_ms']:>10.3f} | "
              f"{row['peak_extra_mib']:>14.1f} |")


if __name__ == "__main__":
    main()
