"""Train MM-Rec on the bundled Shakespeare corpus and save a self-contained Hub checkpoint.

    python scripts/train.py --preset laptop --output-dir runs/laptop     # ~5-10 min on 2 CPU cores

Trains a byte-level BPE tokenizer and a small MM-Rec with transformers.Trainer, reports the
validation loss and perplexity, saves model + tokenizer + model card to --output-dir (load it
with AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)), prints a generated
sample and writes it to sample.txt, and plots the loss curve to loss_curve.png.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments, set_seed

from mm_rec import MMRecConfig, MMRecForCausalLM
from mm_rec.data import lm_datasets, load_shakespeare, split_works, train_tokenizer
from mm_rec.hub import save_loss_curve, write_model_card

# model: MMRecConfig fields; train: run length and batch; eval_blocks: validation rows per evaluation.
PRESETS = {
    "laptop": dict(
        vocab_size=2048, block_size=128, batch_size=16, max_steps=400, learning_rate=3e-3, eval_steps=100, eval_blocks=128,
        model=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, memory_block_size=16,
                   memory_segment_length=128, num_memory_slots=8),
    ),
    "small": dict(
        vocab_size=4096, block_size=256, batch_size=32, max_steps=4000, learning_rate=2e-3, eval_steps=500, eval_blocks=512,
        model=dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, memory_block_size=32,
                   memory_segment_length=256, num_memory_slots=16),
    ),
    "base": dict(
        vocab_size=8192, block_size=512, batch_size=32, max_steps=10000, learning_rate=1e-3, eval_steps=1000, eval_blocks=None,
        model=dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, memory_block_size=32,
                   memory_segment_length=512, num_memory_slots=16, dropout=0.1),
    ),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="laptop")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--max-steps", type=int, help="override the preset's optimizer steps")
    parser.add_argument("--batch-size", type=int, help="override the preset's per-device batch size")
    parser.add_argument("--learning-rate", type=float, help="override the preset's peak learning rate")
    parser.add_argument("--max-works", type=int, help="use only the first N works of the corpus (quick runs)")
    parser.add_argument("--validation-fraction", type=float, default=0.05, help="share of whole works held out")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU or a GPU that supports it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default="ROMEO.\n", help="prompt of the generated sample")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir/checkpoints")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    preset = PRESETS[args.preset]
    set_seed(args.seed)
    started = time.time()

    train_texts, validation_texts = split_works(load_shakespeare(args.max_works), args.validation_fraction)
    tokenizer = train_tokenizer(train_texts.values(), vocab_size=preset["vocab_size"])
    splits = lm_datasets(tokenizer, train_texts, validation_texts, preset["block_size"])
    validation = splits["validation"]
    if preset["eval_blocks"] is not None:
        validation = validation.select(range(min(preset["eval_blocks"], len(validation))))
    print(f"corpus: {len(train_texts)} works for training, {len(validation_texts)} held out ({', '.join(validation_texts)}); "
          f"{len(splits['train'])} x {preset['block_size']} training tokens, tokenizer of {len(tokenizer)}")

    config = MMRecConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **preset["model"])
    model = MMRecForCausalLM(config)
    print(f"model: {model.num_parameters() / 1e6:.2f}M parameters")

    training_args = TrainingArguments(
        output_dir=str(args.output_dir / "checkpoints"),
        max_steps=args.max_steps or preset["max_steps"],
        per_device_train_batch_size=args.batch_size or preset["batch_size"],
        per_device_eval_batch_size=args.batch_size or preset["batch_size"],
        learning_rate=args.learning_rate or preset["learning_rate"],
        lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.1, max_grad_norm=1.0,
        eval_strategy="steps", eval_steps=preset["eval_steps"], logging_steps=10,
        save_strategy="steps", save_steps=preset["eval_steps"], save_total_limit=1,
        bf16=args.bf16, seed=args.seed, report_to="none", dataloader_num_workers=0, dataloader_pin_memory=False,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=splits["train"], eval_dataset=validation,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    metrics = trainer.evaluate()
    loss = metrics["eval_loss"]
    results = {"validation loss": loss, "validation perplexity": math.exp(loss),
               "optimizer steps": trainer.state.global_step, "minutes": (time.time() - started) / 60}
    print(f"validation loss {loss:.4f}, perplexity {math.exp(loss):.2f}")

    trainer.save_model(str(args.output_dir))  # weights, config, code, card (save_pretrained) and tokenizer
    write_model_card(
        args.output_dir, config, model.num_parameters(), metrics=results,
        training=(f"Trained with `scripts/train.py --preset {args.preset}` on the Shakespeare corpus "
                  f"(`shksprdata`, {len(train_texts)} works; validation: {', '.join(validation_texts)}), "
                  f"{training_args.max_steps} steps of {training_args.per_device_train_batch_size} x "
                  f"{preset['block_size']} tokens, byte-level BPE tokenizer of {len(tokenizer)} tokens."),
    )
    save_loss_curve(trainer.state.log_history, args.output_dir / "loss_curve.png", title=f"MM-Rec, preset {args.preset}")
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    model.eval()
    inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=120, do_sample=True, top_k=50, temperature=0.8)
    sample = tokenizer.decode(generated[0], skip_special_tokens=True)
    (args.output_dir / "sample.txt").write_text(sample + "\n")
    print(f"sample:\n{sample}\n\nsaved to {args.output_dir} in {results['minutes']:.1f} min")


if __name__ == "__main__":
    main()
