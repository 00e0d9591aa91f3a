"""Bits per byte, defined once (mm_rec_train/evaluation.py): the bytes of the predicted tokens
against the text they come from, and the same number from its three users: the main job's final
evaluation (``evaluate_rows``), its Trainer's periodic evaluation, and the quality study's
``lm_metrics``."""

import math

import pytest
import torch

from mm_rec_train.data import byte_level_tokenizer, token_rows, train_tokenizer
from mm_rec_train.evaluation import bits_per_byte, evaluate_rows, predicted_bytes, token_byte_lengths

TEXTS = ["ROMEO. But soft, what light through yonder window breaks?\n",
         "Café, naïve — ça va. Ærø, smørrebrød, 日本語のテキスト.\n",
         "JULIET. O Romeo, Romeo, wherefore art thou Romeo? — «déjà vu» 🙂\n"]


def _tokenizers():
    return {"bytes": byte_level_tokenizer(), "bpe": train_tokenizer([t * 10 for t in TEXTS], vocab_size=300)}


def _whole_character_rows(tokenizer, length):
    """Windows of the token stream of TEXTS whose first token is one ASCII character and whose
    other tokens decode to whole characters: decoding those tokens gives exactly their bytes."""
    stream = [i for text in TEXTS for i in tokenizer(text * 3, add_special_tokens=False)["input_ids"]]
    rows = []
    for start in range(0, len(stream) - length, 3):
        row = stream[start:start + length]
        first, rest = tokenizer.decode(row[:1]), tokenizer.decode(row[1:])
        if len(first) == 1 and first.isascii() and "\ufffd" not in rest and first + rest == tokenizer.decode(row):
            rows.append(row)
    return rows


@pytest.mark.parametrize("name", ["bytes", "bpe"])
def test_predicted_bytes_are_the_bytes_the_predicted_tokens_decode_to(name):
    tokenizer = _tokenizers()[name]
    rows = _whole_character_rows(tokenizer, 12)
    assert len(rows) > 10 and any(not tokenizer.decode(r).isascii() for r in rows)
    expected = sum(len(tokenizer.decode(r[1:]).encode("utf-8")) for r in rows)
    assert predicted_bytes(rows, tokenizer) == expected
    assert predicted_bytes(torch.tensor(rows), byte_lengths=token_byte_lengths(tokenizer)) == expected


def test_predicted_bytes_split_characters_and_special_tokens_by_definition():
    """Rows cut the byte stream anywhere, in the middle of a character too: over rows that cover
    the texts (EOS after each), predicted bytes + the first tokens' bytes = the texts' UTF-8 bytes."""
    tokenizer = byte_level_tokenizer()
    rows = token_rows(TEXTS, tokenizer, 7)
    stream = b"".join(text.encode("utf-8") + b"\0" for text in TEXTS)[:7 * len(rows)]  # \0 marks an EOS
    text_bytes = len(stream) - stream.count(b"\0")
    first_bytes = sum(r[0] != tokenizer.eos_token_id for r in rows)  # one byte each, EOS none
    assert any(0x80 <= b < 0xC0 for b in stream[1::7])  # some row's predicted tokens start inside a character
    assert predicted_bytes(rows, tokenizer) == text_bytes - first_bytes
    # Decoding such a row's predicted tokens on their own would count U+FFFD (3 bytes) for a lone continuation byte.
    _, continuation = tokenizer("é", add_special_tokens=False)["input_ids"]
    assert len(tokenizer.decode([continuation]).encode("utf-8")) == 3 and token_byte_lengths(tokenizer)[continuation] == 1


def test_predicted_bytes_of_other_tokenizers_decode_each_row():
    """A tokenizer that is not byte-level (a WordPiece one here) has no byte table: each row's
    predicted tokens are decoded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in TEXTS for w in text.split()})
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    rows = [tokenizer(text)["input_ids"][:5] for text in TEXTS]
    with pytest.raises(ValueError, match="byte-level"):
        token_byte_lengths(tokenizer)
    assert predicted_bytes(rows, tokenizer) == sum(len(tokenizer.decode(r[1:]).encode("utf-8")) for r in rows)


def test_bits_per_byte_is_nats_over_ln2_over_bytes():
    assert bits_per_byte(math.log(2) * 300, 150) == pytest.approx(2.0)
    assert bits_per_byte(2.0, 4.0) == pytest.approx(bits_per_byte(2.0 * 9, 4.0 * 9))  # per token or in total
    assert math.isnan(bits_per_byte(1.0, 0))


def test_the_three_evaluations_give_the_bits_per_byte_of_the_definition(tiny_model, tmp_path):
    """evaluate_rows (final), the Trainer's eval_bits_per_byte (periodic) and the study's
    lm_metrics agree with total nats (log-softmax in float64) / ln 2 / bytes decoded."""
    from datasets import Dataset
    from quality import lm_metrics
    from transformers import DataCollatorForLanguageModeling, TrainingArguments

    from mm_rec_train.trainer import _bytes_per_token, _trainer_class

    tokenizer = _tokenizers()["bpe"]
    rows = _whole_character_rows(tokenizer, 12)[:10]
    model = tiny_model(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    nats = 0.0
    with torch.no_grad():
        for row in torch.tensor(rows):
            log_probs = torch.log_softmax(model(row[None]).logits[0, :-1].double(), dim=-1)
            nats -= log_probs.gather(1, row[1:, None]).sum().item()
    expected = nats / math.log(2) / sum(len(tokenizer.decode(r[1:]).encode("utf-8")) for r in rows)

    final = evaluate_rows(model, rows, tokenizer, batch_size=4, progress=False)
    study = lm_metrics(model, torch.tensor(rows), token_byte_lengths(tokenizer), batch_size=4)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_eval_batch_size=4,
                             disable_tqdm=True)
    trainer = _trainer_class()(model=model, args=args, eval_dataset=Dataset.from_dict({"input_ids": rows}),
                               data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.eval_bytes_per_token = _bytes_per_token(rows, tokenizer)
    periodic = trainer.evaluate()["eval_bits_per_byte"]
    for value in (final["bits_per_byte"], study["bits_per_byte"], periodic):
        assert value == pytest.approx(expected, rel=1e-5)
    assert final["bytes"] == study["bytes"] and final["tokens"] == study["tokens"] == 11 * len(rows)
