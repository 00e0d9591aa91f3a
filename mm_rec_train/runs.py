"""A run of the main job: presets, the saved run configuration, the output folder and its checkpoints."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional

from .cli import one_line

REPOSITORY = Path(__file__).resolve().parent.parent
PACKAGES = (REPOSITORY / "mm_rec", Path(__file__).resolve().parent)  # never an output folder
RUN_CONFIG = "run_config.json"
RESULTS = "results.json"
CHECKPOINTS = "checkpoints"
STAGING = ".staging"  # checkpoints are written here, then renamed into place
KEEP_CHECKPOINTS = 2  # the last ones; the best one (lowest periodic held-out loss) is kept too

# What train.py writes in a run folder, by name (fnmatch patterns): --overwrite deletes these and
# nothing else. The model's code files are mm_rec's modules (save_pretrained copies them); the
# tokenizer's are the names transformers' tokenizers save under.
RUN_FILES = (
    RUN_CONFIG, RESULTS, CHECKPOINTS, "loss_curve.png", "sample.txt", "README.md", "config.json",
    "generation_config.json", "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json", ".*.tmp",  # atomic_write_text's temporary files
    *sorted(p.name for p in (REPOSITORY / "mm_rec").glob("*.py") if p.name != "__init__.py"),
)
GPU_PRESETS = ("gpu-small", "gpu-130m")

# model: the MMRecConfig size fields (every preset takes the default architecture, MMRecConfig's
# docstring); intermediate_size narrows the FFN to keep the parameter count of a 4 x hidden GELU
# FFN with a quarter-width decay input. vocab_size: BPE size when the tokenizer is trained here;
# eval_blocks: held-out rows of each periodic evaluation (the final one reads all of them).
PRESETS: Dict[str, dict] = {
    "tiny": dict(
        vocab_size=320, block_size=64, batch_size=8, max_steps=20, learning_rate=1e-2, eval_steps=10, eval_blocks=16,
        bf16=False,
        model=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2),
    ),
    "laptop": dict(
        vocab_size=2048, block_size=128, batch_size=16, max_steps=400, learning_rate=3e-3, eval_steps=100, eval_blocks=128,
        bf16=False,
        model=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=280),
    ),
    "gpu-small": dict(  # about 20M parameters
        vocab_size=8192, block_size=512, batch_size=32, max_steps=5000, learning_rate=1.5e-3, eval_steps=500,
        eval_blocks=512, bf16=True, compile=True,
        model=dict(hidden_size=384, num_hidden_layers=8, num_attention_heads=6, intermediate_size=832),
    ),
    "gpu-130m": dict(  # about 128M parameters
        vocab_size=32000, block_size=1024, batch_size=32, max_steps=20000, learning_rate=6e-4, eval_steps=1000,
        eval_blocks=512, bf16=True, compile=True,
        model=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1664),
    ),
}
# torch.compile's modes (--compile-mode); the two with CUDA graphs need a CUDA GPU.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# The model fields a preset may set: sizes only, never the architecture (tests/test_training.py checks).
SIZE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


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
    compile: bool = False  # train through torch.compile (Trainer's torch_compile)
    # torch.compile's mode (Trainer's torch_compile_mode; None: its default). "reduce-overhead" replays the forward and
    # the backward as CUDA graphs: for a small model, whose step is the host's kernel launches
    compile_mode: Optional[str] = None

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "RunConfig":
        """The preset's values, replaced by every override that is not None."""
        if preset not in PRESETS:
            raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        import torch

        base = {k: v for k, v in PRESETS[preset].items()}
        base["bf16"] = base["bf16"] and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        # compiled on a GPU only: the fused step is faster there (docs/benchmarks/train_gpu_compiled.md),
        # while on a CPU the compilation would outlast a short run
        base["compile"] = base.get("compile", False) and torch.cuda.is_available()
        values = dict(preset=preset, data=None, text_field="text", max_works=None, validation_fraction=0.05,
                      tokenizer=None, seed=0, save_steps=None, prompt=None, compile_mode=None, **base)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["compile_mode"] is not None:
            if values["compile_mode"] not in COMPILE_MODES:
                raise ValueError(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got {values['compile_mode']!r}")
            if not values["compile"]:
                raise ValueError(f"--compile-mode {values['compile_mode']} needs --compile (off for this preset here)")
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
        length, evaluation, saving, bf16 and compilation may change; anything that changes the data, the
        tokenizer or the model is refused."""
        given = {k: v for k, v in flags.items() if v is not None}
        candidate = RunConfig.from_preset(given.get("preset", self.preset), **{k: v for k, v in given.items() if k != "preset"})
        for name in FIXED_FIELDS:
            if name in given and getattr(candidate, name) != getattr(self, name):
                raise ValueError(f"--resume: --{name.replace('_', '-')} {given[name]} differs from the saved run's "
                                 f"{getattr(self, name)!r}; resume with the saved value, or start a new --output-dir")
        changed = {k: getattr(candidate, k) for k in ("max_steps", "eval_steps", "save_steps", "eval_blocks", "bf16", "prompt",
                                                      "logging_steps", "compile", "compile_mode") if k in given}
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
    Refused: the repository, a folder containing it, anything inside ``mm_rec/`` or ``mm_rec_train/``, another git
    repository, a file; a folder that already holds anything, unless ``resume`` (then it must
    be a train.py run) or ``overwrite`` (then it must be a train.py run)."""
    path = Path(output_dir).expanduser().resolve()
    if resume and overwrite:
        raise ValueError("--resume continues the run in --output-dir, --overwrite deletes it: pass one of them")
    if path == REPOSITORY or path in REPOSITORY.parents:
        raise ValueError(f"--output-dir {output_dir}: that is the repository or a folder containing it; choose e.g. runs/NAME")
    for package in PACKAGES:
        if path == package or package in path.parents:
            raise ValueError(f"--output-dir {output_dir}: inside the {package.name} package; choose e.g. runs/NAME")
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
        others = foreign_files(path)
        if others:
            shown = ", ".join(others[:10]) + (f" and {len(others) - 10} more" if len(others) > 10 else "")
            raise ValueError(f"--overwrite: {output_dir} also holds files train.py did not write ({shown}); "
                             "nothing was deleted: move them away or choose a new folder")
    return path


def _is_run_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in RUN_FILES)


