"""Training a run with transformers' Trainer: checkpoints that appear whole, the final evaluation, the run folder."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from mm_rec.conv import is_conv_kernel

from .data import blocks, load_corpus, load_tokenizer, split_corpus, train_tokenizer
from .evaluation import bits_per_byte, evaluate_rows, predicted_bytes
from .generation import generate_tokens, prompt_ids
from .plots import loss_history, save_loss_curve
from .runs import (
    CHECKPOINTS,
    KEEP_CHECKPOINTS,
    RESULTS,
    STAGING,
    RunConfig,
    atomic_write_text,
    checkpoint_step,
    last_complete_checkpoint,
)


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether weight decay applies, for the Trainer and the quality study alike: to matrices
    (embedding included), not to vectors (norms, biases) nor to the short convolution's kernel
    (``conv.is_conv_kernel``)."""
    return param.ndim >= 2 and not is_conv_kernel(name)


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
                complete = sorted((s, p) for p in checkpoints.iterdir() if (s := checkpoint_step(p)) is not None)
                for _, old in complete[:-KEEP_CHECKPOINTS]:
                    shutil.rmtree(old)

        def evaluation_loop(self, *args, **kwargs):
            output = super().evaluation_loop(*args, **kwargs)
            prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
            loss = output.metrics.get(f"{prefix}_loss")
            if loss is not None:
                output.metrics[f"{prefix}_perplexity"] = math.exp(min(loss, 50.0))
                if self.eval_bytes_per_token:
                    output.metrics[f"{prefix}_bits_per_byte"] = bits_per_byte(loss, self.eval_bytes_per_token)
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

    from mm_rec.configuration_mmrec import MMRecConfig
    from mm_rec.hub import write_model_card
    from mm_rec.modeling_mmrec import MMRecForCausalLM

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
        log(f"resuming from {checkpoint} (step {done})" if checkpoint
            else "resuming: no complete checkpoint yet, starting at step 0")
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
        where = (f"{last.name} is the last complete checkpoint" if last
                 else "no checkpoint was saved yet (resuming starts at step 0)")
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
    return predicted_bytes(rows, tokenizer) / sum(len(r) - 1 for r in rows)
