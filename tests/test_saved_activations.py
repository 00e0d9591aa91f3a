"""What the backward keeps: research/saved_activations.py's count against a case whose saved tensors are known,
and the recurrence's Triton node keeping h alone (its float32 log gamma is recomputed in the backward)."""

import pytest
import torch
from common import tiny_model

from mm_rec.recurrence import recurrence
from mm_rec.recurrence_triton import AVAILABLE


def test_the_count_is_each_saved_storage_once():
    """x * y keeps x and y; y * y keeps y once; a slice keeps the storage it is cut from."""
    from saved_activations import saved_bytes

    class Product(torch.nn.Module):
        def forward(self, ids, labels=None):
            x = torch.ones(4, 8, requires_grad=True)
            y = torch.ones(4, 8, requires_grad=True)
            wide = torch.ones(4, 32, requires_grad=True) * 2.0
            return (x * y).sum() + (y * y).sum() + (wide[:, :8] * 3.0).sum() + (wide[:, 8:16] ** 2).sum()

    total, where = saved_bytes(Product(), None, bf16=False)
    assert total == 4 * (4 * 8 + 4 * 8 + 4 * 32)  # x, y, and the whole of wide (float32)
    assert sum(where.values()) == total


@pytest.mark.skipif(not AVAILABLE, reason="triton is not installed")
def test_the_triton_recurrence_keeps_h_and_not_log_gamma():
    B, T, d = 2, 12, 16
    a, g, z = (torch.randn(B, T, d).bfloat16().requires_grad_() for _ in range(3))  # as under autocast
    real, reset = torch.ones(B, T, dtype=torch.bool), torch.zeros(B, T, dtype=torch.bool)
    kept = {}
    for backend in ("torch", "triton"):
        saved = {}

        def pack(t, saved=saved):
            if t.dtype == torch.float32 and tuple(t.shape) == (B, T, d):
                saved[t.untyped_storage().data_ptr()] = t
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h, _ = recurrence(z, g, a, real, reset, None, backend=backend)
        kept[backend] = (saved, h)
    triton_saved, h = kept["triton"]
    assert list(triton_saved) == [h.untyped_storage().data_ptr()]  # h alone
    assert len(kept["torch"][0]) >= 2  # the PyTorch path keeps log gamma (and more) beside h


def test_a_training_forward_keeps_nothing_for_the_fold_of_a_state_it_does_not_return():
    """use_cache=False (training): the accumulated fold is not computed, so nothing is kept for it; the forward
    that returns its state keeps only the small routing weights more."""
    from saved_activations import saved_bytes

    model = tiny_model(memory_block_size=1).train()
    ids = torch.randint(2, model.config.vocab_size, (2, 40))

    class Call(torch.nn.Module):
        def __init__(self, use_cache):
            super().__init__()
            self.use_cache = use_cache

        def forward(self, ids, labels=None):
            return model(ids, labels=labels, use_cache=self.use_cache)

    without, _ = saved_bytes(Call(False), ids, bf16=False)
    with_state, _ = saved_bytes(Call(True), ids, bf16=False)
    S, C, layers = model.config.num_memory_slots, model.config.blocks_per_segment, model.config.num_hidden_layers
    assert without < with_state <= without + layers * 2 * C * S * 4 + 1024


def _plain_swiglu(ffn, x):
    return ffn.down(torch.nn.functional.silu(ffn.gate(x)) * ffn.up(x))


@pytest.mark.parametrize("autocast", [False, True])
def test_swiglu_node_equals_pytorchs_operations_and_keeps_less(autocast):
    """block.FeedForward's SwiGLU (one node, the product recomputed in the backward) gives the output and gradients of
    the same three PyTorch operations to the bit, fp32 and under bf16 autocast, and keeps a, b and the weight only."""
    from mm_rec.block import FeedForward

    ffn = FeedForward(16, 40, "silu", gated=True)
    assert ffn.swiglu
    x = torch.randn(3, 5, 16)
    results, kept = [], []
    for fn in (ffn.forward, lambda t: _plain_swiglu(ffn, t)):
        ffn.zero_grad()
        leaf = x.clone().requires_grad_()
        storages = set()

        def pack(t, storages=storages):
            storages.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(leaf)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach(), leaf.grad, *(p.grad.clone() for p in ffn.parameters())])
        kept.append(sum(n for _, n in storages))
    for got, want in zip(*results):
        assert got.dtype == want.dtype and torch.equal(got, want)
    compute = 2 if autocast else 4
    # PyTorch keeps one [15, 40] activation more (silu(a) and the product, where the node recomputes them)
    assert kept[1] - kept[0] >= 15 * 40 * compute


def test_the_block_keeps_no_view_of_the_fused_projection():
    """The memory's query and the output gate are copied out of the fused projection's output, so no saved tensor
    keeps that [B, T, 7d] output alive: the block keeps no storage of its size."""
    model = tiny_model(memory_block_size=1, output_gate=True, gate_memory=True)
    block = model.model.layers[0]
    width = block.hem.W_fused.out_features
    T = 2 * model.config.memory_segment_length  # whole segments: the memory reads the projection in place
    ids = torch.randint(0, model.config.vocab_size, (2, T))
    sizes = []

    def pack(t):
        sizes.append(t.untyped_storage().nbytes() // t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids).loss.backward()
    assert 2 * T * width not in sizes


def test_swiglu_node_never_bypasses_what_wraps_the_down_projection():
    """A LoRA adapter on ``down`` (one of the project's LoRA targets) or a hook on it still acts: the FFN then takes
    PyTorch's operations through the module, and gives what calling the module would."""
    peft = pytest.importorskip("peft")
    from mm_rec.block import FeedForward

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ffn = FeedForward(16, 40, "silu", gated=True)

        def forward(self, x):
            return self.ffn(x)

    torch.manual_seed(3)
    x = torch.randn(2, 5, 16)
    holder = Holder()
    hooked = holder.ffn.down.register_forward_hook(lambda module, args, out: out * 3.0)
    assert torch.equal(holder(x), _plain_swiglu(holder.ffn, x)) and not holder.ffn._down_is_plain()
    hooked.remove()
    plain = holder(x)
    assert holder.ffn._down_is_plain() and torch.allclose(plain, _plain_swiglu(holder.ffn, x), atol=1e-6)
    adapted = peft.get_peft_model(holder, peft.LoraConfig(r=2, target_modules=["down"]))
    for name, param in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    ffn = adapted.base_model.model.ffn
    out = adapted(x)
    assert torch.equal(out, _plain_swiglu(ffn, x)) and not torch.allclose(out, plain)
