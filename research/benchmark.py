"""Whole-model benchmark: MM-Rec beside fla's HGRN and Gated DeltaNet and transformers' Llama, in one run.

    python research/benchmark.py --device cuda                      # training + generation, ~130M models
    python research/benchmark.py --device cuda --only train
    python research/benchmark.py --device cpu                        # small models, training

Training: full steps (bf16 autocast on CUDA, AdamW), tokens/s, step time, peak memory and MFU
(6 * parameters * tokens/s over the GPU's dense bf16 peak) at seq 2048 x batch 16, 8192 x 4
and 32768 x 1 on CUDA (hidden 768, 12 layers, vocab 32000); on CPU MM-Rec and Llama at
hidden 128, 4 layers, vocab 2048, seq 512 x 8 and 2048 x 2, fp32.
Generation (CUDA): greedy generate() from random prompts of 2k, 16k and 64k tokens, 128 new
tokens, batch 1 and 8, bf16 weights: decode tokens/s and ms per step (median step), prefill time
(prompt to first token) and the call's peak memory.

fla is optional (installed on the GPU machine from wheels, not a project dependency); a model
that is missing or runs out of memory gets a row that says so. Writes a Markdown table and a
PNG per study to --out (default docs/benchmarks/), each with the command, device and versions.
"""

import argparse
import gc
import json
import platform
import sys
import traceback
from pathlib import Path

import torch
import transformers
from timing import generate_throughput, mmrec_config, peak_bf16_tflops, training_throughput

from mm_rec import MMRecConfig, MMRecForCausalLM

GPU_TRAIN_SHAPES = [(2048, 16), (8192, 4), (32768, 1)]
CPU_TRAIN_SHAPES = [(512, 8), (2048, 2)]
GPU_CONTEXTS = [2048, 16384, 65536]
MODELS = ("mmrec", "hgrn", "gdn", "llama")
FLA_MODELS = ("hgrn", "gdn")  # their kernels need CUDA


def build(name, size, device, dtype=None, mmrec_overrides=None):
    """(model, parameters) for 'mmrec', 'hgrn', 'gdn' (fla's Gated DeltaNet) or 'llama' at 'gpu'
    (hidden 768, 12 layers, vocab 32000) or 'cpu' size (hidden 128, 4 layers, vocab 2048); MM-Rec
    as the gpu-130m preset at both sizes (``mmrec_config``); None where fla is not installed.
    Gated DeltaNet: heads of 64 channels as the others, values twice as wide (fla's default),
    tied embeddings as MM-Rec and HGRN, which puts it within 5% of their parameter count."""
    hidden, layers, heads, vocab = (768, 12, 12, 32000) if size == "gpu" else (128, 4, 4, 2048)
    torch.manual_seed(0)
    if name == "mmrec":
        model = MMRecForCausalLM(mmrec_config(hidden, layers, heads, vocab, mmrec_overrides))
    elif name == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=hidden * 8 // 3 // 256 * 256 or 4 * hidden, max_position_embeddings=1 << 17,
            attn_implementation="sdpa"))
    elif name == "hgrn":
        try:
            from fla.models import HGRNConfig, HGRNForCausalLM
        except ImportError:
            return None
        model = HGRNForCausalLM(HGRNConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers))
    else:
        try:
            from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
        except ImportError:
            return None
        model = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_heads=heads, head_dim=hidden // heads,
            tie_word_embeddings=True))
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model, sum(p.numel() for p in model.parameters())


