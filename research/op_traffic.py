"""The memory traffic of a training step's PyTorch operations outside the GEMMs: bytes per token and channel, by line.

    python research/op_traffic.py                      # the default MM-Rec, 1 layer at width 256, bf16 autocast
    python research/op_traffic.py --layers 2 --top 40
    python research/op_traffic.py --backend torch      # the PyTorch kernels' paths instead of Triton's

Eager on a GPU, a step of the default model spends most of its time in small elementwise kernels
(docs/benchmarks/profile_train_gpu.md): casts, adds, concatenations, fills. Each is bound by the bytes it
reads and writes, so those bytes, counted on the CPU, rank them without a GPU. Every aten operation of one
forward and backward is counted (inputs plus outputs of more than 1000 elements; views and allocations
are free), attributed to the innermost line of ``mm_rec`` that ran it, or for the backward to the line
whose forward made the autograd node (anomaly mode records it). With ``--backend triton`` (the default)
the Triton kernels run interpreted (TRITON_INTERPRET=1, set here) and are not counted: on a GPU they are
the fused kernels. The counts are proxies: PyTorch's CPU RMS norm runs unfused where CUDA fuses it, and
the weights' autocast copies weigh more at this small batch than at a GPU's.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from profile_train import frame_line, line_of_node, mm_rec_frames  # noqa: E402
from saved_activations import add_step_arguments, step_model  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

GEMMS = {"mm", "bmm", "addmm", "embedding", "embedding_dense_backward"}
FREE = {"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze",
        "squeeze", "as_strided", "split", "split_with_sizes", "chunk", "unbind", "alias", "detach", "empty",
        "empty_like", "new_empty", "empty_strided", "lift_fresh", "unflatten", "flatten"}


class Traffic(TorchDispatchMode):
    """Counts each aten operation's bytes: {(phase, op, line): bytes} and {(phase, op, line): calls}."""

    def __init__(self):
        super().__init__()
        self.bytes = collections.Counter()
        self.calls = collections.Counter()
        self.gemm_bytes = collections.Counter()
        self.phase = "forward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in FREE or "scaled_dot_product" in name:
            return out
        tensors = [t for t in tree_flatten((args, kwargs))[0] + tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        moved = sum(t.numel() * t.element_size() for t in tensors if t.numel() > 1000)
        frames = mm_rec_frames()
        if frames and "_triton.py" in frames[-1].filename:  # the interpreter's own copies of a kernel's arguments
            return out
        line = frame_line(frames[-1]) if frames else line_of_node()
        if name in GEMMS:
            self.gemm_bytes[self.phase] += moved
        else:
            key = (self.phase, name, line or "(outside mm_rec)")
            self.bytes[key] += moved
            self.calls[key] += 1
        return out


def count_traffic(model, ids, bf16: bool = True) -> Traffic:
    """One training forward (labels = ids) and backward of ``model`` under the counter."""
    import mm_rec.memory as memory

    # SDPA's CausalBias is a tensor subclass, which cannot be made inside a dispatch mode: the warm-up makes
    # it, a cache keeps it for the counted step, and the module's own function is put back afterwards
    original = memory.causal_lower_right
    memory.causal_lower_right = functools.lru_cache(None)(original)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    counter = Traffic()
    try:
        with autocast:  # warm-up: the cached bias, Triton's interpreter set-up
            model(ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # anomaly mode's warning: it records each node's forward line
            with counter, torch.autograd.detect_anomaly(check_nan=False):
                with autocast:
                    loss = model(ids, labels=ids).loss
                counter.phase = "backward"
                loss.backward()
    finally:
        memory.causal_lower_right = original
    return counter


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser, top=30)
    args = parser.parse_args(argv)
    model, ids = step_model(parser, args)
    counter = count_traffic(model, ids, bf16=not args.fp32)
    per = args.batch * args.seq * args.hidden
    for phase in ("forward", "backward"):
        glue = sum(b for (p, _, _), b in counter.bytes.items() if p == phase)
        calls = sum(c for (p, _, _), c in counter.calls.items() if p == phase)
        print(f"{phase}: {glue / per:.1f} bytes per token and channel outside the GEMMs in {calls} operations "
              f"(GEMMs and embeddings {counter.gemm_bytes[phase] / per:.1f})")
    print("\n| bytes / token / channel | calls | phase | operation | line |\n|---|---|---|---|---|")
    for key, moved in counter.bytes.most_common(args.top):
        print(f"| {moved / per:.1f} | {counter.calls[key]} | {key[0]} | {key[1]} | {key[2]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
