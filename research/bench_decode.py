"""Per-token decode time vs. context length on this machine (default: CPU, small model).

    python research/bench_decode.py --contexts 1024 16384
    python research/bench_decode.py --device cuda --dtype bfloat16 --no-recompute
"""

import argparse

import torch
from timing import decode_latency

from mm_rec import MMRecConfig, MMRecForCausalLM


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 1024, 16384])
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per context")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-recompute", action="store_true", help="skip timing a step without the cache")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = MMRecConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                         num_attention_heads=4)
    model = MMRecForCausalLM(config).to(args.device, getattr(torch, args.dtype))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} CPU threads"
    print(f"MM-Rec {params:.1f}M params (d={args.hidden_size}, {args.layers} layers, block {config.memory_block_size}, "
          f"segment {config.memory_segment_length}, {config.num_memory_slots} slots), torch {torch.__version__}, "
          f"{where}, batch 1, {args.dtype}")
    print(f"{'context':>8} | {'decode ms/token (median)':>24} | {'p90':>7} | {'prefill s':>9} | {'no-cache step ms':>16}")
    for row in decode_latency(model, args.contexts, steps=args.steps, recompute=not args.no_recompute):
        recompute = f"{row['recompute_ms']:.1f}" if "recompute_ms" in row else "-"
        print(f"{row['context']:>8} | {row['decode_ms_median']:>24.2f} | {row['decode_ms_p90']:>7.2f} | "
              f"{row['prefill_s']:>9.2f} | {recompute:>16}")


if __name__ == "__main__":
    main()
