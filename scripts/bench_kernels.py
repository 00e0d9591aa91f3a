"""Time the scan kernels against a device-to-device copy and flash-linear-attention's HGRN.

    python scripts/bench_kernels.py [--batch 8 --seq-len 4096 --dim 2048 --dtype bfloat16]
                                    [--skip-torch] [--out bench.md]

Bytes counted: forward = x and log_gamma read + h written; forward+backward adds grad_h,
h and log_gamma read and d_x, d_log_gamma written. The copy moves the forward's bytes.
"""

import argparse

import torch

from mm_rec.benchmark import cuda_median_ms
from mm_rec.scan import scan

try:
    from fla.ops.hgrn import chunk_hgrn, fused_recurrent_hgrn
except ImportError:
    chunk_hgrn = fused_recurrent_hgrn = None


def forward(op, x, log_gamma):
    def run():
        with torch.no_grad():
            op(x, log_gamma)

    return run


def forward_and_backward(op, x, log_gamma, grad_h):
    def run():
        h = op(x, log_gamma)[0]
        torch.autograd.grad(h, (x, log_gamma), grad_h)

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--skip-torch", action="store_true", help="skip the (slow) PyTorch reference")
    parser.add_argument("--out", help="also write the table as markdown to this path")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    B, T, D = args.batch, args.seq_len, args.dim
    n = B * T * D
    fwd_bytes = 3 * n * dtype.itemsize
    fwd_bwd_bytes = 8 * n * dtype.itemsize
    x = torch.randn(B, T, D, device="cuda", dtype=dtype, requires_grad=True)
    log_gamma = torch.log(torch.rand(B, T, D, device="cuda") * 0.1 + 0.9).to(dtype).requires_grad_()
    grad_h = torch.randn_like(x)
    src = torch.randn(3 * n // 2, device="cuda", dtype=dtype)
    dst = torch.empty_like(src)

    def scan_op(backend):
        return lambda x, log_gamma: scan(x, log_gamma, backend=backend)

    cases = [("copy (roofline)", "fwd", lambda: dst.copy_(src))]
    cases += [("mm_rec scan triton fwd", "fwd", forward(scan_op("triton"), x, log_gamma))]
    cases += [("mm_rec scan triton fwd+bwd", "fwd+bwd", forward_and_backward(scan_op("triton"), x, log_gamma, grad_h))]
    for name, op in (("fla chunk_hgrn", chunk_hgrn), ("fla fused_recurrent_hgrn", fused_recurrent_hgrn)):
        if op is None:
            cases += [(f"{name} fwd", "fwd", None), (f"{name} fwd+bwd", "fwd+bwd", None)]
        else:
            cases += [(f"{name} fwd", "fwd", forward(op, x, log_gamma))]
            cases += [(f"{name} fwd+bwd", "fwd+bwd", forward_and_backward(op, x, log_gamma, grad_h))]
    if not args.skip_torch:
        cases += [("mm_rec scan torch fwd", "fwd", forward(scan_op("torch"), x, log_gamma))]

    times = {name: None if fn is None else cuda_median_ms(fn) for name, _, fn in cases}

    copy_gbs = fwd_bytes / times["copy (roofline)"] / 1e6
    header = ["kernel", "median ms", "GB/s", "% of copy", "speed-up vs fla chunk_hgrn"]
    rows = []
    for name, kind, _ in cases:
        ms = times[name]
        if ms is None:
            rows.append([name, "fla not installed", "", "", ""])
            continue
        gbs = (fwd_bytes if kind == "fwd" else fwd_bwd_bytes) / ms / 1e6
        fla_ms = times.get(f"fla chunk_hgrn {kind}")
        speedup = f"{fla_ms / ms:.2f}x" if fla_ms and name != "copy (roofline)" else ""
        rows.append([name, f"{ms:.3f}", f"{gbs:.0f}", f"{100 * gbs / copy_gbs:.0f}%", speedup])

    title = f"B={B} T={T} D={D} {args.dtype} on {torch.cuda.get_device_name()}"
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    print(title)
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    if args.out:
        lines = [f"{title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
