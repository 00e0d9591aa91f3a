"""The model card of an MM-Rec folder (README.md) and the LoRA target modules it names.

A folder written by ``model.save_pretrained(path)`` (plus ``tokenizer.save_pretrained(path)``)
is self-contained: safetensors weights, ``config.json`` with ``auto_map``,
``generation_config.json``, this package's modules copied flat (``modeling_mmrec.py`` and
every module it imports relatively, this one included), and a model card ``README.md``.
Anywhere transformers is installed, without this package:

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    pipeline("text-generation", model=path, trust_remote_code=True)

LoRA (PEFT): ``LoraConfig(task_type="CAUSAL_LM", target_modules=LORA_TARGET_MODULES)`` adapts
every linear map of a block: the fused HEM projection ``hem.W_fused`` (q, k, v, z, gate and
the decay input p in one matrix), the readout ``W_o`` and the FFN ``ffn.up`` / ``ffn.down`` (and
``ffn.gate`` with ``ffn_gate``).
With ``use_hem=False`` target ``LORA_TARGET_MODULES_UNFUSED`` instead. The decay generator
``mdi.W_E``, the state gate ``state_gate.W_g`` and the memory slots are left out on purpose:
they set the memory timescales, which a small adapter should not move.

This module is copied into every checkpoint (``save_pretrained`` writes the card), so it
imports only what transformers itself needs.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Optional

from huggingface_hub import metadata_load

logger = logging.getLogger(__name__)

LORA_TARGET_MODULES = ["W_fused", "W_o", "gate", "up", "down"]
LORA_TARGET_MODULES_UNFUSED = ["hem.W_q", "hem.W_k", "hem.W_v", "hem.W_z", "hem.W_g", "hem.W_og", "hem.W_p", "W_o", "gate",
                               "up", "down"]

CARD_NAME = "README.md"
CARD_TAGS = ["custom_code", "mm-rec"]

_CARD_HEADER = (
    "---\n"
    "library_name: transformers\n"
    "pipeline_tag: text-generation\n"
    "tags:\n" + "".join(f"- {tag}\n" for tag in CARD_TAGS) + "---\n"
)

_CONFIG_ROWS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "ffn_gate", "pe_dim", "decay_init_min", "decay_init_max", "memory_block_size", "memory_segment_length",
    "num_memory_slots", "memory_decay", "memory_levels", "recurrence_gate", "output_gate", "gate_memory",
    "short_conv_size", "short_conv_inputs", "use_hem",
)


def is_our_card(path: str | os.PathLike) -> bool:
    """True if ``path`` is a model card written by ``write_model_card`` (its YAML header has
    ``library_name: transformers`` and the ``mm-rec`` tag)."""
    metadata = metadata_load(path) or {}
    return metadata.get("library_name") == "transformers" and "mm-rec" in (metadata.get("tags") or [])


def model_card(config, num_parameters: Optional[int] = None, metrics: Optional[Mapping[str, float]] = None,
               training: Optional[str] = None) -> str:
    """The text of the model card: YAML header, what the model is, how to load and fine-tune
    it, its configuration, and (when given) evaluation ``metrics`` and a ``training`` note."""
    size = f" ({num_parameters / 1e6:.2f}M parameters)" if num_parameters else ""
    lines = [
        _CARD_HEADER,
        f"# MM-Rec{size}",
        "",
        "MM-Rec (Multi-Memory Recurrence) is a causal language model whose token mixer is a gated,",
        "data-dependent linear recurrence (a parallel scan) plus a small attention over a hierarchical",
        "memory of block summaries and persistent memory slots. Decoding a token costs the same",
        "however long the context: the state is a fixed-size `MMRecCache`, not a growing KV cache.",
        "",
        "## Usage",
        "",
        "The model code is in this folder; load it with `trust_remote_code=True`:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)",
        "tokenizer = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)",
        'inputs = tokenizer("To be, or not to be", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=40, do_sample=True)[0]))",
        "```",
        "",
        "Fine-tune with LoRA (PEFT):",
        "",
        "```python",
        "from peft import LoraConfig, get_peft_model",
        "",
        f"target_modules = {LORA_TARGET_MODULES if getattr(config, 'use_hem', True) else LORA_TARGET_MODULES_UNFUSED}",
        'model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=target_modules))',
        "```",
        "",
        "## Configuration",
        "",
        "| field | value |",
        "|---|---|",
        *(f"| `{name}` | {getattr(config, name)} |" for name in _CONFIG_ROWS if hasattr(config, name)),
    ]
    if metrics:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {value} |"
                  for name, value in metrics.items()]
    if training:
        lines += ["", "## Training", "", training]
    return "\n".join(lines) + "\n"


def write_model_card(save_directory: str | os.PathLike, config, num_parameters: Optional[int] = None,
                     metrics: Optional[Mapping[str, float]] = None, training: Optional[str] = None) -> bool:
    """Write ``README.md`` into ``save_directory``. A README that is not ours (see
    ``is_our_card``) is the user's card: it is kept, and this returns False."""
    path = os.path.join(os.fspath(save_directory), CARD_NAME)
    if os.path.exists(path) and not is_our_card(path):
        logger.warning("%s exists and was not written by mm_rec: keeping it, not writing the MM-Rec model card", path)
        return False
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(model_card(config, num_parameters, metrics, training))
    return True
