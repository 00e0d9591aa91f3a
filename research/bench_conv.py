"""The short convolution's dense path on CUDA: the Triton kernels (conv_triton.py) against the PyTorch path.

    cd research && python bench_conv.py

First bit-for-bit checks (Triton against PyTorch, dense against the general path; float32 and bfloat16, widths 2 to 8),
then forward and forward + backward times at the training shape (B 16, T 2048, C 2304, bf16) and the memory each path
keeps for the backward. Figures in docs/benchmarks/kernels_gpu.md.
"""

import torch
import triton

from mm_rec.conv import ShortConv
from mm_rec.positions import token_layout


def layout(batch, length, dense, device):
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    return token_layout(mask, None, mask.new_zeros(batch), dense=dense)


def check_bits(device):
    for dtype in (torch.float32, torch.bfloat16):
        for K in (2, 3, 4, 8):
            B, T, C = 3, 777, 600
            eager, fused = ShortConv(C, K, "torch").to(device), ShortConv(C, K, "triton").to(device)
            with torch.no_grad():
                eager.weight.normal_()
                fused.weight.copy_(eager.weight)
            u = torch.randn(B, T, C, device=device).to(dtype)
            state = torch.randn(B, K - 1, C, device=device)
            c1, s1 = eager(u, layout(B, T, True, device), state)
            c2, s2 = fused(u, layout(B, T, True, device), state)
            c3, _ = eager(u, layout(B, T, False, device), state)
            print(dtype, K, "triton==torch dense", torch.equal(c1, c2), torch.equal(s1, s2), "dense==general",
                  torch.equal(c1, c3), "maxdiff", (c1.float() - c2.float()).abs().max().item())


def time_paths(device, B=16, T=2048, C=2304, K=4):
    u0 = torch.randn(B, T, C, device=device, dtype=torch.bfloat16)
    state = torch.zeros(B, K - 1, C, device=device)
    grad = torch.randn(B, T, C, device=device, dtype=torch.bfloat16)
    dense = layout(B, T, True, device)
    for backend in ("torch", "triton"):
        conv = ShortConv(C, K, backend).to(device)
        u = u0.clone().requires_grad_()

        def forward():
            return conv(u, dense, state)[0]

        def step():
            forward().backward(grad)

        for fn, name in ((forward, "fwd"), (step, "fwd+bwd")):
            print(backend, name, f"{triton.testing.do_bench(fn, return_mode='median'):.3f} ms")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        c = forward()
        kept = torch.cuda.memory_allocated() - base - c.numel() * c.element_size()
        peak = torch.cuda.max_memory_allocated() - base
        print(backend, f"memory kept for backward beyond c: {kept / 2**20:.1f} MiB; peak fwd {peak / 2**20:.1f} MiB")
        del c


def main():
    if not torch.cuda.is_available():
        raise SystemExit("bench_conv.py needs a CUDA device")
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    torch.manual_seed(0)
    check_bits(device)
    time_paths(device)


if __name__ == "__main__":
    main()
