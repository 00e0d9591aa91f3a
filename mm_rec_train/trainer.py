"""Training a run with transformers' Trainer: checkpoints that appear whole, the final evaluation, the run folder."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from mm_rec.conv import is_conv_kernel

from .cli import quiet_weight_loading
from .data import blocks, load_corpus, load_tokenizer, split_corpus, train_tokenizer
from .evaluation import bits_per_byte, evaluate_rows, predicted_bytes
from .generation import generate, prompt_ids, sampling_config
from .plots import FINAL, loss_history, save_loss_curve
from .runs import (
    CHECKPOINTS,
    KEEP_CHECKPOINTS,
    RESULTS,
    STAGING,
    RunConfig,
    atomic_write_text,
    checkpoint_step,
    last_complete_checkpoint,
    remove_run_files,
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
                # Trainer recorded the best checkpoint under the staging folder (or not at all): the path it will have.
                best = self.state.best_global_step and str(checkpoints / f"checkpoint-{self.state.best_global_step}")
                if best and self.state.best_model_checkpoint != best:
                    self.state.best_model_checkpoint = best
                    self.state.save_to_json(str(staging / name / "trainer_state.json"))
                final = checkpoints / name
                if final.exists():
                    shutil.rmtree(final)
                os.replace(staging / name, final)
                shutil.rmtree(staging, ignore_errors=True)
                complete = sorted((s, p) for p in checkpoints.iterdir() if (s := checkpoint_step(p)) is not None)
                for step, old in complete[:-KEEP_CHECKPOINTS]:
                    if step != self.state.best_global_step:  # the best weights stay, see KeepTheBest
                        shutil.rmtree(old)

        def _issue_warnings_after_load(self, load_result):
            # save_pretrained leaves out the weights the model declares tied (_tied_weights_keys: lm_head.weight
            # is the embedding), so a checkpoint lacks them by design; Trainer only knows _keys_to_ignore_on_save
            # and would warn about them. Re-tie them, and warn about anything else.
            tied = set(getattr(self.model, "all_tied_weights_keys", None) or ())
            missing = [key for key in load_result.missing_keys if key not in tied]
            if len(missing) < len(load_result.missing_keys):
                self.model.tie_weights()
            super()._issue_warnings_after_load(type(load_result)(missing, list(load_result.unexpected_keys)))

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


class _TrainingDone(Exception):
    """Raised when training would begin at max_steps: a run resumed from its last step only finishes."""


def _run_flow(log: Callable[[str], None]):
    """The callback that keeps the best weights and never trains past the run's end (see KeepTheBest)."""
    from transformers import TrainerCallback

    class KeepTheBest(TrainerCallback):
        """Every periodic evaluation that lowers the held-out loss (Trainer's ``best_metric``, with
        ``metric_for_best_model="loss"``) is saved as a checkpoint, which the rotation keeps, so the
        final model can be the best one; the log says when the held-out loss turns up. Trainer
        evaluates the last step too, so it competes. The best step is in trainer_state.json, so it
        survives a resume.

        A run resumed from a checkpoint at max_steps (killed during its final save or evaluation)
        trains no more: Trainer would take one more step before looking at max_steps. Training
        begins once the checkpoint's state, weights and optimizer are loaded: the end starts there."""

        def on_train_begin(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                raise _TrainingDone

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            loss = (metrics or {}).get("eval_loss")
            if loss is None:
                return control
            best, best_step = state.best_metric, state.best_global_step  # Trainer updates them after this call
            if best is None or loss < best:
                control.should_save = True
            elif loss > best:
                steps = [entry["step"] for entry in state.log_history if "eval_loss" in entry]
                if len(steps) >= 2 and steps[-2] == best_step:  # the previous evaluation was the best: it turns up
                    log(f"held-out loss rose from {best:.4f} at step {best_step} to {loss:.4f} at step "
                        f"{state.global_step}; keeping step {best_step}'s weights")
            return control

    return KeepTheBest()


def _log_lines(log: Callable[[str], None]):
    """The training log as whole lines, for a log that is not a terminal (no progress bar)."""
    from transformers import TrainerCallback

    class LogLines(TrainerCallback):
        """One line per logging step, evaluation and the end of training."""

        started = time.time()

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero:
                return
            logs = {k: v for k, v in (logs or {}).items() if k != "total_flos"}
            where = f"step {state.global_step}/{state.max_steps}, {_duration(time.time() - self.started)}"
            if "loss" in logs:
                text = f"training loss {logs['loss']:.4f}"
                text += f", learning rate {logs['learning_rate']:.3g}" if "learning_rate" in logs else ""
                text += f", gradient norm {logs['grad_norm']:.3g}" if "grad_norm" in logs else ""
            elif "eval_loss" in logs:
                text = f"held-out loss {logs['eval_loss']:.4f}"
                text += f", perplexity {logs['eval_perplexity']:.2f}" if "eval_perplexity" in logs else ""
                text += f", bits per byte {logs['eval_bits_per_byte']:.4f}" if "eval_bits_per_byte" in logs else ""
            elif "train_runtime" in logs:
                text = f"training done in {_duration(logs['train_runtime'])}"
                text += f", mean training loss {logs['train_loss']:.4f}" if "train_loss" in logs else ""
            else:
                text = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items())
            log(f"{where}: {text}")

    return LogLines()


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


