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
