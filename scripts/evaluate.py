"""Perplexity and bits per byte of a saved MM-Rec model on held-out text.

    .venv/bin/python scripts/evaluate.py runs/laptop                        # the run's own held-out documents
    .venv/bin/python scripts/evaluate.py runs/laptop --data essay.txt notes/ --output eval.json

Without --data, the held-out split of the run that wrote the folder (its run_config.json) is
rebuilt exactly as in training. --data takes what train.py's --data takes and evaluates all
of it. The text is cut into blocks of --block-size tokens (default: the run's), each read from
a fresh state. Prints the result as JSON (and writes it to --output).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Only the light modules before the arguments are parsed: --help and a bad flag answer at once.
from mm_rec_train import cli, runs
from mm_rec_train.cli import ArgumentParser, positive_int


def parse_args(argv):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a folder saved by scripts/train.py or save_pretrained (with its tokenizer)")
    parser.add_argument("--data", nargs="+",
                        help="text files, folders, .jsonl, a saved or named dataset (default: the run's held-out split)")
    parser.add_argument("--text-field", default="text", help="the text field of .jsonl records and datasets")
    parser.add_argument("--block-size", type=positive_int, help="tokens per block (default: the run's)")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--max-blocks", type=positive_int, help="evaluate only the first N blocks")
    parser.add_argument("--output", help="also write the JSON result to this file")
    parser.add_argument("--threads", type=positive_int,
                        help="CPU threads (default: OMP_NUM_THREADS if set, else the cores idle now)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    return cli.run_main(lambda: _main(argv))


def _main(argv) -> int:
    args = parse_args(argv)
    from mm_rec_train import data, evaluation

    folder = cli.check_model_folder(args.model)
    run = runs.RunConfig.load(folder) if (folder / runs.RUN_CONFIG).is_file() else None
    if args.data:
        texts = data.load_corpus(args.data, args.text_field).documents
        source = " ".join(args.data)
    elif run is not None:
        _, held_out = data.split_corpus(data.load_corpus(run.data, run.text_field, run.max_works),
                                            run.validation_fraction)
        texts, source = held_out, f"the run's held-out split ({len(held_out)} documents)"
    else:
        raise ValueError(f"{args.model} has no {runs.RUN_CONFIG} (not written by train.py): pass --data")
    block_size = args.block_size or (run.block_size if run is not None else None)
    if block_size is None:
        raise ValueError("pass --block-size (the folder has no run configuration to take it from)")

    model, tokenizer = cli.load_model_folder(folder)
    rows = data.blocks(texts.values(), tokenizer, block_size, "held-out")["input_ids"]
    cli.set_threads(args.threads, log=lambda message: print(message, file=sys.stderr))  # stdout is the JSON
    metrics = evaluation.evaluate_rows(model, rows[:args.max_blocks] if args.max_blocks else rows, tokenizer,
                                       args.batch_size, progress=sys.stderr.isatty())
    result = {"model": str(folder), "data": source, "block_size": block_size, **metrics}
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
