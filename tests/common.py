"""Shared by the tests (through conftest.py's fixtures) and the scripts they start
(tests/accelerate_worker.py): the one tiny MM-Rec config, seeded random inputs, a slice of the
bundled corpus as LM blocks, a CPU Trainer, and a fresh interpreter to run a script in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import torch.nn.functional as F

from mm_rec import MMRecConfig, MMRecForCausalLM
from mm_rec.conv import conv_channels

REPO = Path(__file__).resolve().parents[1]
VOCAB = 64


# The architecture MMRecConfig's defaults had before the quality study's choices became them (at
# tiny_config's width): no output gate (nor its cover of the memory read), a GELU FFN, a quarter-width
# decay input with slow initial decays, no convolution. Tests run it beside the defaults so both stay exact.
SEED_DESIGN = dict(output_gate=False, gate_memory=False, ffn_gate=False, hidden_act="gelu", pe_dim=8,
                   decay_init_max=0.1, short_conv_size=0)


def tiny_config(**overrides) -> MMRecConfig:
    """2 layers of width 32 with 2 heads; memory blocks of 4 tokens and segments of 16 (4 blocks),
    4 slots, so rows of a few dozen tokens cross blocks, segment folds and both."""
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, memory_block_size=4,
                  memory_segment_length=16, num_memory_slots=4, kernel_backend="torch", eos_token_id=1, pad_token_id=0)
    fields.update(overrides)
    if "scan_backend" in fields:  # the backend switch's former name overrides the pinned "torch"
        fields["kernel_backend"] = fields.pop("scan_backend")
    return MMRecConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> MMRecForCausalLM:
    """``MMRecForCausalLM(tiny_config(**overrides))`` in eval mode, its weights drawn after
    ``torch.manual_seed(seed)`` (two calls with one seed give the same weights); a short
    convolution's kernel is drawn too (``randomize_short_conv_``)."""
    torch.manual_seed(seed)
    return randomize_short_conv_(MMRecForCausalLM(tiny_config(**overrides)).eval())


def randomize_short_conv_(model: MMRecForCausalLM) -> MMRecForCausalLM:
    """Draw every short convolution kernel N(0, 1), all C rows (d on u; z, g~ and p's with
    short_conv_inputs="recurrence"): its init, the identity, would let a test pass that reads
    padding or another document into the window, or mixes up the channels' order."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("short_conv.weight"):
                param.normal_()
                assert param.shape[0] == conv_channels(model.config), name
    return model


def random_ids(shape, seed: int = 0, vocab_size: int = VOCAB) -> torch.Tensor:
    """Token ids in [2, vocab_size): 0 and 1 are tiny_config's pad and eos."""
    return torch.randint(2, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def document_positions(starts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """position_ids [B, T] of packed rows with padding: each document (``starts`` [B, T] bool marks
    its first column) counts its real tokens (``mask``) from 0; a padded position gets its previous
    real token's position (never read)."""
    document = starts.long().cumsum(1)
    count = mask.long().cumsum(1)
    before = torch.zeros_like(count)  # real tokens before each column's document
    for b in range(starts.shape[0]):
        for t in starts[b].nonzero()[:, 0].tolist():
            before[b, document[b] == document[b, t]] = count[b, t] - mask[b, t]
    return (count - before - 1).clamp(min=0)


def random_log_gamma(shape, generator=None, dtype=torch.float64) -> torch.Tensor:
    """Log-decays spread over (0, 1): logsigmoid of N(1, 2^2)."""
    return F.logsigmoid(1.0 + 2.0 * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)


def fresh_process(script: str, *args, tmp_path, stdin=None, timeout=300) -> dict:
    """Run ``script`` in a new interpreter (this worktree first on the path, offline) and return
    the JSON object it prints last."""
    path = [str(REPO), str(REPO / "tests"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=timeout, stdin=stdin)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    result["_output"] = run.stdout + run.stderr
    return result


def tokenizer_fields(tokenizer) -> dict:
    """The tiny_config overrides for a model of ``tokenizer``'s vocabulary and special tokens."""
    return dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def corpus_blocks(tokenizer=None, block_size: int = 64, rows: int = 256):
    """The first ``rows`` blocks of the first two works, byte-level tokenized by default."""
    from mm_rec_train.data import byte_level_tokenizer, load_shakespeare, token_blocks

    tokenizer = tokenizer or byte_level_tokenizer()
    texts = load_shakespeare(max_works=2).values()
    return token_blocks(texts, tokenizer, block_size).select(range(rows))


def cpu_trainer(model, tokenizer, train_dataset, output_dir, eval_dataset=None, **overrides):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    args = dict(
        output_dir=str(output_dir), use_cpu=True, report_to="none", disable_tqdm=True, seed=0,
        per_device_train_batch_size=8, per_device_eval_batch_size=8, learning_rate=3e-3, warmup_steps=0,
        logging_steps=1, save_strategy="no", dataloader_num_workers=0, ddp_find_unused_parameters=False,
    )
    args.update(overrides)
    return Trainer(
        model=model, args=TrainingArguments(**args), train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer,
    )


def step_losses(trainer) -> dict:
    """{step: training loss} from the trainer's log history (logging_steps=1)."""
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
