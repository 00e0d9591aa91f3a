"""Generation for the scripts: the sampling flags as a ``GenerationConfig``, the model's own
``generate()`` and stream API (``continue_stream``), and the saved state of a stream
(``generate.py --state``), which records the model that wrote it."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
from transformers import LogitsProcessor, LogitsProcessorList

# What a state file records besides the state, in its safetensors header.
FINGERPRINT_KEY = "model_fingerprint"  # model_fingerprint() of the model that wrote it
FOLDER_KEY = "model_folder"  # where that model was loaded from (for the error message only)
LAST_TOKEN_KEY = "last_token_id"  # the last token the state read (a new turn after an EOS gets no separator)
# config.json entries that say where and by which transformers the folder was written, not what the model computes
_NOT_THE_MODEL = frozenset({"_name_or_path", "transformers_version"})


def model_module(model):
    """The module that defined ``model``'s class: a checkpoint loaded with trust_remote_code has
    its own copy of the MM-Rec code, whose MMRecCache is the one it accepts."""
    return sys.modules[type(model).__module__]


# ------------------------------------------------------------------ sampling


def sampling_config(model, tokenizer, max_new_tokens: int, greedy: bool = False, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0):
    """The ``GenerationConfig`` of the scripts' sampling flags: the model's own generation config
    (its ``generation_config.json``: EOS, PAD and whatever else it sets) with the flags on top.
    ``greedy``: the likeliest token at each step; otherwise sampling with ``temperature``,
    ``top_k`` (0: off) and ``top_p`` (1: off). One sequence, no beams (the output is streamed).
    EOS and PAD fall back on the tokenizer's where the generation config has none."""
    config = copy.deepcopy(model.generation_config)
    if greedy:  # the sampling fields at transformers' neutral values, which it does not warn about in greedy search
        config.update(do_sample=False, temperature=1.0, top_k=50, top_p=1.0)
    else:
        config.update(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    config.update(max_new_tokens=max_new_tokens, num_beams=1, num_return_sequences=1, return_dict_in_generate=True)
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.eos_token_id
    return config


class _NonFiniteLogits(Exception):
    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


class _FiniteLogitsCheck(LogitsProcessor):
    """Stops generate() at a step whose scores hold NaN or +inf, or no finite value at all (-inf
    alone is what a processor writes for a token it rules out): torch.multinomial would fail on
    them with a traceback, and argmax would pick a meaningless token."""

    def __init__(self):
        self.steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.steps += 1
        bad = torch.isnan(scores).any() | torch.isposinf(scores).any() | ~torch.isfinite(scores).any(-1).all()
        if bool(bad):
            raise _NonFiniteLogits(self.steps)
        return scores


def generate(model, prompt_ids: Sequence[int], config, cache=None, seed: int = 0,
             streamer=None) -> Tuple[List[int], object]:
    """Read ``prompt_ids`` and generate as ``config`` says (``sampling_config``), through the
    model's ``generate()`` for a new stream, or its ``continue_stream`` when ``cache`` (an
    MMRecCache that has read everything before ``prompt_ids``) is given; the text goes to
    ``streamer`` as it comes. Sampling draws from torch's random generator seeded with ``seed``
    (the caller's random state is restored after).

    Returns (the generated ids, the cache after the prompt and every generated token). generate()
    only predicts its last token; it is fed here too, so the cache has read all that was
    generated, an EOS included, and the next turn continues from exactly there.
    Non-finite logits raise ValueError naming the likely cause."""
    if not prompt_ids:
        raise ValueError("the prompt has no tokens")
    ids = torch.tensor([list(prompt_ids)], device=model.device)
    check = _FiniteLogitsCheck()
    kwargs = dict(attention_mask=torch.ones_like(ids), generation_config=config,
                  logits_processor=LogitsProcessorList([check]), streamer=streamer)
    cuda = [model.device.index if model.device.index is not None else torch.cuda.current_device()] \
        if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(seed)
        try:
            out = model.generate(ids, **kwargs) if cache is None else model.continue_stream(ids, cache, **kwargs)
        except _NonFiniteLogits as stop:
            raise ValueError(_non_finite_message(model, stop.step)) from None
        new = out.sequences[0, ids.shape[1]:]
        state = model(new[-1:].view(1, 1), cache=out.cache, use_cache=True).cache
    return new.tolist(), state


def _non_finite_message(model, step: int) -> str:
    where = f"the model produced non-finite logits (NaN or inf) at generated token {step}"
    named = dict(model.named_parameters())
    named.update(model.named_buffers())
    broken = [name for name, t in named.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if broken:
        listed = ", ".join(broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
        return f"{where}: its weights hold NaN or inf ({listed}); the model folder is broken"
    return f"{where}, although its weights and the state it started from are finite: a value overflowed inside the model"


# ------------------------------------------------------------------ prompts


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


def turn_text(prompt: str, separator: str, last_token: Optional[int], eos_token_id: Union[int, Iterable[int], None]) -> str:
    """The text a continued stream reads for its next turn: ``separator`` then ``prompt``, or the
    prompt alone when the stream's last token was an EOS (a new document starts there, as after
    every EOS in training)."""
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    return prompt if last_token in eos else separator + prompt


# ------------------------------------------------------------------ the state file


def model_fingerprint(model, folder: str | os.PathLike) -> str:
    """What identifies a model for its state files: the SHA-256 of the folder's config.json (its
    JSON object, keys sorted, less the entries that say where and by which transformers version it
    was written) and of every tensor of the loaded model (name, dtype, shape and bytes, by name).
    Two models differ in it if any weight or any config field differs, whatever their shapes;
    a copied or moved folder keeps it. The cost is one pass over the weights."""
    digest = hashlib.sha256()
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    config = {k: v for k, v in config.items() if k not in _NOT_THE_MODEL}
    digest.update(json.dumps(config, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1).cpu().contiguous()
        digest.update(f"\n{name} {flat.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def load_state(model, path: str | os.PathLike, fingerprint: str) -> Tuple[object, Optional[int]]:
    """(the MMRecCache saved in ``path`` by ``save_state``, the last token it read). Refused, with
    the file left as it is, unless ``fingerprint`` (``model_fingerprint`` of ``model``) is the one
    the file records, the state fits the model, holds one stream and only finite values."""
    from mm_rec.cache import MMRecCache

    where = f"--state {os.fspath(path)}"
    try:
        meta = MMRecCache.load_metadata(path)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    recorded = meta.get(FINGERPRINT_KEY)
    if recorded is None:
        raise ValueError(f"{where}: the file records no model, so it cannot be checked against this one (not a state "
                         f"written by generate.py); it is left unchanged: name another file to start a new stream")
    if recorded != fingerprint:
        raise ValueError(f"{where}: written by another model ({meta.get(FOLDER_KEY, 'unknown folder')}, fingerprint "
                         f"{recorded[:16]}), not by this one (fingerprint {fingerprint[:16]}); it is left unchanged: "
                         f"name another file to start a new stream")
    try:
        cache = model_module(model).MMRecCache.load(path, config=model.config, device=model.device)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if cache.batch_size != 1:
        raise ValueError(f"{where}: holds {cache.batch_size} streams, expected 1")
    for i, layer in enumerate(cache.layers):
        for name, t in layer.tensors().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{where}: layer {i} {name} holds NaN or inf, a broken state; it is left unchanged: "
                                 f"name another file to start a new stream")
    last = meta.get(LAST_TOKEN_KEY)
    return cache, (int(last) if last is not None and last.isdigit() else None)


def save_state(cache, path: str | os.PathLike, fingerprint: str, folder: str | os.PathLike, last_token: int) -> None:
    """Write ``cache`` to ``path`` (atomically, with the mode of any new file) with the model's
    fingerprint, its folder and the last token the state read. Written by the package's
    MMRecCache.save, whatever copy of the code the model was loaded with: a folder saved by an
    older version carries a cache.py that records no model."""
    from mm_rec.cache import MMRecCache

    MMRecCache(cache.layers, cache.position).save(path, metadata={
        FINGERPRINT_KEY: fingerprint, FOLDER_KEY: str(Path(folder).resolve()), LAST_TOKEN_KEY: str(int(last_token))})
