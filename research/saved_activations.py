"""What a training forward keeps for the backward: bytes per token and channel, by the line that saved them.

    python research/saved_activations.py                         # the default MM-Rec, 1 layer at width 256, bf16 autocast
    python research/saved_activations.py --layers 2 --top 40
    python research/saved_activations.py --backend torch         # the PyTorch kernels' paths instead of Triton's

Runs on the CPU: with ``--backend triton`` (the default) the Triton kernels run interpreted
(TRITON_INTERPRET=1, set here), so the autograd nodes, and what they save, are those of a GPU run;
only PyTorch's own CPU kernels (e.g. RMSNorm's unfused backward) save differently from their CUDA
versions. Every tensor autograd keeps is counted once by its storage (a slice keeps the whole
projection it is cut from), attributed to the innermost line of ``mm_rec`` that created the saving
op. Embeddings, head and loss are included, so compare models of the same vocabulary.
"""

from __future__ import annotations

import argparse
import collections
import os
import traceback

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from timing import mmrec_config  # noqa: E402

from mm_rec import MMRecForCausalLM  # noqa: E402


def saved_bytes(model, ids, bf16: bool = True):
    """(total bytes, {(line, shape, dtype): bytes}) that one training forward of ``model`` on ``ids`` saves."""
    seen = set()
    where = collections.Counter()

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            lines = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in traceback.extract_stack()[:-1]
                     if "mm_rec/" in f.filename]
            where[(lines[-1] if lines else "(torch)", tuple(t.shape), str(t.dtype).removeprefix("torch."))] += \
                t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(ids, labels=ids)
    return sum(where.values()), where


def add_step_arguments(parser: argparse.ArgumentParser, top: int) -> None:
    """The flags of a CPU look at one training step of the default MM-Rec (this script's and op_traffic.py's)."""
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--backend", choices=["triton", "torch"], default="triton")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    parser.add_argument("--top", type=int, default=top)


def step_model(parser: argparse.ArgumentParser, args):
    """(the default MM-Rec at the flags' size in training mode, its input ids), seeded; a one-line error
    for a size below 1."""
    if min(args.hidden, args.layers, args.heads, args.batch, args.seq, args.vocab, args.top) < 1:
        parser.error("--hidden, --layers, --heads, --batch, --seq, --vocab and --top must be positive")
    torch.manual_seed(0)
    config = mmrec_config(args.hidden, args.layers, args.heads, args.vocab, {"kernel_backend": args.backend})
    return MMRecForCausalLM(config).train(), torch.randint(0, args.vocab, (args.batch, args.seq))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser, top=25)
    args = parser.parse_args(argv)
    model, ids = step_model(parser, args)
    total, where = saved_bytes(model, ids, bf16=not args.fp32)
    unit = args.batch * args.seq * args.hidden
    print(f"MM-Rec defaults, hidden {args.hidden}, {args.layers} layer(s), {args.batch} x {args.seq} tokens, backend "
          f"{args.backend}{'' if args.fp32 else ', bf16 autocast'}: {total / 2**20:.1f} MiB saved for the backward, "
          f"{total / unit:.1f} bytes per token and channel")
    print("| bytes / token / channel | saved at | shape | dtype |\n|---|---|---|---|")
    for (line, shape, dtype), n in sorted(where.items(), key=lambda item: -item[1])[:args.top]:
        print(f"| {n / unit:.2f} | {line} | {shape} | {dtype} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
