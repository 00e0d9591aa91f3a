"""research/memory_variants.py: the write-gate prototype against the model's own fold (a constant write rate of
1 - memory_decay is the EMA fold) and against its definition (a block written at full strength replaces its slot)."""

import math

import pytest
import torch
from common import tiny_model

from mm_rec.memory import fold_into_slots


def test_a_constant_write_rate_is_the_model_s_ema_fold():
    from memory_variants import gated_fold

    torch.manual_seed(0)
    B, S, C, d, decay = 3, 4, 9, 8, 0.9
    slot_keys, slot_values = torch.randn(B, S, d), torch.randn(B, S, d)
    block_keys, block_values = torch.randn(B, C, d), torch.randn(B, C, d)
    keys, values = fold_into_slots(slot_keys, slot_values, block_keys, block_values,
                                   torch.ones(B, C, dtype=torch.bool), decay)
    folded = gated_fold(torch.cat([slot_keys, slot_values], -1), torch.cat([block_keys, block_values], -1),
                        torch.full((B, C), 1.0 - decay), d)
    torch.testing.assert_close(folded, torch.cat([keys, values], -1))


def test_a_block_written_at_full_strength_replaces_its_slot():
    from memory_variants import gated_fold

    slots = torch.tensor([[[1.0, 0.0, 5.0, 5.0], [0.0, 1.0, 6.0, 6.0]]])  # two slots, keys | values (d = 2)
    blocks = torch.tensor([[[0.2, 0.9, 7.0, 8.0], [0.1, 0.8, 1.0, 2.0]]])  # both route to slot 1
    folded = gated_fold(slots, blocks, torch.tensor([[1.0, 0.5]]), 2)
    # slot 1: the first block replaces it, the second takes half of what is left; slot 0 is not touched
    expected = 0.5 * blocks[0, 0] + 0.5 * blocks[0, 1]
    torch.testing.assert_close(folded[0, 1], expected)
    torch.testing.assert_close(folded[0, 0], slots[0, 0])


def test_the_prototype_at_the_model_s_rate_gives_its_logits_and_trains_the_gate():
    from memory_variants import write_gate

    model = tiny_model(memory_block_size=1)
    ids = torch.randint(2, model.config.vocab_size, (2, 56))  # 3.5 segments of 16: three folds
    reference = model(ids).logits
    decay = model.config.memory_decay
    write_gate(model, initial_rate=1.0 - decay)
    torch.testing.assert_close(model(ids).logits, reference, rtol=1e-5, atol=1e-5)
    model.train()
    model(ids, labels=ids).loss.backward()
    memory = model.model.layers[0].memory
    assert memory.write_bias.grad is not None and memory.write_weight.grad.abs().sum() > 0
    assert math.isclose(torch.sigmoid(memory.write_bias).item(), 1.0 - decay, rel_tol=1e-5)


def test_the_prototype_needs_a_memory_and_a_rate_in_the_open_interval():
    from memory_variants import write_gate

    with pytest.raises(ValueError, match="initial_rate"):
        write_gate(tiny_model(), initial_rate=1.0)
    with pytest.raises(ValueError, match="no memory"):
        write_gate(tiny_model(memory_levels="none"))


