"""Command-line plumbing shared by the scripts: argument types, one-line errors, loading a saved folder."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn

import torch


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
