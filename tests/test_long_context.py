"""The long-context study's measurements (research/long_context.py) against their definitions:
per-position losses against a prefix-by-prefix loop, buckets and offsets against direct sums,
the passkey rows and far-MQAR batches against what they promise."""

import math

import long_context as lc
import pytest
import quality
import torch
import torch.nn.functional as F
from torch import nn

from mm_rec_train.data import byte_level_tokenizer
from mm_rec_train.evaluation import token_byte_lengths


def test_position_buckets_double_from_the_first_and_end_at_the_length():
    assert lc.position_buckets(4096) == [(0, 512), (512, 1024), (1024, 2048), (2048, 4096)]
    assert lc.position_buckets(3000, first=1000) == [(0, 1000), (1000, 2000), (2000, 3000)]
    with pytest.raises(ValueError):
        lc.position_buckets(0)


def test_per_position_nats_equal_a_prefix_by_prefix_loop(tiny_model):
    """Position t's nats: the model reading only tokens < t, scoring token t (the definition)."""
    model = tiny_model(memory_block_size=4, memory_segment_length=8)
    rows = torch.randint(0, model.config.vocab_size, (3, 20))
    expected = torch.zeros(20, dtype=torch.float64)
    with torch.no_grad():
        for row in rows:
            for t in range(1, 20):
                logits = model(row[None, :t]).logits[0, -1]
                expected[t] += float(F.cross_entropy(logits[None], row[t:t + 1]))
    torch.testing.assert_close(lc.per_position_nats(model, rows, batch_size=2), expected, atol=1e-4, rtol=1e-5)


def test_one_bucket_over_the_whole_row_is_the_study_bits_per_byte(tiny_model):
    tokenizer = byte_level_tokenizer()
    model = tiny_model(vocab_size=len(tokenizer))
    lengths = token_byte_lengths(tokenizer)
    rows = torch.randint(0, len(tokenizer), (4, 24))
    nats = lc.per_position_nats(model, rows)
    n_bytes = lc.per_position_bytes(rows, lengths)
    assert int(n_bytes[0]) == 0 and torch.equal(n_bytes[1:], lengths[rows[:, 1:]].sum(0))
    (whole,) = lc.bucket_metrics(nats, n_bytes, len(rows), [(0, 24)])
    reference = quality.lm_metrics(model, rows, lengths)
    assert whole["tokens"] == reference["tokens"] and whole["bytes"] == reference["bytes"]
    assert whole["bits_per_byte"] == pytest.approx(reference["bits_per_byte"], rel=1e-5)


def test_bucket_metrics_sum_their_positions_and_skip_position_zero():
    nats = torch.arange(10, dtype=torch.float64)
    n_bytes = torch.full((10,), 2)
    first, second = lc.bucket_metrics(nats, n_bytes, rows=1, buckets=[(0, 4), (4, 10)])
    assert first["tokens"] == 3 and first["loss"] == pytest.approx((1 + 2 + 3) / 3)
    assert second["tokens"] == 6 and second["bits_per_byte"] == pytest.approx(sum(range(4, 10)) / math.log(2) / 12)


def test_loss_by_offset_averages_each_offset_over_the_later_segments():
    nats = torch.rand(4 * 5 + 3, dtype=torch.float64)  # 5 segments of 4, then a partial one
    by_offset = lc.loss_by_offset(nats, rows=2, segment_length=4)
    for j in range(4):
        positions = [p for p in range(4, 20) if p % 4 == j]
        assert float(by_offset[j]) == pytest.approx(sum(float(nats[p]) for p in positions) / (2 * len(positions)))
    with pytest.raises(ValueError, match="segment"):
        lc.loss_by_offset(nats[:7], rows=1, segment_length=4)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0, None])
def test_passkey_rows_hide_the_key_at_the_depth_and_label_only_the_answer(depth):
    tokenizer = byte_level_tokenizer()
    generator = torch.Generator().manual_seed(1)
    ids, labels, depths = lc.passkey_batch(tokenizer, 400, 3, generator, depth=depth)
    assert ids.shape == labels.shape == (3, 400)
    for row, row_labels, at in zip(ids, labels, depths):
        text = tokenizer.decode(row.tolist())
        answer = tokenizer.decode(row_labels[row_labels != lc.IGNORE_INDEX].tolist())
        assert len(answer) == 5 and answer.isdigit()
        assert text.endswith(lc.QUESTION + answer)  # the labels are the last tokens, the key itself
        needle = f" The pass key is {answer}. Remember it. {answer} is the pass key. "
        start = text.index(needle)
        filler = 400 - len(needle) - len(lc.QUESTION) - 5
        assert start == round(float(at) * filler)
        if depth is not None:
            assert float(at) == pytest.approx(depth, abs=1 / filler)


class NextTokenOracle(nn.Module):
    """Logits that put all mass on the row's actual next token: a model that is always right."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, use_cache=False):
        following = torch.cat([input_ids[:, 1:], input_ids[:, :1]], 1)
        return type("Out", (), {"logits": F.one_hot(following, self.vocab_size).float()})()


def test_answer_accuracy_is_exact_match_of_every_labelled_token():
    tokenizer = byte_level_tokenizer()
    ids, labels, _ = lc.passkey_batch(tokenizer, 200, 4, torch.Generator().manual_seed(0))
    oracle = NextTokenOracle(len(tokenizer))
    assert lc.answer_accuracy(oracle, ids, labels).all()
    wrong = labels.clone()
    wrong[1, -2] = (wrong[1, -2] + 1) % len(tokenizer)  # row 1 now expects a digit its input does not have
    assert lc.answer_accuracy(oracle, ids, wrong).tolist() == [True, False, True, True]


def test_far_mqar_queries_every_key_once_after_the_start():
    generator = torch.Generator().manual_seed(3)
    inputs, targets = lc.far_mqar_batch(256, 8, 128, 64, 5, generator)
    for x, y in zip(inputs, targets):
        keys, values = x[0:16:2].tolist(), x[1:16:2].tolist()
        assert len(set(keys)) == 8 and all(1 <= k < 32 for k in keys) and all(32 <= v < 64 for v in values)
        queries = (y != lc.IGNORE_INDEX).nonzero().flatten().tolist()
        assert len(queries) == 8 and min(queries) >= 128 and all(q % 2 == 0 for q in queries)
        for q in queries:
            assert int(y[q]) == values[keys.index(int(x[q]))]
    with pytest.raises(ValueError, match="cannot hold"):
        lc.far_mqar_batch(256, 80, 128, 1024, 1, generator)