def json_object(text):
    """argparse type: a JSON object (MMRecConfig fields)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of MMRecConfig fields, got {text!r}")
    return value


def release():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def versions():
    parts = [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    for module in ("triton", "fla"):
        try:
            parts.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            pass
    return ", ".join(parts)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads"


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def run_study(models, size, device, dtype, cases, measure, mmrec_overrides=None, report=None):
    """One row per (model, case): ``measure(name, model, params, case)`` -> dict, or a note where the
    model is not installed or the case runs out of memory. Models are built one at a time;
    ``report(rows)`` after each row, so an interrupted run keeps what it measured."""
    rows = []
    for name in models:
        built = build(name, size, device, dtype, mmrec_overrides)
        if built is None:
            rows.append({"model": name, "note": "not installed"})
            continue
        model, params = built
        for case in cases:
            print(f"{name} {case} ...", file=sys.stderr, flush=True)
            try:
                result = measure(name, model, params, case)
            except torch.OutOfMemoryError:
                result = {"note": "out of memory"}
            except Exception as err:  # a model that fails (e.g. to compile) gets a row saying so; the others still run
                traceback.print_exc()
                result = {"note": f"failed: {type(err).__name__}"}
            rows.append({"model": name, "params_m": params / 1e6, **case, **result})
            if report is not None:
                report(rows)
            release()
        del model
        release()
    return rows


def train_study(args, device, models, report=None):
    size = "gpu" if device.type == "cuda" else "cpu"
    shapes = GPU_TRAIN_SHAPES if size == "gpu" else CPU_TRAIN_SHAPES
    peak = peak_bf16_tflops(device)

    def measure(name, model, params, case):
        compiled = name in args.compile
        if compiled:
            # static shapes: one graph per case, compiled during the warm-up steps
            model = torch.compile(model, dynamic=False)
        result = training_throughput(model, case["batch"], case["seq"], steps=args.steps, bf16=size == "gpu")
        result["compiled"] = compiled
        result["mfu"] = 6 * params * result["tokens_per_s"] / (peak * 1e12) if peak else None
        return result

    cases = [{"seq": seq, "batch": batch} for seq, batch in shapes]
    return run_study(models, size, device, None, cases, measure, args.mmrec_overrides, report)


def generate_study(args, device, models, report=None):
    cases = [{"context": context, "batch": batch} for context in args.contexts for batch in (1, 8)]
    return run_study(models, "gpu", device, torch.bfloat16, cases, lambda name, model, params, case: generate_throughput(
        model, case["batch"], case["context"], new_tokens=args.new_tokens), args.mmrec_overrides, report)


def train_table(rows):
    lines = ["| model | params | seq x batch | tokens/s | step ms | peak GiB | MFU |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['model']} | {fmt(r.get('params_m'), '.1f')}M | {r.get('seq', '')} x {r.get('batch', '')} | "
                         f"{r['note']} | | | |")
            continue
        label = r["model"] + (" (compiled)" if r.get("compiled") else "")
        lines.append(f"| {label} | {r['params_m']:.1f}M | {r['seq']} x {r['batch']} | {r['tokens_per_s'] / 1e3:.1f}k | "
                     f"{1e3 * r['step_s']:.1f} | {fmt(r['peak_gib'], '.1f')} | "
                     f"{fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} |")
    return lines


def generate_table(rows):
    lines = ["| model | context | batch | decode tokens/s | ms per step | prefill s | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "decode_tokens_per_s" not in r:
            lines.append(f"| {r['model']} | {r.get('context', '')} | {r.get('batch', '')} | {r['note']} | | | |")
            continue
        lines.append(f"| {r['model']} | {r['context']} | {r['batch']} | {r['decode_tokens_per_s']:.0f} | "
                     f"{r['ms_per_step']:.2f} | {r['prefill_s']:.3f} | {fmt(r['peak_gib'], '.2f')} |")
    return lines


def plot(rows, x_key, y_key, group_keys, xlabel, ylabel, title, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = {}
    for r in rows:
        if y_key in r:
            groups.setdefault(tuple(r[k] for k in group_keys), []).append((r[x_key], r[y_key]))
    for key, points in sorted(groups.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, "o-", label=" ".join(str(k) for k in key))
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", choices=["train", "generate"], help="run one study (default: both on CUDA, train on CPU)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per shape (after 3 warm-up steps)")
    parser.add_argument("--contexts", type=int, nargs="+", default=GPU_CONTEXTS)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--mmrec-overrides", type=json_object, metavar="JSON",
                        help="MMRecConfig fields over the gpu-130m preset, e.g. '{\"memory_block_size\": 32}'")
    parser.add_argument("--compile", nargs="*", choices=MODELS, metavar="MODEL",
                        help="train these models (all with no name) through torch.compile, compiled in the warm-up steps "
                             "and not timed; the others run eagerly in the same table")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args(argv)
    args.compile = list(args.models) if args.compile == [] else list(args.compile or [])
    if args.steps < 1 or args.new_tokens < 1 or any(c < 64 for c in args.contexts):
        parser.error("--steps and --new-tokens must be positive and --contexts at least 64")
    if args.mmrec_overrides:
        unknown = MMRecConfig.unknown_fields(args.mmrec_overrides)
        if unknown:
            parser.error(f"--mmrec-overrides: MMRecConfig has no field {', '.join(unknown)}")
        try:
            mmrec_config(128, 4, 4, 2048, args.mmrec_overrides)
        except (ValueError, TypeError) as err:
            parser.error(f"--mmrec-overrides: {err}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    studies = [args.only] if args.only else (["train", "generate"] if device.type == "cuda" else ["train"])
    if "generate" in studies and device.type != "cuda":
        parser.error("the generation study runs on CUDA")
    models = [m for m in args.models if device.type == "cuda" or m not in FLA_MODELS]
    command = "python research/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = [f"Command: `{command.strip()}`", "", f"Device: {device_name(device)}; {versions()}", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if device.type == "cuda" else "cpu"
    suffix = "_compiled" if args.compile else ""  # any model compiled: a table of its own
    for study in studies:
        def write(rows, study=study):
            table = train_table(rows) if study == "train" else generate_table(rows)
            text = "\n".join(header + table) + "\n"
            (args.out / f"{study}_{tag}{suffix}.md").write_text(text)
            (args.out / f"{study}_{tag}{suffix}.json").write_text(json.dumps(rows, indent=1) + "\n")
            return text

        rows = (train_study if study == "train" else generate_study)(args, device, models, report=write)
        print(write(rows))
        if study == "train":
            plot(rows, "seq", "tokens_per_s", ["model"], "sequence length (tokens)", "training tokens/s",
                 f"training throughput, {device_name(device)}", args.out / f"train_{tag}{suffix}.png")
        else:
            plot(rows, "context", "decode_tokens_per_s", ["model", "batch"], "context (tokens)", "generated tokens/s",
                 f"generate() decode throughput, {device_name(device)}", args.out / f"generate_{tag}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
