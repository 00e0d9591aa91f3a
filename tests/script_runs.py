"""Shared by the tests of the training path: the scripts loaded in-process (their ``main([...])``),
the flags of a run that takes seconds, text folders, the files of a run folder before and after,
and spies on the Trainer (the steps it trains, the data it was given)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import math
from pathlib import Path
from typing import Dict, List

import pytest
import transformers

from mm_rec_train.runs import REPOSITORY

QUICK = ["--preset", "tiny", "--eval-blocks", "4", "--threads", "1"]  # a run of 64-token rows, seconds, one thread
# (one thread: two runs compared weight for weight do the same arithmetic)


def script(name: str, folder: str = "scripts"):
    """``scripts/<name>.py`` as a module, to call its ``main([...])`` in this process."""
    spec = importlib.util.spec_from_file_location(f"mmrec_script_{name}", REPOSITORY / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_texts(folder: Path, texts: Dict[str, str]) -> Path:
    """One ``<name>.txt`` file per text; ``load_corpus`` reads them sorted by path."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return folder


def file_stats(folder: Path) -> Dict[str, tuple]:
    """{relative path: (bytes, mtime in ns)} of every file under ``folder``."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def tree_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def assert_one_line_error(capsys, rc, *words) -> str:
    """The script returned 2 and printed one line ``error: ...`` holding every word; returns it."""
    err = capsys.readouterr().err.strip()
    assert rc == 2, (rc, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for word in words:
        assert word in err, err
    return err


class TrainerSpy:
    """What the Trainer of a run did: ``trainers`` (each Trainer whose ``train`` ran), ``steps``
    (calls of ``training_step``: optimizer steps, as there is no gradient accumulation) and
    ``batches`` (the inputs of each of those steps, on the CPU)."""

    def __init__(self):
        self.trainers: List[transformers.Trainer] = []
        self.steps = 0
        self.batches: List[dict] = []


@contextlib.contextmanager
def spy_trainer(interrupt_at_step: int | None = None):
    """Record the run's Trainer; with ``interrupt_at_step`` n, Ctrl-C (KeyboardInterrupt) comes
    once n optimizer steps are done, before the next one."""
    spy = TrainerSpy()
    train, training_step = transformers.Trainer.train, transformers.Trainer.training_step

    def recording_train(self, *args, **kwargs):
        spy.trainers.append(self)
        return train(self, *args, **kwargs)

    def counting_step(self, model, inputs, *args, **kwargs):
        if interrupt_at_step is not None and self.state.global_step == interrupt_at_step:
            raise KeyboardInterrupt
        spy.steps += 1
        spy.batches.append({k: v.detach().cpu().clone() for k, v in inputs.items() if hasattr(v, "detach")})
        return training_step(self, model, inputs, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers.Trainer, "train", recording_train)
        patch.setattr(transformers.Trainer, "training_step", counting_step)
        yield spy


def byte_alphabet() -> Dict[str, int]:
    """{character: byte} of the GPT-2 byte-level alphabet: printable Latin-1 bytes stand for
    themselves; the others (controls, space, 0x7F-0xA0, 0xAD), in byte order, for chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def bits_per_byte(nats: float, n_bytes: int) -> float:
    return nats / math.log(2) / n_bytes
