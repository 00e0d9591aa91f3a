"""Train MM-Rec on your text or the bundled Shakespeare corpus; save a self-contained model.

    .venv/bin/python scripts/train.py --preset laptop --output-dir runs/laptop        # the main job, CPU
    .venv/bin/python scripts/train.py --data my_texts/ --output-dir runs/mine         # .txt/.md files, .jsonl
    .venv/bin/python scripts/train.py --data notes.jsonl --text-field body --output-dir runs/notes
    .venv/bin/python scripts/train.py --preset gpu-130m --data wikitext_saved/ --output-dir runs/big
    .venv/bin/python scripts/train.py --output-dir runs/laptop --resume               # after Ctrl-C
    .venv/bin/accelerate launch --config_file configs/ddp.yaml scripts/train.py --preset gpu-130m --output-dir runs/ddp

The output folder gets the model (load it with AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)): the weights of the step with the lowest periodic held-out loss, which
results.json names ("kept step"). Also its tokenizer, generation config and model card,
results.json, loss_curve.png, sample.txt, run_config.json and checkpoints/. A folder that already
holds anything is refused unless --resume (continue it: same data, tokenizer and model; a run
stopped after its last step only finishes) or --overwrite (replace a run written by this
script: only the files it writes are deleted, and a folder holding others is refused).

Under `accelerate launch` (DDP or FSDP, configs/) it runs unchanged: --batch-size rows per step
are split between the processes, and the main process alone writes the files.
"""

from __future__ import annotations

import argparse
import os
import sys

# Only the light modules before the arguments are parsed: --help and a bad flag answer at once.
from mm_rec_train import cli, runs
from mm_rec_train.cli import ArgumentParser, positive_float, positive_int
from mm_rec_train.runs import PRESETS


def parse_args(argv):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="folder for the run (new or empty, unless --resume/--overwrite)")
    parser.add_argument("--preset", choices=list(PRESETS), help="model and run size (default: laptop)")
    parser.add_argument("--data", nargs="+", help="text files, folders of them, .jsonl files, a saved `datasets` folder, "
                        "or a `datasets` name[:config] (default: the bundled Shakespeare corpus)")
    parser.add_argument("--text-field", help="the text field of .jsonl records and datasets (default: text)")
    parser.add_argument("--max-works", type=positive_int, help="use only the first N documents (quick runs)")
    parser.add_argument("--validation-fraction", type=float, help="share of whole documents held out (default 0.05)")
    parser.add_argument("--tokenizer", help="an AutoTokenizer folder (default: train a byte-level BPE on the data)")
    parser.add_argument("--vocab-size", type=positive_int, help="size of the BPE tokenizer trained here")
    parser.add_argument("--block-size", type=positive_int, help="tokens per training row")
    parser.add_argument("--max-steps", type=positive_int, help="optimizer steps (the run's total, also on --resume)")
    parser.add_argument("--batch-size", type=positive_int, help="rows per optimizer step, over all processes")
    parser.add_argument("--learning-rate", type=positive_float, help="peak learning rate (cosine schedule)")
    parser.add_argument("--eval-steps", type=positive_int, help="evaluate on held-out text every N steps")
    parser.add_argument("--eval-blocks", type=positive_int,
                        help="held-out rows per periodic evaluation (the final one reads all)")
    parser.add_argument("--save-steps", type=positive_int, help="write a checkpoint every N steps (default: --eval-steps)")
    parser.add_argument("--logging-steps", type=positive_int, help="log the training loss every N steps (default: 10, "
                        "or --eval-steps if fewer)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (CPU or GPU; default: on for GPU presets where the GPU supports it)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="train through torch.compile (default: on for GPU presets on a GPU; the first steps compile)")
    parser.add_argument("--compile-mode", choices=runs.COMPILE_MODES,
                        help="torch.compile's mode, with --compile (default: its own); reduce-overhead replays the step "
                             "as CUDA graphs, for a small model whose step is the host's kernel launches (a CUDA GPU)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--prompt", help="prompt of the sample printed at the end ('' starts a new document)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output-dir from its last complete checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the run in --output-dir (only the files train.py wrote) and start again")
    parser.add_argument("--threads", type=positive_int,
                        help="CPU threads (default: OMP_NUM_THREADS if set, else the cores idle now)")
    parser.add_argument("--allow-cpu", action="store_true", help="train a GPU preset without a GPU")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    return cli.run_main(lambda: _main(argv))


def _main(argv) -> int:
    args = parse_args(argv)
    if args.validation_fraction is not None and not 0 < args.validation_fraction < 0.5:
        raise ValueError(f"argument --validation-fraction: expected a number in (0, 0.5), got {args.validation_fraction}")
    flags = {name: getattr(args, name) for name in (
        "preset", "data", "text_field", "max_works", "validation_fraction", "tokenizer", "vocab_size", "block_size",
        "max_steps", "batch_size", "learning_rate", "eval_steps", "eval_blocks", "save_steps", "logging_steps", "bf16", "compile",
        "compile_mode", "seed", "prompt")}
    output_dir = runs.check_output_dir(args.output_dir, resume=args.resume, overwrite=args.overwrite)
    if args.resume:
        run = runs.RunConfig.load(output_dir).resumed_with(flags)
    else:
        run = runs.RunConfig.from_preset(flags.pop("preset") or "laptop", **flags)
    runs.check_device(run, args.allow_cpu)
    cli.set_threads(args.threads, log=print if cli.is_main_process() else lambda message: None)
    launched = "LOCAL_RANK" in os.environ  # by torchrun, which accelerate launch runs for DDP and FSDP
    resume = cli.command_line(__file__, ["--output-dir", args.output_dir, "--resume"], interpreter=not launched)
    if launched:
        resume = f"accelerate launch <the same launch options> {resume}"
    from mm_rec_train import trainer

    try:
        summary = trainer.train(run, output_dir, resume=args.resume, overwrite=args.overwrite, resume_command=resume)
    except trainer.TrainingInterrupted as stop:
        if cli.is_main_process():
            print(f"\n{stop}", file=sys.stderr)
        return 130
    if summary is None:  # not the main process of a distributed run
        return 0
    print(f"\nsample:\n{summary['sample']}\n")
    print(f"held-out perplexity {summary['held-out perplexity']:.2f}, bits per byte {summary['held-out bits per byte']:.4f}; "
          f"saved to {args.output_dir} in {summary['minutes (this session)']:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
