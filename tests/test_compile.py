"""The scan is a torch.library custom op: torch.compile traces it whole (fullgraph) on CPU too."""

import pytest
import torch

from mm_rec.scan import scan
from naive import naive_scan


@pytest.mark.parametrize("use_h0", [True, False])
def test_scan_compiles_fullgraph_forward_and_backward(use_h0):
    def f(x, log_gamma, h0):
        h, h_last = scan(x, log_gamma, h0, output_final_state=True, backend="torch")
        return (h * h).sum() + h_last.sum()

    torch.manual_seed(0)
    x = torch.randn(2, 37, 5, requires_grad=True)
    log_gamma = (-torch.rand(2, 37, 5)).requires_grad_()
    h0 = torch.randn(2, 5, requires_grad=True) if use_h0 else None
    leaves = (x, log_gamma, h0) if use_h0 else (x, log_gamma)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, log_gamma, h0)
    grads = torch.autograd.grad(loss, leaves)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    h, h_last = naive_scan(*ref_leaves)
    ref = (h * h).sum() + h_last.sum()
    ref_grads = torch.autograd.grad(ref, ref_leaves)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_compiled_graph_calls_the_custom_op():
    """Eager mode runs an autograd.Function; under torch.compile the graph must hold the op."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    x, log_gamma = torch.randn(1, 8, 3), -torch.rand(1, 8, 3)
    torch.compile(lambda a, b: scan(a, b, backend="torch")[0].sum(), backend=record, fullgraph=True)(x, log_gamma)
    assert any("mm_rec.scan_fwd" in code for code in graphs), graphs


def test_scan_op_passes_torch_library_opcheck():
    x = torch.randn(2, 9, 3, requires_grad=True)
    log_gamma = (-torch.rand(2, 9, 3)).requires_grad_()
    h0 = torch.randn(2, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.mm_rec.scan_fwd.default, (x, log_gamma, h0, "torch"))
    h = torch.randn(2, 9, 3)
    torch.library.opcheck(torch.ops.mm_rec.scan_bwd.default,
                          (torch.randn(2, 9, 3), torch.randn(2, 3), h, log_gamma.detach(), h0.detach(), "torch"))
    # no initial state and no gradient for the final state: both optional
    torch.library.opcheck(torch.ops.mm_rec.scan_fwd.default, (x, log_gamma, None, "torch"))
    torch.library.opcheck(torch.ops.mm_rec.scan_bwd.default,
                          (torch.randn(2, 9, 3), None, h, log_gamma.detach(), None, "torch"))
