"""Generate text with a saved MM-Rec model, streaming tokens as they come.

    python scripts/generate.py runs/laptop --prompt "ROMEO." --max-new-tokens 200
    python scripts/generate.py runs/laptop --prompt "To be" --greedy
    python scripts/generate.py runs/laptop --prompt "Hello." --state chat.safetensors   # day 1
    python scripts/generate.py runs/laptop --prompt "And then?" --state chat.safetensors  # day 2

The model folder is loaded with AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
and AutoTokenizer. --state FILE: if FILE exists the stream continues from the recurrent state
saved there (only the new prompt's tokens are read, and the result is the same as feeding the
whole conversation again); after generating, the state after the prompt and every generated
token is written back to FILE (atomically).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mm_rec_train import cli  # torch and transformers only after the arguments are parsed (--help at once)
from mm_rec_train.cli import ArgumentParser, positive_float, positive_int, probability


def parse_args(argv):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a folder saved by scripts/train.py or save_pretrained (with its tokenizer)")
    parser.add_argument("--prompt", default="", help="text to continue ('' starts a new document)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=200)
    parser.add_argument("--temperature", type=positive_float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (0: all)")
    parser.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass (1: off)")
    parser.add_argument("--greedy", action="store_true", help="always the likeliest token (no sampling)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--state", help="recurrent state file: continue from it if it exists, then save the new state to it")
    parser.add_argument("--json", help="also write prompt and generated token ids and text to this JSON file")
    args = parser.parse_args(argv)
    if args.top_k < 0:
        raise ValueError(f"argument --top-k: expected 0 (off) or a positive integer, got {args.top_k}")
    return args


def main(argv=None) -> int:
    return cli.run_main(lambda: _main(argv))


def _main(argv) -> int:
    args = parse_args(argv)
    import torch
    from transformers import TextStreamer

    from mm_rec_train import generation

    folder = cli.check_model_folder(args.model)
    state = Path(args.state) if args.state else None
    if state is not None and not state.parent.is_dir():
        raise ValueError(f"--state {args.state}: the folder {state.parent} does not exist")
    model, tokenizer = cli.load_model_folder(folder)

    cache = generation.load_state(model, state) if state is not None and state.exists() else None
    if cache is not None and not args.prompt:
        raise ValueError("--prompt is empty: continuing a saved --state needs new text to read")
    ids = generation.prompt_ids(tokenizer, args.prompt, continuing=cache is not None)

    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    print(args.prompt, end="", flush=True)
    new, cache = generation.generate_tokens(
        model, ids, cache=cache, max_new_tokens=args.max_new_tokens, greedy=args.greedy,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_token_id=tokenizer.eos_token_id,
        generator=torch.Generator().manual_seed(args.seed), on_token=lambda t: streamer.put(torch.tensor([t])),
    )
    streamer.end()
    if state is not None:
        cache.save(state)
        print(f"[state after {int(cache.position[0])} tokens saved to {state}]", file=sys.stderr)
    if args.json:
        record = {"prompt": args.prompt, "prompt_ids": ids, "generated_ids": new,
                  "generated": tokenizer.decode(new, skip_special_tokens=True), "stream_tokens": int(cache.position[0])}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
