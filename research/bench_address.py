"""Training tokens/s of the default MM-Rec (the benchmark's ~130M size) against the same model with the ``address``
prototype (research/memory_variants.py: routes against the learned slot keys, so the fold has no per-segment
routing kernels), eager, bf16 autocast, in one process: default, address, default again, at 32k x 1 and 2k x 16.

    python research/bench_address.py
"""
import sys

import torch
from benchmark import build
from memory_variants import address
from timing import training_throughput


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_address.py: needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    print("| model | seq x batch | tokens/s | step | peak |\n|---|---|---|---|---|")
    for seq, batch in [(32768, 1), (2048, 16)]:
        for name in ["default", "address", "default"]:
            model, _ = build("mmrec", "gpu", device)
            if name == "address":
                address(model)
            r = training_throughput(model, batch, seq, steps=5, bf16=True)
            print(f"| {name} | {seq} x {batch} | {r['tokens_per_s'] / 1e3:.1f}k | {r['step_s'] * 1e3:.1f} ms | "
                  f"{r['peak_gib']:.1f} GiB |", flush=True)
            del model
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
