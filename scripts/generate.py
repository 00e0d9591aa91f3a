"""Generate text with a saved MM-Rec model, streaming tokens as they come.

    python scripts/generate.py runs/laptop --prompt "ROMEO." --max-new-tokens 200
    python scripts/generate.py runs/laptop --prompt "To be" --greedy
    python scripts/generate.py runs/laptop --prompt "Hello." --state chat.safetensors   # day 1
    python scripts/generate.py runs/laptop --prompt "And then?" --state chat.safetensors  # day 2

The model folder is loaded with AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
and AutoTokenizer, and generates through the model's own generate(): the sampling flags make its
GenerationConfig, on top of the folder's generation_config.json (which names EOS). Generation
stops after EOS or --max-new-tokens tokens.

--state FILE: if FILE exists the stream continues from the recurrent state saved there, through
the model's continue_stream (only the new turn's tokens are read, and the result is the same as
feeding the whole conversation again). A new turn is joined to the text before it by
--separator (a newline by default; '' glues them), except after an EOS, where a new document
starts and nothing is inserted: the stream reads separator + prompt, printed as it is read.
After generating, the state after every token read and generated (an EOS included) is written
back to FILE (atomically, with the mode of any new file). FILE records which model wrote it
(a fingerprint of its weights and config.json); another model refuses it and leaves it unchanged.
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
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling: the same seed gives the same text")
    parser.add_argument("--state", help="recurrent state file: continue from it if it exists, then save the new state to it")
    parser.add_argument("--separator", default="\n",
                        help="with --state, the text read between the previous text and the new --prompt (default: a "
                             "newline; '' glues them); nothing is inserted after an EOS")
    parser.add_argument("--json", help="also write the ids read (prompt_ids) and generated, and the text, to this JSON file")
    args = parser.parse_args(argv)
    if args.top_k < 0:
        raise ValueError(f"argument --top-k: expected 0 (off) or a positive integer, got {args.top_k}")
    for flag, text in (("--prompt", args.prompt), ("--separator", args.separator)):
        _check_utf8(flag, text)
    return args


def _check_utf8(flag: str, text: str) -> None:
    """Python hands over a command-line argument that is not valid UTF-8 as a str holding a
    surrogate for each undecodable byte, which no tokenizer reads."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"code point U+{code:04X}"
        raise ValueError(f"argument {flag}: expected UTF-8 text, got {what} at character {err.start} "
                         f"(the terminal or the shell passed another encoding)") from None


def main(argv=None) -> int:
    return cli.run_main(lambda: _main(argv))


def _main(argv) -> int:
    args = parse_args(argv)
    from transformers import TextStreamer

    from mm_rec_train import generation

    folder = cli.check_model_folder(args.model)
    state = Path(args.state) if args.state else None
    if state is not None:
        if state.is_dir():
            raise ValueError(f"--state {args.state}: is a folder, expected a file")
        if not state.parent.is_dir():
            raise ValueError(f"--state {args.state}: the folder {state.parent} does not exist")
    model, tokenizer = cli.load_model_folder(folder)
    config = generation.sampling_config(model, tokenizer, args.max_new_tokens, greedy=args.greedy,
                                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)

    fingerprint = generation.model_fingerprint(model, folder) if state is not None else None
    cache, last_token = generation.load_state(model, state, fingerprint) if state is not None and state.exists() \
        else (None, None)
    if cache is not None and not args.prompt:
        raise ValueError("--prompt is empty: continuing a saved --state needs new text to read")
    text = args.prompt if cache is None else generation.turn_text(args.prompt, args.separator, last_token,
                                                                  config.eos_token_id)
    ids = generation.prompt_ids(tokenizer, text, continuing=cache is not None)

    print(text, end="", flush=True)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    new, cache = generation.generate(model, ids, config, cache=cache, seed=args.seed, streamer=streamer)
    if state is not None:
        generation.save_state(cache, state, fingerprint, folder, new[-1])
        print(f"[state after {int(cache.position[0])} tokens saved to {state}]", file=sys.stderr)
    if args.json:
        record = {"prompt": args.prompt, "read": text, "prompt_ids": ids, "generated_ids": new,
                  "generated": tokenizer.decode(new, skip_special_tokens=True), "stream_tokens": int(cache.position[0])}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