def test_fixed_addresses_fold_as_a_loop_over_segments_routed_against_the_learned_keys():
    from memory_variants import address

    from mm_rec.memory import apply_fold, fold_weights

    torch.manual_seed(1)
    model = tiny_model(memory_block_size=1)
    memory = model.model.layers[0].memory
    address(model)
    B, K, C, d = 2, 4, model.config.blocks_per_segment, model.config.hidden_size
    summaries = torch.randn(B, K, C, 2 * d)
    restart = torch.zeros(B, K, dtype=torch.bool)
    restart[1, 2] = True  # row 1: a document starts at segment 2
    state = memory.fresh_state(B)
    slots = memory._segment_slots(summaries, state, restart)
    learned_keys, learned_values = memory.learned_slots()
    learned = torch.cat([learned_keys, learned_values], -1)
    expected = [torch.cat([state.slot_keys, state.slot_values], -1)]
    for s in range(1, K):
        weight, keep = fold_weights(learned_keys.expand(B, -1, -1), summaries[:, s - 1, :, :d],
                                    torch.ones(B, C, dtype=torch.bool), memory.decay)
        folded = apply_fold(weight, keep, expected[-1], summaries[:, s - 1])
        expected.append(torch.where(restart[:, s, None, None], learned, folded))
    torch.testing.assert_close(slots, torch.stack(expected, 1), rtol=1e-5, atol=1e-5)


def test_fixed_addresses_change_nothing_while_only_the_learned_slots_have_been_folded_into():
    from memory_variants import address, address_gate

    model = tiny_model(memory_block_size=1)
    ids = torch.randint(2, model.config.vocab_size, (2, 24))  # 1.5 segments of 16: one fold, from the learned slots
    reference = model(ids).logits
    torch.testing.assert_close(address(model)(ids).logits, reference, rtol=1e-5, atol=1e-5)
    longer = torch.randint(2, model.config.vocab_size, (2, 56))  # three folds: the addresses now differ
    routed_by_history = model.__class__(model.config).eval()
    routed_by_history.load_state_dict(model.state_dict())
    gated = address_gate(routed_by_history, initial_rate=1.0 - model.config.memory_decay)
    torch.testing.assert_close(gated(longer).logits, model(longer).logits, rtol=1e-5, atol=1e-5)


def test_the_two_segment_window_attends_as_a_per_token_loop():
    """``window``: the token at offset j of segment k reads every slot of segment k, every token of segment k - 1
    (unless k is a row's first segment or starts a document) and the tokens before it in segment k."""
    from memory_variants import window

    from mm_rec.positions import token_layout

    model = tiny_model(memory_block_size=1)
    window(model)
    memory = model.model.layers[0].memory
    L, d, H = memory.segment_length, model.config.hidden_size, model.config.num_attention_heads
    B, K = 2, 4
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, K * L, d, generator=g) for _ in range(3))
    position_ids = torch.arange(K * L).repeat(B, 1)
    position_ids[1, L:] -= L  # row 1: a second document from segment 1 on
    layout = token_layout(torch.ones(B, K * L, dtype=torch.long), position_ids, torch.zeros(B, dtype=torch.long))
    with torch.no_grad():
        m, _ = memory(q, torch.cat([k, v], -1), layout, memory.fresh_state(B))
        restart = torch.zeros(B, K, dtype=torch.bool)
        restart[1, 1] = True
        kv = torch.cat([k, v], -1)
        slots = type(memory)._segment_slots(memory, kv.view(B, K, L, 2 * d), memory.fresh_state(B), restart)
    heads = lambda x: x.view(x.shape[0], H, -1).transpose(0, 1)  # noqa: E731  [n, d] -> [H, n, d / H]
    for b in range(B):
        for t in range(K * L):
            seg, j = divmod(t, L)
            seen = [slots[b, seg]]
            if seg > 0 and not restart[b, seg]:
                seen.append(kv[b, (seg - 1) * L:seg * L])
            seen.append(kv[b, seg * L:seg * L + j])
            entries = torch.cat(seen)
            keys, values, query = heads(entries[:, :d]), heads(entries[:, d:]), q[b, t].view(H, 1, -1)
            weights = torch.softmax(query @ keys.transpose(1, 2) / math.sqrt(d // H), -1)
            torch.testing.assert_close(m[b, t], (weights @ values).flatten(), rtol=1e-4, atol=1e-5)


def test_the_window_needs_blocks_of_one_token():
    from memory_variants import window

    with pytest.raises(ValueError, match="memory_block_size=1"):
        window(tiny_model(memory_block_size=2))
