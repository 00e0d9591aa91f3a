"""research/op_traffic.py: its count against operations whose bytes are known, and a training forward that
returns no cache doing less work than one that does (the memory then skips the state after the call)."""

import torch
from common import tiny_model


def test_an_operation_counts_its_inputs_and_outputs_and_views_count_nothing():
    from op_traffic import Traffic

    x, y = torch.randn(4, 1000), torch.randn(4, 1000, dtype=torch.float64)
    with Traffic() as counter:
        z = x * 2.0  # reads x, writes z: 2 x 16,000 bytes
        w = (x + y).view(-1).t()  # float32 + float64 -> float64: 16,000 + 32,000 + 32,000; the view is free
        small = torch.ones(10) * 3  # 10 elements: under the 1000-element floor
    outside = "(outside mm_rec)"
    assert counter.bytes[("forward", "mul", outside)] == 2 * x.numel() * 4
    assert counter.bytes[("forward", "add", outside)] == x.numel() * (4 + 8 + 8)
    assert counter.calls[("forward", "mul", outside)] == 2 and not any(op == "view" for _, op, _ in counter.bytes)
    assert z.shape == x.shape and w.numel() == x.numel() and small.numel() == 10


def test_a_forward_without_a_cache_moves_fewer_bytes_than_one_with_it():
    from op_traffic import Traffic

    model = tiny_model().train()  # blocks of 4: the masked attention (a CausalBias cannot be made inside the counter)
    ids = torch.randint(2, model.config.vocab_size, (2, 40))
    moved = {}
    for use_cache in (False, True):
        with Traffic() as counter:
            model(ids, use_cache=use_cache)
        moved[use_cache] = sum(counter.bytes.values()), {line for _, _, line in counter.bytes}
    assert moved[False][0] < moved[True][0]
    # the lines only a returned state runs are absent without it
    assert any(line.startswith("memory.py") for line in moved[True][1] - moved[False][1])
