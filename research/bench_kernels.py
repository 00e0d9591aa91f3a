"""Time the scan kernels against a device-to-device copy and flash-linear-attention's HGRN.

    python research/bench_kernels.py [--batch 8 --seq-len 4096 --dim 2048 --dtype bfloat16]
                                    [--skip-torch] [--out bench.md]

Every case is timed twice, in one run, as medians of CUDA-event timings:
  * eager: ``fn()`` called from Python (triton.testing.do_bench, L2 flushed between calls),
    which includes any time the GPU waits for the host to launch the work;
  * GPU: ``fn()`` captured once in a CUDA graph and replayed (do_bench_cudagraph), which is
    the kernels' own time.
GB/s, % of copy and the speed-ups use the GPU column; the eager speed-up is printed beside.

Bytes counted: forward = x and log_gamma read + h written; forward+backward adds grad_h,
h and log_gamma read and d_x, d_log_gamma written. The copy moves the forward's bytes.

A second table gives the host's CPU time per call at a tiny shape (the launch overhead),
for the eager path that scan() takes, the torch.library custom op that torch.compile
traces, and fla.

    python research/bench_kernels.py --state-gate [--batch 32 --seq-len 512 --dim 384]

times instead recurrence_gate="state"'s walk over t (float32, as the model runs it): the Triton
kernels against the PyTorch loop, forward and forward+backward, eager medians.
"""

import argparse

import torch
from timing import cuda_graph_median_ms, cuda_median_ms, host_us_per_call

from mm_rec import scan

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


def scan_op(backend):
    return lambda x, log_gamma: scan(x, log_gamma, backend=backend)


def custom_op(x, log_gamma):
    """The torch.library op ``mm_rec::scan_fwd`` (what torch.compile calls), with its registered autograd."""
    return torch.ops.mm_rec.scan_fwd(x, log_gamma, None, "triton")


def gpu_ms(fn):
    try:
        return cuda_graph_median_ms(fn)
    except Exception as error:  # a case that cannot be captured keeps its eager figure only
        print(f"(no CUDA-graph timing: {type(error).__name__}: {str(error)[:120]})")
        return None


def host_overhead_rows(dtype):
    x = torch.randn(1, 64, 64, device="cuda", dtype=dtype, requires_grad=True)
    log_gamma = (-0.1 * torch.rand(1, 64, 64, device="cuda")).to(dtype).requires_grad_()
    grad_h = torch.randn_like(x)
    cases = [("mm_rec scan() (eager autograd.Function)", scan_op("triton")),
             ("mm_rec torch.library custom op", custom_op)]
    if chunk_hgrn is not None:
        cases.append(("fla chunk_hgrn", chunk_hgrn))
    return [[name, f"{host_us_per_call(forward(op, x, log_gamma)):.0f}",
             f"{host_us_per_call(forward_and_backward(op, x, log_gamma, grad_h)):.0f}"] for name, op in cases]


def print_table(title, header, rows, out_lines):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    print(title)
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print()
    out_lines += [f"{title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out_lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--skip-torch", action="store_true", help="skip the (slow) PyTorch reference")
    parser.add_argument("--out", help="also write the tables as markdown to this path")
    parser.add_argument("--state-gate", action="store_true",
                        help="time the state gate's walk over t (Triton kernels against the PyTorch loop) instead")
    args = parser.parse_args()
    if args.state_gate:
        return state_gate_main(args)

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

    eager = {name: None if fn is None else cuda_median_ms(fn) for name, _, fn in cases}
    gpu = {name: None if fn is None else gpu_ms(fn) for name, _, fn in cases}

    copy_ms = gpu["copy (roofline)"] or eager["copy (roofline)"]
    copy_gbs = fwd_bytes / copy_ms / 1e6
    header = ["kernel", "eager ms", "GPU ms", "GB/s", "% of copy", "vs fla chunk_hgrn (GPU)", "vs fla (eager)"]
    rows = []
    for name, kind, _ in cases:
        if eager[name] is None:
            rows.append([name, "fla not installed", "", "", "", "", ""])
            continue
        ms = gpu[name] or eager[name]
        gbs = (fwd_bytes if kind == "fwd" else fwd_bwd_bytes) / ms / 1e6
        fla = f"fla chunk_hgrn {kind}"
        def ratio(table, mine):
            return f"{table[fla] / mine:.2f}x" if table.get(fla) and mine and name != "copy (roofline)" else ""
        rows.append([name, f"{eager[name]:.3f}", "n/a" if gpu[name] is None else f"{gpu[name]:.3f}", f"{gbs:.0f}",
                     f"{100 * gbs / copy_gbs:.0f}%", ratio(gpu, gpu[name]), ratio(eager, eager[name])])

    out_lines = []
    print_table(f"B={B} T={T} D={D} {args.dtype} on {torch.cuda.get_device_name()}", header, rows, out_lines)
    print_table("Host CPU time per call, B=1 T=64 D=64 (launch overhead; the GPU is idle)",
                ["path", "fwd us", "fwd+bwd us"], host_overhead_rows(dtype), out_lines)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(out_lines) + "\n")


def state_gate_main(args):
    from mm_rec.state_gate import StateGate

    B, T, D = args.batch, args.seq_len, args.dim
    z = torch.randn(B, T, D, device="cuda", requires_grad=True)
    log_gamma = torch.nn.functional.logsigmoid(2.0 + torch.randn(B, T, D, device="cuda")).requires_grad_()
    reset = torch.zeros(B, T, dtype=torch.bool, device="cuda")
    gate = StateGate(D).cuda()
    grad_h = torch.randn(B, T, D, device="cuda")

    def fwd(backend):
        def run():
            with torch.no_grad():
                gate(z, log_gamma, reset, None, backend=backend)
        return run

    def fwd_bwd(backend):
        def run():
            h, _ = gate(z, log_gamma, reset, None, backend=backend)
            torch.autograd.grad(h, (z, log_gamma, gate.W_g.weight), grad_h)
        return run

    times = {(backend, kind): cuda_median_ms(fn(backend), rep_ms=1000)
             for backend in ("triton", "torch") for kind, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd))}
    rows = [[kind, f"{times['triton', kind]:.2f}", f"{times['torch', kind]:.2f}",
             f"{times['torch', kind] / times['triton', kind]:.1f}x"] for kind in ("fwd", "fwd+bwd")]
    out_lines = []
    print_table(f"state gate, B={B} T={T} d={D} float32 on {torch.cuda.get_device_name()} (eager medians)",
                ["pass", "Triton ms", "PyTorch loop ms", "speed-up"], rows, out_lines)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(out_lines) + "\n")


if __name__ == "__main__":
    main()