class TrainingInterrupted(Exception):
    """Ctrl-C during training; the message says how to resume."""


def run_data(run: RunConfig, tokenizer=None, log: Callable[[str], None] = print):
    """(tokenizer, train texts, held-out texts, corpus description) of ``run``. With ``tokenizer``
    (a saved run's), it is reused; else it is loaded from ``run.tokenizer`` or trained."""
    corpus = load_corpus(run.data, run.text_field, run.max_works, log=log)
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
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, PrinterCallback, TrainingArguments, set_seed

    from mm_rec.configuration_mmrec import MMRecConfig
    from mm_rec.modeling_mmrec import MMRecForCausalLM

    started = time.time()
    checkpoints = output_dir / CHECKPOINTS
    quiet_weight_loading()
    # A log that is not a terminal (a file, a pipe) gets whole lines, no progress bars that redraw.
    terminal = sys.stderr.isatty()
    if not terminal:
        import datasets

        datasets.disable_progress_bars()
    # Sets up the process group of `accelerate launch`; one process on its own otherwise.
    args = TrainingArguments(
        output_dir=str(checkpoints), max_steps=run.max_steps, per_device_train_batch_size=run.batch_size,
        per_device_eval_batch_size=run.batch_size, learning_rate=run.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=0.05, weight_decay=0.1, max_grad_norm=1.0, eval_strategy="steps", eval_steps=run.eval_steps,
        logging_steps=run.logging_steps or max(1, min(10, run.eval_steps)), save_strategy="steps",
        save_steps=run.save_steps, save_total_limit=None, bf16=run.bf16, use_cpu=not torch.cuda.is_available(),
        seed=run.seed, report_to="none", dataloader_num_workers=0, dataloader_pin_memory=False,
        ddp_find_unused_parameters=False,  # every parameter gets a gradient every step
        metric_for_best_model="loss", greater_is_better=False,  # the best step, for KeepTheBest
        disable_tqdm=not terminal, torch_compile=run.compile,
        torch_compile_mode=run.compile_mode if run.compile else None,
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
        finishing = "; its training is done, finishing the run (model, evaluation, results)" if done == run.max_steps else ""
        log(f"resuming from {checkpoint} (step {done}){finishing}" if checkpoint
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
                remove_run_files(output_dir)  # train.py's own files only (check_output_dir refused any other)
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
        callbacks=[_run_flow(log)],
    )
    if not terminal:
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(_log_lines(log))
    trainer.eval_bytes_per_token = _bytes_per_token(periodic["input_ids"], tokenizer)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not trainer.is_fsdp_enabled:
        log("the launch configuration asks for FSDP, which accelerate runs on GPUs only: this run is plain DDP")
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except _TrainingDone:  # resumed at max_steps: the weights and state are the checkpoint's
        pass
    except KeyboardInterrupt:
        last = last_complete_checkpoint(checkpoints, log=_quiet)
        where = (f"{last.name} is the last complete checkpoint" if last
                 else "no checkpoint was saved yet (resuming starts at step 0)")
        raise TrainingInterrupted(f"interrupted at step {trainer.state.global_step}; {where}. "
                                  f"Resume with: {resume_command}") from None
    try:
        return _finish(run, output_dir, trainer, config, tokenizer, train_texts, held_out, held_rows, description,
                       started, log)
    except KeyboardInterrupt:
        raise TrainingInterrupted(f"interrupted while finishing the run; its training is done and saved in "
                                  f"{checkpoints}. Finish it with: {resume_command}") from None


def _kept_step(trainer, checkpoints: Path, log: Callable[[str], None]) -> int:
    """The step whose weights the run keeps: the lowest periodic held-out loss (Trainer's
    best_global_step), if its checkpoint is there; else the last step."""
    steps, best = trainer.state.global_step, trainer.state.best_global_step
    if not best or best == steps:
        return steps
    if not (checkpoints / f"checkpoint-{best}").is_dir():
        log(f"the best held-out loss was at step {best}, whose checkpoint is gone: keeping the last step's weights")
        return steps
    return best


def _finish(run: RunConfig, output_dir: Path, trainer, config, tokenizer, train_texts, held_out, held_rows,
            description: str, started: float, log: Callable[[str], None]) -> Optional[dict]:
    """The end of a run, after its last step: the final model (the best step's weights), its full
    held-out evaluation, the sample, results.json, the card and the plot. Trains nothing, so a
    run killed here finishes on --resume from its last checkpoint."""
    from mm_rec.hub import write_model_card
    from mm_rec.modeling_mmrec import MMRecForCausalLM

    args, model = trainer.args, trainer.model
    checkpoints = output_dir / CHECKPOINTS
    main = args.process_index == 0
    steps = trainer.state.global_step
    periodic = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e and "step" in e}
    kept = _kept_step(trainer, checkpoints, log)
    if kept != steps:
        log(f"keeping step {kept}'s weights: periodic held-out loss {periodic.get(kept, trainer.state.best_metric):.4f} "
            f"at step {kept}" + (f", {periodic[steps]:.4f} at the last step {steps}" if steps in periodic else ""))
        trainer._load_from_checkpoint(str(checkpoints / f"checkpoint-{kept}"))  # every process (FSDP shards)
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
    final = evaluate_rows(model, held_rows["input_ids"], tokenizer, run.batch_size, progress=sys.stderr.isatty(),
                          description="final evaluation")
    trainer.state.log_history.append({"eval_loss": final["loss"], "step": kept, FINAL: True})
    log(f"held-out loss {final['loss']:.4f}, perplexity {final['perplexity']:.2f}, "
        f"bits per byte {final['bits_per_byte']:.4f} ({final['tokens']} tokens, {final['bytes']} bytes)")

    model.eval()
    prompt = run.prompt if run.prompt is not None else ("ROMEO.\n" if run.data is None else "")
    ids = prompt_ids(tokenizer, prompt, continuing=False)
    new, _ = generate(model, ids, sampling_config(model, tokenizer, max_new_tokens=120, temperature=0.8, top_k=50),
                      seed=run.seed)
    sample = tokenizer.decode(ids + new, skip_special_tokens=True)

    train_losses = loss_history(trainer.state.log_history)["train"]
    summary = {
        "preset": run.preset, "data": description, "training documents": len(train_texts),
        "held-out documents": len(held_out), "optimizer steps": steps,
        "training tokens seen": steps * run.batch_size * run.block_size,
        "last training loss": train_losses[-1][1] if train_losses else None,
        "kept step": kept, "periodic held-out loss of the kept step": periodic.get(kept),
        "held-out loss": final["loss"], "held-out perplexity": final["perplexity"],
        "held-out bits per byte": final["bits_per_byte"], "held-out tokens": final["tokens"],
        "held-out bytes": final["bytes"], "parameters": model.num_parameters(), "vocab size": len(tokenizer),
        "processes": args.world_size, "threads": torch.get_num_threads(), "mixed precision": args.mixed_precision,
        "minutes (this session)": (time.time() - started) / 60, "sample": sample,
    }
    held_names = list(held_out)
    write_model_card(output_dir, config, model.num_parameters(), metrics={
        "held-out loss (nats/token)": final["loss"], "held-out perplexity": final["perplexity"],
        "held-out bits per byte": final["bits_per_byte"], "optimizer steps": steps, "kept step": kept}, training=(
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
