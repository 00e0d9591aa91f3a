"""Command-line plumbing shared by the scripts: argument types, one-line errors, loading a saved folder,
the thread count.

Nothing here imports torch or transformers at module level: the scripts parse their arguments
(and answer ``--help``) before those heavy imports happen.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Mapping, NoReturn, Optional, Sequence, Tuple


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


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def device_type(text: str) -> str:
    """argparse type: a torch device name (cuda, cuda:1, cpu)."""
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a device such as cuda, cuda:1 or cpu, got {text!r}") from None
    return text


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
    folder's own code (trust_remote_code=True); on the GPU where there is one (generation then
    replays its CUDA-graph decode steps)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_weight_loading()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), tokenizer


def quiet_weight_loading() -> None:
    """Turn off transformers' weight loading/saving bars (the training and evaluation progress
    stays)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def run_main(main: Callable[[], int]) -> int:
    """Call a script's body: a user error becomes one line ``error: ...`` on stderr and exit
    status 2; Ctrl-C before training ends quietly with status 130. In a distributed run
    (``accelerate launch``) the process ends here, see ``_leave_process_group``. Imports
    nothing heavy: ``main`` parses its arguments first."""
    if "transformers" in sys.modules:
        quiet_weight_loading()
    try:
        status = main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        status = 130
    except (ValueError, OSError) as err:  # OSError: missing, unreadable or existing files
        if is_main_process():
            print(f"error: {one_line(err)}", file=sys.stderr)
        status = 2
    if _distributed():
        _leave_process_group(status)
    return status


def _distributed() -> bool:
    """Whether a process group is up (only possible once torch is imported)."""
    if "torch" not in sys.modules:
        return False
    import torch

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_main_process() -> bool:
    """Whether this process prints and writes: True unless it is one of the others (rank > 0)
    of a distributed run (``accelerate launch``, ``torchrun``)."""
    if _distributed():
        import torch

        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"  # set by the launcher before the process group starts


def _leave_process_group(status: int) -> NoReturn:
    """End a process of a distributed run. After a success the processes leave together (no
    process closes its sockets under a working one); then the process group's teardown is
    skipped: ~ProcessGroupGloo joins its worker thread, which may still be freeing the last
    collective's tensors and needs the GIL for that, so at interpreter exit the thread is killed
    there (std::terminate: SIGABRT), and from destroy_process_group() the two threads deadlock.
    After a failure there is no waiting: the launcher stops the other processes."""
    import torch

    if status == 0:
        torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def command_line(script: str | os.PathLike, args: Sequence[str], interpreter: bool = True) -> str:
    """The shell command that runs ``script`` with ``args`` under the interpreter running now
    (``sys.executable``: a bare ``python`` may be another Python without the packages), both
    relative to the current folder when inside it, shell-quoted. ``interpreter=False``: the
    script and its arguments only (for a launcher's command line)."""
    def shown(path: str, run_by_name: bool) -> str:
        absolute = os.path.abspath(path)  # not resolve(): a venv's python is a symlink that must stay one
        relative = os.path.relpath(absolute)
        if relative.startswith(os.pardir):
            return absolute
        # the shell looks a command without a slash up in PATH
        return relative if not run_by_name or os.sep in relative else os.path.join(os.curdir, relative)

    words = [shown(os.fspath(script), False), *args]
    return shlex.join([shown(sys.executable, True), *words] if interpreter else words)


# ----------------------------------------------------------------------------- threads

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def idle_threads(cpus: int, load: float, processes: int = 1) -> int:
    """Threads per process for ``processes`` processes on ``cpus`` usable cores of which ``load``
    are busy: the idle cores (``cpus - load``) shared between the processes,
    rounded to the nearest integer (halves up), at least 1 and at most ``cpus // processes``.
    More threads than idle cores make every thread wait for the busy cores."""
    if cpus < 1 or processes < 1:
        raise ValueError(f"cpus and processes must be positive, got {cpus} and {processes}")
    per_process = (cpus - max(0.0, load)) / processes
    return max(1, min(max(1, cpus // processes), math.floor(per_process + 0.5)))


def cpu_times(stat: str) -> Dict[int, Tuple[int, int]]:
    """{core: (total, idle) jiffies} from the text of /proc/stat (idle counts iowait too)."""
    times = {}
    for line in stat.splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            ticks = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
            times[int(name[3:])] = (sum(ticks), ticks[3] + (ticks[4] if len(ticks) > 4 else 0))
    return times


def busy_between(before: Mapping[int, Tuple[int, int]], after: Mapping[int, Tuple[int, int]], cores) -> float:
    """How many of ``cores`` were busy between two ``cpu_times`` readings (each core's busy share, summed)."""
    busy = 0.0
    for core in cores:
        if core in before and core in after and after[core][0] > before[core][0]:
            total, idle = after[core][0] - before[core][0], after[core][1] - before[core][1]
            busy += 1.0 - idle / total
    return busy


def busy_cores(window: float = 0.3) -> Optional[float]:
    """The usable cores busy now, measured over ``window`` seconds from /proc/stat; where there is
    none, the 1-minute load average. (The load average alone lags: right after the set-up's pip
    it still counts a busy core on an idle machine.)"""
    try:
        with open("/proc/stat") as f:
            before = cpu_times(f.read())
        time.sleep(window)
        with open("/proc/stat") as f:
            after = cpu_times(f.read())
    except OSError:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else before.keys()
    return busy_between(before, after, cores)


def usable_cpus() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under taskset or a container's cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_threads(requested: Optional[int], log: Callable[[str], None] = print) -> int:
    """Set torch's intra-op thread count and say so in one line: ``requested`` (``--threads``)
    if given; else what OMP_NUM_THREADS / MKL_NUM_THREADS asked for (torch read it at import);
    else ``idle_threads`` of this machine now. Returns the count."""
    import torch

    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # set by torchrun / accelerate launch
    given = {name: os.environ[name] for name in THREAD_VARIABLES if os.environ.get(name, "").strip()}
    if requested is not None:
        threads, why = requested, "--threads"
    elif given:
        threads, why = torch.get_num_threads(), ", ".join(f"{k}={v}" for k, v in given.items())
    else:
        cpus, load = usable_cpus(), busy_cores() or 0.0
        threads = idle_threads(cpus, load, processes)
        why = (f"{cpus} cores, {load:.1f} busy" + (f", {processes} processes" if processes > 1 else "")
               + "; set --threads or OMP_NUM_THREADS to choose")
    torch.set_num_threads(threads)
    log(f"threads: {threads} ({why})")
    return threads
