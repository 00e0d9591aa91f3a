"""Shared by the Hugging Face tests and the accelerate worker: a tiny MM-Rec, a slice of the
bundled corpus as LM blocks, and a CPU Trainer with the arguments every test uses."""

from __future__ import annotations

import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from mm_rec import MMRecConfig, MMRecForCausalLM
from mm_rec.data import byte_level_tokenizer, load_shakespeare, token_blocks


def tiny_config(tokenizer, **overrides) -> MMRecConfig:
    """2 layers of width 32; memory blocks of 4 and segments of 16, so short rows cross both."""
    fields = dict(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        memory_block_size=4, memory_segment_length=16, num_memory_slots=4,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    fields.update(overrides)
    return MMRecConfig(**fields)


def tiny_model(tokenizer, seed: int = 0, **overrides) -> MMRecForCausalLM:
    torch.manual_seed(seed)
    return MMRecForCausalLM(tiny_config(tokenizer, **overrides))


def corpus_blocks(tokenizer=None, block_size: int = 64, rows: int = 256):
    """The first ``rows`` blocks of the first two works, byte-level tokenized by default."""
    tokenizer = tokenizer or byte_level_tokenizer()
    texts = load_shakespeare(max_works=2).values()
    return token_blocks(texts, tokenizer, block_size).select(range(rows))


def cpu_trainer(model, tokenizer, train_dataset, output_dir, eval_dataset=None, **overrides) -> Trainer:
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


def step_losses(trainer: Trainer) -> dict:
    """{step: training loss} from the trainer's log history (logging_steps=1)."""
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
