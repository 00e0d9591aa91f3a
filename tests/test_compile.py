"""The scan is a torch.library custom op: torch.compile traces it whole (fullgraph) on CPU too."""

import torch

from mm_rec.scan import scan
from naive import naive_scan


def test_scan_compiles_fullgraph_forward_and_backward():
    def f(x, log_gamma, h0):
        h, h_last = scan(x, log_gamma, h0, output_final_state=True, backend="torch")
        return (h * h).sum() + h_last.sum()

    torch.manual_seed(0)
    x = torch.randn(2, 37, 5, requires_grad=True)
    log_gamma = (-torch.rand(2, 37, 5)).requires_grad_()
    h0 = torch.randn(2, 5, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, log_gamma, h0)
    grads = torch.autograd.grad(loss, (x, log_gamma, h0))

    xd, gd, hd = (t.detach().double().requires_grad_() for t in (x, log_gamma, h0))
    h, h_last = naive_scan(xd, gd, hd)
    ref = (h * h).sum() + h_last.sum()
    ref_grads = torch.autograd.grad(ref, (xd, gd, hd))
    assert abs(loss.item() - ref.item()) <= 1e-3 * abs(ref.item())
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-4)


def test_scan_op_passes_torch_library_opcheck():
    x = torch.randn(2, 9, 3, requires_grad=True)
    log_gamma = (-torch.rand(2, 9, 3)).requires_grad_()
    h0 = torch.randn(2, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.mm_rec.scan_fwd.default, (x, log_gamma, h0, "torch"))
    h = torch.randn(2, 9, 3)
    torch.library.opcheck(torch.ops.mm_rec.scan_bwd.default,
                          (torch.randn(2, 9, 3), torch.randn(2, 3), h, log_gamma.detach(), h0.detach(), "torch"))