def foreign_files(folder: Path) -> List[str]:
    """The entries of a run folder that train.py did not write (relative paths, sorted): anything
    not in RUN_FILES, and in checkpoints/ anything but checkpoint-N folders and the staging folder."""
    found = [p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if not _is_run_file(p.name)]
    checkpoints = folder / CHECKPOINTS
    if checkpoints.is_dir():
        found += [f"{CHECKPOINTS}/{p.name}" for p in checkpoints.iterdir()
                  if p.name != STAGING and checkpoint_step(p) is None]
    elif checkpoints.exists():
        found.append(CHECKPOINTS)
    return sorted(found)


def remove_run_files(folder: Path) -> None:
    """Delete what train.py wrote in ``folder`` (RUN_FILES) and nothing else."""
    for path in folder.iterdir():
        if _is_run_file(path.name):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def check_device(run: "RunConfig", allow_cpu: bool) -> None:
    """Refuse a GPU preset without a CUDA GPU (a run sized for hours on a GPU takes days on a
    CPU) unless ``allow_cpu``."""
    import torch

    if run.compile and run.compile_mode in CUDA_GRAPH_MODES and not torch.cuda.is_available():
        raise ValueError(f"--compile-mode {run.compile_mode} replays CUDA graphs and no CUDA GPU is available "
                         "(torch.cuda.is_available() is False); choose --compile-mode default or "
                         "max-autotune-no-cudagraphs, or train without --compile")
    if run.preset in GPU_PRESETS and not allow_cpu and not torch.cuda.is_available():
        raise ValueError(f"--preset {run.preset} is sized for a GPU ({run.max_steps} steps of {run.batch_size} x "
                         f"{run.block_size} tokens) and no CUDA GPU is available (torch.cuda.is_available() is False); "
                         "pass --allow-cpu to train it on the CPU anyway, or use --preset laptop")


def checkpoint_step(path: Path) -> Optional[int]:
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
    found = sorted((step, p) for p in folder.iterdir() if (step := checkpoint_step(p)) is not None)
    for step, path in reversed(found):
        if is_complete_checkpoint(path):
            return path
        log(f"skipping {path}: incomplete (interrupted while saving?)")
    return None
