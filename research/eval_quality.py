"""Model-quality study: MM-Rec beside HF Llama and fla HGRN at equal parameter count (issue 15).

    python research/eval_quality.py --smoke                              # tiny, CPU, seconds
    python research/eval_quality.py --plan                               # the runs and time estimates, no training
    python research/eval_quality.py --study lm --tokenizations bytes --max-minutes 9
    python research/eval_quality.py --study mqar --settings 256x64 4096x16 --widths 128 --max-minutes 9
    python research/eval_quality.py --study lm --variants ablations --models mmrec --lrs 2e-3
    python research/eval_quality.py --report-only                        # rebuild lm.md / mqar.md / PNGs

Studies: "lm" (Shakespeare, three plays held out, byte-level and BPE; held-out loss and bits per
byte every --eval-every steps) and "mqar" (Zoology's multi-query associative recall, accuracy per
setting). Models: --models families (mmrec, hgrn, llama); MM-Rec's --variants by name or group
(main, ablations, improvements, all). One JSON per run in OUT/runs/; a finished run is skipped,
so rerunning a command continues it. --max-minutes: runs that would not fit are not started,
and a run still going at the limit is stopped (not saved). Tables: OUT/lm.md, OUT/mqar.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import quality

from mm_rec_train.cli import ArgumentParser, positive_float, positive_int, run_main
from mm_rec_train.runs import REPOSITORY


def parse_args(argv):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=("all", "lm", "mqar"), default="all")
    parser.add_argument("--models", nargs="+", default=None,
                        help=f"families: {' '.join(quality.FAMILIES)} (default all; --smoke: mmrec llama)")
    parser.add_argument("--variants", nargs="+", default=None,
                        help=f"MM-Rec variants or groups ({', '.join(quality.VARIANT_GROUPS)}); default main")
    parser.add_argument("--extra-variant", action="append", default=[], metavar="NAME=JSON",
                        help="an MM-Rec variant of MMRecConfig overrides, e.g. mmrec-slots8='{\"num_memory_slots\": 8}'")
    parser.add_argument("--settings", nargs="+",
                        help="MQAR settings LENGTHxPAIRS, most informative first (default: 9 settings, 64x4 .. 4096x16)")
    parser.add_argument("--widths", nargs="+", type=positive_int, help="MQAR model widths (default 128 256 64)")
    parser.add_argument("--tokenizations", nargs="+", choices=("bytes", "bpe"), help="LM tokenizations (default bytes bpe)")
    parser.add_argument("--lrs", nargs="+", type=positive_float,
                        help="learning rates, the first run first (LM default 2e-3 1e-3 4e-3, MQAR 3e-3 1e-3 3e-4)")
    parser.add_argument("--steps", type=positive_int, help="training steps per run (LM default 800, MQAR at most 2000)")
    parser.add_argument("--eval-every", type=positive_int, help="evaluate every N steps (LM default 100, MQAR 200)")
    parser.add_argument("--batch-size", type=positive_int, help="LM rows per step (default 32)")
    parser.add_argument("--lm-width", type=positive_int, help="LM hidden size (default 384)")
    parser.add_argument("--lm-layers", type=positive_int, help="LM layers (default 6)")
    parser.add_argument("--lm-seq-len", type=positive_int, help="LM tokens per row (default 512)")
    parser.add_argument("--mqar-tokens-per-batch", type=positive_int, help="MQAR tokens per step (default 32768)")
    parser.add_argument("--mqar-vocab", type=positive_int, help="MQAR vocabulary (default 8192, Zoology's)")
    parser.add_argument("--mqar-test-size", type=positive_int, help="MQAR test examples per setting (default 1000)")
    parser.add_argument("--sequential-max-length", type=positive_int,
                        help="longest MQAR setting for mmrec-state (its loop over t is slow; default 512)")
    parser.add_argument("--bpe-vocab", type=positive_int, help="BPE vocabulary (default 4096)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-minutes", type=positive_float, help="time budget of this call")
    parser.add_argument("--start-over-budget", action="store_true",
                        help="start a run even when its estimate exceeds the time left (estimates from older, slower "
                             "code); a run still going at the limit is stopped and not saved")
    parser.add_argument("--out", help="output folder (default docs/quality; --smoke: a new temporary folder)")
    parser.add_argument("--device", help="cuda or cpu (default cuda when available; --smoke: cpu)")
    parser.add_argument("--overwrite", action="store_true", help="rerun and replace finished runs of the plan")
    parser.add_argument("--reuse-older-code", action="store_true",
                        help="count MM-Rec runs made with other MM-Rec source code as finished")
    parser.add_argument("--plan", action="store_true", help="print the planned runs and estimates, train nothing")
    parser.add_argument("--report-only", action="store_true", help="rebuild the tables and plots from OUT/runs, train nothing")
    parser.add_argument("--smoke", action="store_true", help="a tiny version of both studies on CPU (seconds)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return parser.parse_args(argv)


def extra_variants(items):
    variants = {}
    for item in items:
        name, sep, text = item.partition("=")
        try:
            overrides = json.loads(text) if sep else None
        except json.JSONDecodeError as err:
            raise ValueError(f"--extra-variant {item}: not NAME=JSON ({err.msg})") from None
        if not name or not isinstance(overrides, dict):
            raise ValueError(f"--extra-variant {item}: expected NAME={{\"field\": value, ...}}")
        variants[name] = overrides
    return variants


def protocols(args):
    mqar = dict(quality.SMOKE_MQAR) if args.smoke else {}
    lm = dict(quality.SMOKE_LM) if args.smoke else {}
    both = {"lrs": tuple(args.lrs) if args.lrs else None, "steps": args.steps, "eval_every": args.eval_every,
            "seed": args.seed}
    mqar.update({k: v for k, v in both.items() if v is not None})
    lm.update({k: v for k, v in both.items() if v is not None})
    for key, value in (("settings", args.settings), ("widths", args.widths), ("tokens_per_batch", args.mqar_tokens_per_batch),
                       ("vocab_size", args.mqar_vocab), ("test_size", args.mqar_test_size),
                       ("sequential_max_length", args.sequential_max_length)):
        if value is not None:
            mqar[key] = tuple(value) if isinstance(value, list) else value
    for key, value in (("tokenizations", args.tokenizations), ("batch_size", args.batch_size), ("bpe_vocab", args.bpe_vocab),
                       ("hidden_size", args.lm_width), ("layers", args.lm_layers), ("seq_len", args.lm_seq_len)):
        if value is not None:
            lm[key] = tuple(value) if isinstance(value, list) else value
    return quality.MQARProtocol(**mqar), quality.LMProtocol(**lm)


def output_folder(args) -> Path:
    default = REPOSITORY / "docs" / "quality"
    return quality.study_folder(args.out, default, "mmrec-quality-smoke-" if args.smoke else None, "--out", "docs/quality")


def main(argv=None) -> int:
    return run_main(lambda: _main(argv))


def _main(argv) -> int:
    args = parse_args(argv)
    out = output_folder(args)
    command = "python research/eval_quality.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.report_only:
        written = quality.write_reports(out)
        for path in written:
            print(f"wrote {path}")
        if not written:
            print(f"no finished runs in {out / quality.RUNS}: nothing to report (tables left as they are)")
        return 0
    mqar, lm = protocols(args)
    models = args.models or (("mmrec", "llama") if args.smoke else quality.FAMILIES)
    variants = args.variants or (("mmrec-input",) if args.smoke else ("main",))
    device = args.device or ("cpu" if args.smoke else None)
    runs = quality.plan_runs(args.study, models, variants, extra_variants(args.extra_variant), mqar, lm)
    study = quality.Study(out, device, mqar, lm, overwrite=args.overwrite, reuse_older_code=args.reuse_older_code,
                          max_minutes=args.max_minutes, progress=not args.no_progress, command=command,
                          start_over_budget=args.start_over_budget)
    print(f"output: {out}")
    study.print_plan(runs)
    if args.plan:
        return 0
    outcome = study.run_all(runs)
    for path in quality.write_reports(out):
        print(f"wrote {path}")
    return 1 if outcome["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
