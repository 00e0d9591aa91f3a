"""GPU timing of a prompt's forward (the prefill) with the cache on, for several memory block sizes:
the model of research/benchmark.py (the gpu-130m preset at hidden 768, 12 layers, vocab 32000), bf16 weights.

    python research/bench_prefill.py --block-sizes 1 32 --tokens 2048 --batch 1
"""

import argparse
import sys
import time

import torch
from timing import mmrec_config

from mm_rec import MMRecForCausalLM


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards (after one warm-up); the median is printed")
    args = parser.parse_args(argv)
    if min(args.block_sizes + [args.tokens, args.batch, args.repeats]) < 1:
        parser.error("--block-sizes, --tokens, --batch and --repeats must be positive")
    if not torch.cuda.is_available():
        parser.error("bench_prefill.py needs a CUDA device")
    ids = torch.randint(3, 32000, (args.batch, args.tokens), device="cuda")
    print(f"prefill forward, B={args.batch} T={args.tokens}, bf16 weights, {torch.cuda.get_device_name()}")
    for block in args.block_sizes:
        torch.manual_seed(0)
        config = mmrec_config(768, 12, 12, 32000, {"memory_block_size": block})
        model = MMRecForCausalLM(config).cuda().to(torch.bfloat16).eval()
        times = []
        with torch.no_grad():
            for _ in range(args.repeats + 1):
                torch.cuda.synchronize()
                start = time.perf_counter()
                model(ids, use_cache=True)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        times = sorted(times[1:])
        print(f"memory_block_size {block:>4}: median {1e3 * times[len(times) // 2]:.1f} ms")
        del model
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
