"""Quality at equal GPU time (issue 27, item 4): is MM-Rec worth its cost?

    python research/equal_time.py --smoke                                    # tiny, CPU, seconds
    python research/equal_time.py --time-only                                # time every model's step, print the plan
    python research/equal_time.py --tokenizations bytes --models mmrec-default hgrn llama
    python research/equal_time.py --tokenizations bytes --models mmrec-default+compile llama+compile  # compiled steps
    python research/equal_time.py --tokenizations bytes --models mmrec-default+cudagraphs llama+cudagraphs  # CUDA graphs
    python research/equal_time.py --plan                                     # the plan from recorded timings, no GPU work
    python research/equal_time.py --report                                   # README.md + plot from OUT/runs

Every model is trained for the same wall-clock budget of GPU time instead of the same number of steps,
and scored by held-out bits per byte (bytes and BPE) at that budget. A model named with ``+compile``
(``mmrec-default+compile``, ``llama+compile``, ...) is the same model trained through torch.compile (the
Trainer's ``torch_compile``), timed and recorded under its own name; ``+cudagraphs`` the same in
torch.compile's "reduce-overhead" mode (the Trainer's ``torch_compile_mode``: the forward and the backward
replayed as CUDA graphs, for a step whose time is the host's launches). The targets take each side's best of
eager and compiled. Three stages:

1. **Timing.** Each (tokenization, model) is timed alone: a fresh model of the quality study's LM protocol
   (``quality.LMProtocol``: hidden 384, 6 layers, rows of 32 x 512 tokens; MM-Rec and Llama matched to
   HGRN's parameter count by their FFN width, Gated DeltaNet at fla's own) trains ``warmup + timed + 2``
   steps through ``quality.train_loop`` itself, the study's training loop (the main job's Trainer: AdamW,
   gradient clipping, bf16 autocast on CUDA, the same data order), so the timed step is exactly the step
   the runs take, optimiser and Trainer bookkeeping included. The data callback synchronises the device and
   stamps the clock each time the Trainer asks for a batch; consecutive stamps are one training step
   apart, and the step time is the median of ``timed`` intervals after ``warmup`` (compilation and kernel
   autotuning fall in the warm-up). One held-out evaluation is timed too, for the time estimates. A
   timing is recorded in OUT/timings/ per device and reused.
2. **Planning.** The budget of a tokenization is the time the reference model needs for the protocol's
   steps (800): HGRN, or Llama where HGRN cannot run (no fla, or a CPU), or ``--budget-seconds``. Model
   i trains ``floor(budget / step_seconds_i)`` steps (``plan_steps``), its warm-up + cosine schedule over
   its own steps (the study's ``warmup_fraction``). Learning rate (``choose_lrs``): ``--lrs`` if given
   (a sweep, for every model); else the model's best rate among the quality study's recorded runs of the
   same sizes and tokenization (docs/quality/runs, the lowest seed's sweep), or where the model has none
   its family's best run's rate; else the protocol's sweep (2e-3, 1e-3, 4e-3) and the best of it is reported.
3. **Training.** Each run trains with ``quality.train_loop`` and is scored with ``quality.lm_metrics``
   every ``eval_every`` steps and at its last step; the curve's time axis is steps x the measured step
   time (the training seconds the budget counts; the measured wall seconds of training, evaluation
   excluded, are recorded too).

Runs: one JSON per (tokenization, model, learning rate, seed) in OUT/runs/, written atomically when the
run ends; its name hashes its definition, MM-Rec's source included (``quality.code_fingerprint``), so a
recorded run is skipped (``--rerun`` repeats it). OUT/README.md (``write_report``) holds the plan, the
final bits per byte, the issue's targets (MM-Rec <= HGRN, Gated DeltaNet and Llama at equal GPU time,
bytes and BPE) as met / missed / not measured, the plot, the device, versions and exact commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import quality
import torch

from mm_rec_train.cli import ArgumentParser, device_type, non_negative_int, positive_float, positive_int, run_main, set_threads
from mm_rec_train.runs import CUDA_GRAPH_MODES, REPOSITORY

PROTOCOL_VERSION = 1
RUNS, TIMINGS, CACHE, INVOCATIONS, REPORT, PLOT = "runs", "timings", "cache", "invocations.jsonl", "README.md", \
    "equal-time.png"
MMREC = "mmrec-default"                   # MMRecConfig's defaults (quality's variant of that name)
PEERS = ("hgrn", "llama", "gdn")
MODELS = (MMREC, *PEERS)                  # the order runs are made in: MM-Rec and the cheap peers first
REFERENCES = ("hgrn", "llama")            # whose protocol-length run sets the budget: the first that can run
PEER_TITLES = {"hgrn": "HGRN", "gdn": "Gated DeltaNet", "llama": "Llama"}
COMPILED = "+compile"  # a model name's suffix: trained through torch.compile (the Trainer's torch_compile)
# A model name's suffix: trained through torch.compile in its "reduce-overhead" mode, the forward and backward
# replayed as CUDA graphs (one launch each instead of one per kernel: a small model's step is bound by the host).
CUDAGRAPHS = "+cudagraphs"
SUFFIXES = {COMPILED: True, CUDAGRAPHS: "reduce-overhead"}  # the suffix -> quality.train_loop's ``compile``
# Steps of the timing pass: warm-up (compilation, autotuning) then the timed ones.
WARMUP_STEPS, TIMED_STEPS = 10, 30
SMOKE = dict(quality.SMOKE_LM, steps=16, eval_every=8)
SMOKE_TIMING = dict(warmup=2, timed=4)


def base_model(model: str) -> str:
    """The model without its suffix: ``llama+compile`` is Llama trained through torch.compile."""
    for suffix in SUFFIXES:
        model = model.removesuffix(suffix)
    return model


def compiled(model: str):
    """How ``model`` trains: False (eagerly), True (torch.compile) or a torch.compile mode (``+cudagraphs``)."""
    return next((how for suffix, how in SUFFIXES.items() if model.endswith(suffix)), False)


def family_of(model: str) -> str:
    """"mmrec" for one of the quality study's MM-Rec variants, else the peer's name (either with a suffix)."""
    base = base_model(model)
    if base in quality.MMREC_VARIANTS:
        return "mmrec"
    if base in PEERS:
        return base
    raise ValueError(f"--models: unknown model {model!r}; known: {', '.join(MODELS)} or a quality.MMREC_VARIANTS name, "
                     f"each also with {COMPILED} (trained through torch.compile) or {CUDAGRAPHS} (torch.compile's "
                     "CUDA graphs, on CUDA)")


def mmrec_overrides(model: str) -> Optional[dict]:
    """The MMRecConfig fields of an MM-Rec variant (None for a peer)."""
    return quality.MMREC_VARIANTS[base_model(model)] if family_of(model) == "mmrec" else None


def refusal(model: str, device: torch.device) -> Optional[str]:
    """Why ``model`` cannot run on ``device`` (one line), or None."""
    if compiled(model) in CUDA_GRAPH_MODES and device.type != "cuda":
        return f"{model}: CUDA graphs need a CUDA device, not {device.type}"
    return quality.refusal_reason(family_of(model), base_model(model), mmrec_overrides(model), device)


def vocab_size(protocol: quality.LMProtocol, tokenization: str) -> int:
    return 258 if tokenization == "bytes" else protocol.bpe_vocab


def size(model: str, protocol: quality.LMProtocol, tokenization: str) -> dict:
    """``quality.matched_size`` at the protocol's width and depth and the tokenization's vocabulary."""
    return quality.matched_size(family_of(model), vocab_size(protocol, tokenization), protocol.hidden_size,
                                protocol.layers, mmrec_overrides(model))


def _digest(spec: dict) -> str:
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]


# ----------------------------------------------------------------------------- planning

def budget_from(step_seconds: Dict[str, float], reference: str, reference_steps: int) -> float:
    """Seconds ``reference`` needs for ``reference_steps`` steps at its measured step time."""
    if reference not in step_seconds:
        raise ValueError(f"reference: {reference!r} has no step time (timed: {', '.join(step_seconds) or 'none'})")
    if reference_steps <= 0:
        raise ValueError(f"reference_steps must be positive, got {reference_steps}")
    return reference_steps * step_seconds[reference]


def plan_steps(step_seconds: Dict[str, float], budget_seconds: float) -> Dict[str, int]:
    """{model: floor(budget / its step seconds)}: the steps each model completes in the budget. A tiny
    relative slack keeps the reference at exactly its protocol's steps despite rounding (800 x s / s)."""
    if not (budget_seconds > 0 and math.isfinite(budget_seconds)):
        raise ValueError(f"budget_seconds must be a positive number, got {budget_seconds}")
    steps = {}
    for model, seconds in step_seconds.items():
        if not (seconds > 0 and math.isfinite(seconds)):
            raise ValueError(f"step_seconds[{model!r}] must be a positive number, got {seconds}")
        steps[model] = math.floor(budget_seconds / seconds * (1 + 1e-12))
    return steps


def _matches_protocol(spec: dict, protocol: quality.LMProtocol, tokenization: str) -> bool:
    # the steps are left out: a rate recorded at the quality study's 800 steps is the best guess at any budget
    wanted = {"tokenization": tokenization, "hidden_size": protocol.hidden_size, "layers": protocol.layers,
              "seq_len": protocol.seq_len, "batch_size": protocol.batch_size,
              "vocab_size": vocab_size(protocol, tokenization), "validation_fraction": protocol.validation_fraction,
              "max_works": protocol.max_works, "max_chars": protocol.max_chars, "weight_decay": protocol.weight_decay,
              "warmup_fraction": protocol.warmup_fraction}
    return all(spec.get(k) == v for k, v in wanted.items())


def choose_lrs(model: str, tokenization: str, protocol: quality.LMProtocol, records: Sequence[dict],
               lrs: Optional[Sequence[float]] = None) -> Tuple[Tuple[float, ...], str]:
    """(learning rates to run, the rule that gave them). ``lrs`` given: that sweep. Else, among the quality
    study's finished LM ``records`` of this protocol and tokenization (any number of steps), the model's own
    runs, or where it has none its family's: the rate of the run with the lowest final held-out bits per byte at their lowest
    seed (a lower rate on a tie). Else the protocol's sweep."""
    if lrs:
        return tuple(lrs), "--lrs sweep"
    same = [r for r in records if r.get("study") == "lm" and _matches_protocol(r.get("spec", {}), protocol, tokenization)
            and math.isfinite(r.get("final", {}).get("bits_per_byte", math.nan))]
    for whose, runs in ((model, [r for r in same if r["model"] == model]),
                        (f"the {family_of(model)} family", [r for r in same if r["family"] == family_of(model)])):
        if runs:
            seed = min(quality.seed_of(r) for r in runs)
            best = min((r for r in runs if quality.seed_of(r) == seed), key=lambda r: (r["final"]["bits_per_byte"], r["lr"]))
            return (best["lr"],), (f"best recorded of {whose}: {best['model']}, {best['final']['bits_per_byte']:.4f} "
                                   f"bits per byte after {best['spec']['steps']} steps")
    return tuple(protocol.lrs), f"sweep: no recorded {family_of(model)} run of this protocol"


# ----------------------------------------------------------------------------- runs

@dataclasses.dataclass
class Run:
    """One training run; ``spec`` (JSON) defines it and names it. ``plan`` (steps, budget, timing) is filled
    in once the timings exist and is recorded with the run but not part of its name: a run recorded under
    another timing of the same code is the same run (``--rerun`` repeats it)."""

    tokenization: str
    model: str
    lr: float
    seed: int
    spec: dict
    lr_rule: str = ""
    refused: Optional[str] = None
    plan: Optional[dict] = None

    @property
    def family(self) -> str:
        return family_of(self.model)

    @property
    def name(self) -> str:
        return f"{self.tokenization}-{self.model}-lr{self.lr:g}-s{self.seed}-{_digest(self.spec)}"


def base_spec(model: str, tokenization: str, protocol: quality.LMProtocol, code: str) -> dict:
    spec = {"study": "equal_time", "tokenization": tokenization, "model": model, "family": family_of(model),
            "vocab_size": vocab_size(protocol, tokenization), "hidden_size": protocol.hidden_size,
            "layers": protocol.layers, "seq_len": protocol.seq_len, "batch_size": protocol.batch_size,
            "bpe_vocab": protocol.bpe_vocab, "validation_fraction": protocol.validation_fraction,
            "max_works": protocol.max_works, "max_chars": protocol.max_chars, "protocol_version": PROTOCOL_VERSION}
    if family_of(model) == "mmrec":
        spec.update(overrides=mmrec_overrides(model), mmrec_code=code)
    if compiled(model):  # only then, so the names of the eager runs recorded before stay as they were
        spec["compile"] = compiled(model)
    return spec


@dataclasses.dataclass
class Timing:
    """One model's timing pass: its name and file, and the spec that defines it (the model, its size, the
    device, the timing's steps)."""

    tokenization: str
    model: str
    spec: dict
    refused: Optional[str] = None

    @property
    def name(self) -> str:
        return f"{self.tokenization}-{self.model}-{_digest(self.spec)}"


# ----------------------------------------------------------------------------- the study

class EqualTime:
    """Times, plans and trains into ``out``. ``budget_seconds``: a fixed budget (else the reference's
    ``protocol.steps``); ``max_minutes``: no timing or run is started that its estimate says would not
    fit in the time left, and a run still going at the limit is stopped unsaved."""

    def __init__(self, out, protocol: quality.LMProtocol, device: Optional[str] = None, warmup: int = WARMUP_STEPS,
                 timed: int = TIMED_STEPS, budget_seconds: Optional[float] = None, rerun: bool = False,
                 retime: bool = False, max_minutes: Optional[float] = None, progress: bool = True,
                 log: Callable[[str], None] = print, command: str = ""):
        self.out, self.protocol = Path(out), protocol
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.warmup, self.timed, self.budget_seconds = warmup, timed, budget_seconds
        self.rerun, self.retime, self.max_minutes = rerun, retime, max_minutes
        self.progress, self.log, self.command = progress, log, command
        self.device_name = quality.device_name(self.device)
        self.started = time.time()
        self.deadline = None if max_minutes is None else self.started + 60 * max_minutes
        self.code = quality.code_fingerprint()
        self._data: Dict[str, quality.LMData] = {}

    # data ------------------------------------------------------------------------------------------

    def data(self, tokenization: str) -> quality.LMData:
        if tokenization not in self._data:
            p = self.protocol
            data = quality.lm_data(tokenization, p.seq_len, p.bpe_vocab, p.validation_fraction, p.max_works, p.max_chars,
                                   cache_dir=self.out / CACHE)
            if data.vocab_size != vocab_size(p, tokenization):
                raise ValueError(f"the {tokenization} tokenizer has {data.vocab_size} tokens, "
                                 f"the protocol expected {vocab_size(p, tokenization)}")
            self._data[tokenization] = data
        return self._data[tokenization]

    def _build(self, spec: dict, seed: int):
        torch.manual_seed(seed)
        return quality.build_model(spec["family"], spec["vocab_size"], spec["hidden_size"], spec["layers"],
                                   spec.get("intermediate_size"), spec.get("overrides"),
                                   max_length=max(4096, spec["seq_len"])).to(self.device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _free(self) -> None:
        quality.free_device(self.device)

    # timing ----------------------------------------------------------------------------------------

    def timing_for(self, tokenization: str, model: str) -> Timing:
        reason = refusal(model, self.device)
        spec = base_spec(model, tokenization, self.protocol, self.code)
        if reason is None:
            try:
                spec.update(size(model, self.protocol, tokenization))
            except ValueError as err:  # RefusedRun included
                reason = f"{model}: {' '.join(str(err).split())}"
        spec.update(device=self.device_name, warmup=self.warmup, timed=self.timed, lr=self.protocol.lrs[0])
        return Timing(tokenization, model, spec, reason)

    def timing_path(self, timing: Timing) -> Path:
        return self.out / TIMINGS / f"{timing.name}.json"

    def load_timing(self, timing: Timing) -> Optional[dict]:
        path = self.timing_path(timing)
        if timing.refused or not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def time_model(self, timing: Timing) -> dict:
        """The timing pass of one model (see the module's docstring); writes and returns its record."""
        s, p = timing.spec, self.protocol
        started = time.time()
        model = self._build(s, seed=0)
        data = self.data(timing.tokenization)
        rows = data.train.to(self.device)
        steps = self.warmup + self.timed + 2  # two more: the first stamps come before the first step (prefetch)
        order = quality.batch_order(len(rows), steps, p.batch_size, 0).to(self.device)
        stamps: List[float] = []

        def next_batch(step):
            # called when the Trainer fetches a batch: once per step, ahead of it by the loader's prefetch
            self._sync()
            stamps.append(time.perf_counter())
            batch = rows[order[step]]
            return batch, batch

        quality.train_loop(model, next_batch, lambda: {}, steps, s["lr"], eval_every=steps, weight_decay=p.weight_decay,
                           warmup_fraction=p.warmup_fraction, deadline=self.deadline, progress=self.progress,
                           description=f"timing {timing.tokenization} {timing.model}", seed=0, batch_size=p.batch_size,
                           compile=compiled(timing.model))
        intervals = [b - a for a, b in zip(stamps, stamps[1:])][self.warmup:self.warmup + self.timed]
        if len(intervals) < self.timed:
            raise ValueError(f"timing {timing.name}: {len(stamps)} batches fetched, {steps} expected (the loss was "
                             "not finite?)")
        self._sync()
        eval_started = time.perf_counter()
        quality.lm_metrics(model, data.held_out, data.byte_lengths, p.eval_batch_size)
        self._sync()
        eval_seconds = time.perf_counter() - eval_started
        step_seconds = statistics.median(intervals)
        total = time.time() - started
        record = {
            "name": timing.name, "tokenization": timing.tokenization, "model": timing.model, "spec": s,
            "parameters": quality.count_parameters(model), "step_seconds": step_seconds, "intervals": intervals,
            "tokens_per_second": p.batch_size * p.seq_len / step_seconds, "eval_seconds": eval_seconds,
            "held_out_rows": len(data.held_out),
            # what a run costs beyond its steps and evaluations: building, the Trainer, compilation
            "overhead_seconds": max(0.0, total - steps * step_seconds - eval_seconds), "seconds": total,
            "device": self.device_name, "versions": quality.versions(), "git": quality.git_commit(),
            "command": self.command, "ended": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        }
        quality.atomic_write_json(self.timing_path(timing), record)
        del model
        self._free()
        return record

    def ensure_timings(self, timings: Sequence[Timing], measure: bool = True) -> Tuple[Dict[Tuple[str, str], dict], dict]:
        """({(tokenization, model): timing record} of every timing recorded or made now, outcome counts).
        ``measure=False``: recorded ones only. Under ``max_minutes``, a timing is not started when the
        time left is shorter than this call's longest timing so far."""
        found: Dict[Tuple[str, str], dict] = {}
        outcome = {"timed": 0, "over_budget": 0, "failed": 0}
        longest = 0.0
        for timing in timings:
            record = None if self.retime and measure else self.load_timing(timing)
            if record is None and measure and not timing.refused:
                if self.deadline is not None and time.time() + longest > self.deadline:
                    outcome["over_budget"] += 1
                    continue
                kind, record = quality.attempt(lambda: self.time_model(timing), f"timing {timing.name}", self.log,
                                               self.device, unsaved="not recorded")
                outcome["timed" if kind == "done" else kind] += 1
                if kind != "done":
                    continue
                longest = max(longest, record["seconds"])
                self.log(f"timed: {timing.tokenization} {timing.model}: {record['step_seconds'] * 1e3:.2f} ms a step, "
                         f"{record['tokens_per_second']:,.0f} tokens/s")
            if record is not None:
                found[(timing.tokenization, timing.model)] = record
        return found, outcome

    # planning --------------------------------------------------------------------------------------

    def plan(self, tokenizations: Sequence[str], models: Sequence[str], seeds: Sequence[int],
             lrs: Optional[Sequence[float]] = None, lr_records: Sequence[dict] = (), measure: bool = True):
        """(runs, {(tokenization, model): timing record}, {tokenization: budget}, timing outcome counts).
        The runs: every (tokenization, model, lr, seed) in that order, each with its ``plan`` where its
        timing and the budget's exist."""
        timings, budgets = [], {}
        for tokenization in tokenizations:
            needed = list(models)
            if self.budget_seconds is None:
                needed += [m for m in REFERENCES if m not in needed]
            timings += [self.timing_for(tokenization, m) for m in needed]
        refusals = {(t.tokenization, t.model): t.refused for t in timings}
        # time the references first: without the budget no run can be planned
        ordered = sorted(timings, key=lambda t: t.model not in REFERENCES)
        found, outcome = self.ensure_timings(ordered, measure)
        runs: List[Run] = []
        for tokenization in tokenizations:
            budget = self._budget(tokenization, found, refusals)
            budgets[tokenization] = budget
            step_seconds = {m: found[(tokenization, m)]["step_seconds"] for m in models if (tokenization, m) in found}
            steps = plan_steps(step_seconds, budget["seconds"]) if budget.get("seconds") else {}
            for model in models:
                chosen, rule = choose_lrs(model, tokenization, self.protocol, lr_records, lrs)
                timing = self.timing_for(tokenization, model)
                spec = {**base_spec(model, tokenization, self.protocol, self.code),
                        **{k: timing.spec.get(k) for k in ("intermediate_size", "parameters", "target_parameters")},
                        "steps_rule": budget["rule"], "eval_every": self.protocol.eval_every,
                        "eval_batch_size": self.protocol.eval_batch_size, "weight_decay": self.protocol.weight_decay,
                        "warmup_fraction": self.protocol.warmup_fraction}
                for lr in chosen:
                    for seed in seeds:
                        run = Run(tokenization, model, lr, seed, {**spec, "lr": lr, "seed": seed}, rule, timing.refused)
                        record = found.get((tokenization, model))
                        if run.refused is None and record is not None and model in steps:
                            run.plan = {"steps": steps[model], "step_seconds": record["step_seconds"],
                                        "tokens_per_second": record["tokens_per_second"],
                                        "tokens": steps[model] * self.protocol.batch_size * self.protocol.seq_len,
                                        "budget_seconds": budget["seconds"], "budget": budget["text"],
                                        "timing": record["name"], "timing_device": record["device"],
                                        "estimate_seconds": self._estimate(record, steps[model])}
                            if steps[model] == 0:
                                run.refused = (f"{model}: one step ({record['step_seconds']:.3g} s) is longer than the "
                                               f"budget ({budget['seconds']:.3g} s)")
                        runs.append(run)
        return runs, found, budgets, outcome

    def _budget(self, tokenization: str, found: dict, refusals: dict) -> dict:
        """{"rule" (in the runs' spec), "seconds", "text"} of one tokenization's budget; no "seconds" while
        the reference is not timed."""
        if self.budget_seconds is not None:
            return {"rule": {"seconds": self.budget_seconds}, "seconds": self.budget_seconds,
                    "text": f"{self.budget_seconds:g} s (--budget-seconds)"}
        reference = next((m for m in REFERENCES if not refusals.get((tokenization, m))), None)
        if reference is None:
            return {"rule": {"reference": None}, "text": "no reference can run: "
                    + "; ".join(refusals[(tokenization, m)] for m in REFERENCES)}
        skipped = [refusals[(tokenization, m)] for m in REFERENCES[:REFERENCES.index(reference)]]
        why = f" ({'; '.join(skipped)})" if skipped else ""
        rule = {"reference": reference, "steps": self.protocol.steps}
        if (tokenization, reference) not in found:
            return {"rule": rule, "text": f"{reference} not timed yet{why}"}
        seconds = budget_from({reference: found[(tokenization, reference)]["step_seconds"]}, reference,
                              self.protocol.steps)
        return {"rule": rule, "seconds": seconds,
                "text": f"{seconds:.4g} s: {reference}'s {self.protocol.steps} steps{why}"}

    def _estimate(self, timing: dict, steps: int) -> float:
        evaluations = -(-steps // self.protocol.eval_every) + 1
        return timing["overhead_seconds"] + steps * timing["step_seconds"] + evaluations * timing["eval_seconds"]

    def path(self, run: Run) -> Path:
        return self.out / RUNS / f"{run.name}.json"

    def status(self, run: Run) -> str:
        """"refused", "done" (recorded), "not timed" or "todo"."""
        if run.refused:
            return "refused"
        if not self.rerun and self.path(run).is_file():
            return "done"
        return "todo" if run.plan else "not timed"

    def print_plan(self, runs: Sequence[Run], budgets: Dict[str, dict]) -> None:
        self.log(f"planned runs: {len(runs)} on {self.device_name}")
        for reason in sorted({r.refused for r in runs if r.refused}):
            self.log(f"  refused: {reason}")
        for tokenization, budget in budgets.items():
            self.log(f"{tokenization}: budget {budget['text']}")
            self.log(f"  {'model':<22} {'parameters':>10} {'ms/step':>8} {'tokens/s':>10} {'steps':>6} {'tokens':>8} "
                     f"{'lr':>7} {'seed':>4} {'est. min':>8}  status  (lr rule)")
            for run in (r for r in runs if r.tokenization == tokenization):
                plan, params = run.plan or {}, run.spec.get("parameters")
                status = self.status(run)
                cells = (f"{params / 1e6:.2f}M" if params else "-",
                         f"{plan['step_seconds'] * 1e3:.2f}" if plan else "-",
                         f"{plan['tokens_per_second']:,.0f}" if plan else "-", str(plan.get("steps", "-")),
                         _count(plan["tokens"]) if plan else "-",
                         f"{plan['estimate_seconds'] / 60:.1f}" if plan and status == "todo" else "-")
                self.log(f"  {run.model:<22} {cells[0]:>10} {cells[1]:>8} {cells[2]:>10} {cells[3]:>6} {cells[4]:>8} "
                         f"{run.lr:>7g} {run.seed:>4} {cells[5]:>8}  {status}" + ("" if run.refused else f"  ({run.lr_rule})"))

    # training --------------------------------------------------------------------------------------

    def run_all(self, runs: Sequence[Run]) -> Dict[str, List[str]]:
        """Train the planned runs in order. Returns {"done", "skipped", "refused", "not_timed",
        "over_budget", "failed"}: run names."""
        from tqdm.auto import tqdm

        outcome: Dict[str, List[str]] = {k: [] for k in ("done", "skipped", "refused", "not_timed", "over_budget",
                                                         "failed")}
        bar = tqdm(runs, desc="equal time", disable=not self.progress, leave=False, dynamic_ncols=True)
        for run in bar:
            status = self.status(run)
            if status != "todo":
                outcome[{"refused": "refused", "done": "skipped", "not timed": "not_timed"}[status]].append(run.name)
                continue
            if self.deadline is not None and time.time() + run.plan["estimate_seconds"] > self.deadline:
                outcome["over_budget"].append(run.name)
                self.log(f"budget: {run.name} (~{run.plan['estimate_seconds'] / 60:.1f} min) does not fit the time "
                         "left; not started")
                continue
            kind, record = quality.attempt(lambda: self.train(run), run.name, self.log, self.device)
            outcome[kind].append(run.name)
            if kind != "done":
                continue
            self.log(f"done: {run.name}: {record['plan']['steps']} steps, held-out "
                     f"{record['final'].get('bits_per_byte', math.nan):.4f} bits per byte ({record['seconds']['total']:.0f} s)")
        bar.close()
        return outcome

    def train(self, run: Run) -> dict:
        s, p, plan = run.spec, self.protocol, run.plan
        started = time.time()
        model = self._build(s, run.seed)
        parameters = quality.count_parameters(model)
        data = self.data(run.tokenization)
        rows = data.train.to(self.device)
        order = quality.batch_order(len(rows), plan["steps"], p.batch_size, run.seed).to(self.device)
        clock = {"start": None, "eval": 0.0}
        built = time.time()

        def next_batch(step):
            if clock["start"] is None:
                self._sync()
                clock["start"] = time.perf_counter()
            batch = rows[order[step]]
            return batch, batch

        def evaluate():
            self._sync()
            began = time.perf_counter()
            metrics = quality.lm_metrics(model, data.held_out, data.byte_lengths, p.eval_batch_size)
            self._sync()
            ended = time.perf_counter()
            wall = began - clock["start"] - clock["eval"]  # training only: the evaluations so far left out
            clock["eval"] += ended - began
            return {**metrics, "wall_train_seconds": wall, "eval_seconds": ended - began}

        curve, steps_done = quality.train_loop(
            model, next_batch, evaluate, plan["steps"], run.lr, p.eval_every, p.weight_decay, p.warmup_fraction,
            deadline=self.deadline, progress=self.progress, seed=run.seed, batch_size=p.batch_size, compile=compiled(run.model),
            description=f"{run.tokenization} {run.model} lr {run.lr:g} s{run.seed} ({plan['steps']} steps)")
        self._sync()
        ended = time.time()
        for point in curve:  # the budget's clock: steps at the measured step time
            point["train_seconds"] = point["step"] * plan["step_seconds"]
        final = curve[-1] if curve else {}
        record = {
            "finished": True, "name": run.name, "tokenization": run.tokenization, "model": run.model,
            "family": run.family, "lr": run.lr, "lr_rule": run.lr_rule, "seed": run.seed, "spec": s, "plan": plan,
            "parameters": parameters, "steps_done": steps_done,
            "diverged": not math.isfinite(final.get("train_loss", math.nan)), "final": final, "curve": curve,
            "held_out_works": data.held_out_works, "held_out_rows": len(data.held_out), "train_rows": len(data.train),
            "device": self.device_name,
            "versions": quality.versions(), "git": quality.git_commit(), "command": self.command,
            "seconds": {"build": built - started, "train_and_eval": ended - built, "total": ended - started},
            "ended": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ended)),
        }
        quality.atomic_write_json(self.path(run), record)
        model = None  # the evaluation closure holds it too: drop the weights before freeing the cache
        self._free()
        return record

    def log_call(self, runs: Sequence[Run], outcome: dict, timing_outcome: dict) -> None:
        wall = quality.log_invocation(self.out, self.command, self.device_name, self.started,
                                      {**timing_outcome, **{k: len(v) for k, v in outcome.items()}},
                                      [r.refused for r in runs if r.refused])
        self.log(f"timings: {timing_outcome['timed']} made, {timing_outcome['over_budget']} over budget, "
                 f"{timing_outcome['failed']} failed; runs: {len(outcome.get('done', []))} done, "
                 f"{len(outcome.get('skipped', []))} already recorded (skipped), {len(outcome.get('refused', []))} "
                 f"refused, {len(outcome.get('not_timed', []))} not timed, {len(outcome.get('over_budget', []))} over "
                 f"budget, {len(outcome.get('failed', []))} failed; wall time {wall / 60:.1f} min")
        if outcome.get("over_budget") or outcome.get("not_timed") or timing_outcome["over_budget"]:
            self.log("rerun the same command to continue: recorded timings and runs are kept")


def _count(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:g}"


# ----------------------------------------------------------------------------- records, targets, report

def load_records(out) -> List[dict]:
    """The newest finished record of each (tokenization, model, lr, seed) under ``out/runs`` (a record of
    older MM-Rec code is superseded by a newer one)."""
    return quality.newest_records(out, lambda r: r.get("spec", {}).get("study") == "equal_time",
                                  lambda r: (r["tokenization"], r["model"], r["lr"], r["seed"]))


def _bpb(record: dict) -> float:
    value = record["final"].get("bits_per_byte", math.nan)
    return value if math.isfinite(value) else math.inf


def best_per_model(records: Sequence[dict]) -> Dict[str, Dict[str, List[dict]]]:
    """{tokenization: {model: [every seed's record at the best rate]}}: the best rate is the one with the
    lowest final bits per byte at the model's lowest seed (a lower rate on a tie), as the quality study."""
    cells: Dict[str, Dict[str, List[dict]]] = {}
    for record in records:
        cells.setdefault(record["tokenization"], {}).setdefault(record["model"], []).append(record)
    out: Dict[str, Dict[str, List[dict]]] = {}
    for tokenization, models in cells.items():
        for model, runs in models.items():
            seed = min(r["seed"] for r in runs)
            best = min((r for r in runs if r["seed"] == seed), key=lambda r: (_bpb(r), r["lr"]))
            out.setdefault(tokenization, {})[model] = sorted((r for r in runs if r["lr"] == best["lr"]),
                                                             key=lambda r: r["seed"])
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def mean_bpb(runs: Sequence[dict]) -> float:
    return _mean([_bpb(r) for r in runs])


def lowest_bpb(record: dict) -> Tuple[float, int]:
    """(the lowest held-out bits per byte among the run's evaluations, its step): chosen on the held-out works
    themselves, so an optimistic figure, alike for every model; it shows where the held-out loss rose again."""
    points = [(c["bits_per_byte"], c["step"]) for c in record["curve"] if math.isfinite(c.get("bits_per_byte", math.nan))]
    return min(points, default=(math.inf, 0))


def train_rows(record: dict, out: Path) -> int:
    """The number of training rows of ``record``'s data (recorded since the field exists, else rebuilt from its
    spec through the study's data cache)."""
    if "train_rows" in record:
        return record["train_rows"]
    s = record["spec"]
    keys = ("tokenization", "seq_len", "bpe_vocab", "validation_fraction", "max_works", "max_chars")
    return _train_rows(tuple(s[k] for k in keys), out / CACHE)


@functools.lru_cache(maxsize=None)
def _train_rows(data_spec: tuple, cache_dir: Path) -> int:
    return len(quality.lm_data(*data_spec, cache_dir=cache_dir).train)


MET, MISSED, NOT_MEASURED = "met", "missed", "not measured"


def targets(records: Sequence[dict], tokenizations: Sequence[str] = ("bytes", "bpe")) -> List[Tuple[str, str]]:
    """The issue's targets as (status, text): at equal GPU time, MM-Rec's held-out bits per byte (mean over
    the seeds at its best rate) <= each peer's, per tokenization; each side eager or compiled (any mode), whichever
    scored better. Not measured where either is missing, or where the two were planned on different
    devices or budgets (their times would not be equal)."""
    best = best_per_model(records)
    lines = []
    for tokenization in tokenizations:
        models = best.get(tokenization, {})

        def better(name):  # (the name, its runs): eager or compiled (either way), the lower mean bits per byte
            recorded = [(m, models[m]) for m in (name, *(name + suffix for suffix in SUFFIXES)) if models.get(m)]
            return min(recorded, key=lambda item: mean_bpb(item[1]), default=(name, None))

        for peer_family in ("hgrn", "gdn", "llama"):
            (mine, ours), (peer, theirs) = better(MMREC), better(peer_family)
            where = f"{tokenization}: MM-Rec ({mine}) <= {PEER_TITLES[peer_family]} ({peer}) at equal GPU time"
            if not ours or not theirs:
                missing = " and ".join(m for m, runs in ((mine, ours), (peer, theirs)) if not runs)
                lines.append((NOT_MEASURED, f"{where} (no {missing} run recorded)"))
                continue
            devices = {r["plan"]["timing_device"] for r in (*ours, *theirs)}
            budgets = {round(r["plan"]["budget_seconds"], 9) for r in (*ours, *theirs)}
            if len(devices) > 1 or len(budgets) > 1:
                lines.append((NOT_MEASURED, f"{where} (the runs were planned on different devices or budgets: "
                                            f"{', '.join(sorted(devices))}; {', '.join(f'{b:g} s' for b in sorted(budgets))})"))
                continue
            a, b = mean_bpb(ours), mean_bpb(theirs)
            lines.append((MET if a <= b else MISSED, f"{where}: {a:.4f} vs {b:.4f} bits per byte "
                                                     f"({len(ours)} and {len(theirs)} seeds)"))
    return lines


def plot_curves(best: Dict[str, Dict[str, List[dict]]], path: Path) -> None:
    """One panel per tokenization: held-out bits per byte against training seconds (steps x step time),
    one line per model (its best rate, lowest seed), the budget as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokenizations = _tokenization_order(best)
    fig, axes = plt.subplots(1, len(tokenizations), figsize=(6.5 * len(tokenizations), 4.5), squeeze=False)
    for ax, tokenization in zip(axes[0], tokenizations):
        budgets = set()
        for model in _ordered(best[tokenization]):
            record = best[tokenization][model][0]
            points = [c for c in record["curve"] if "bits_per_byte" in c]
            ax.plot([c["train_seconds"] for c in points], [c["bits_per_byte"] for c in points], "o-", markersize=3,
                    label=f"{model} (lr {record['lr']:g}, {record['plan']['steps']} steps)")
            budgets.add(record["plan"]["budget_seconds"])
        for budget in budgets:
            ax.axvline(budget, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{tokenization}: held-out bits per byte at equal GPU time", fontsize=9)
        ax.set_xlabel("training seconds (steps x measured step time)")
        ax.set_ylabel("held-out bits per byte")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _tokenization_order(names) -> List[str]:
    return sorted(names, key=lambda t: (t != "bytes", t))


def _ordered(models) -> List[str]:
    rank = {name: i for i, name in enumerate(MODELS)}
    return sorted(models, key=lambda m: (rank.get(m, len(rank)), m))


def _environment(records: Sequence[dict], out: Path) -> List[str]:
    return quality.environment_lines(records, out, "Wall time of these runs (building, training and evaluating)",
                                     (("timed", "timings made"), ("done", "runs done"), ("skipped", "skipped")))


def write_report(out) -> Optional[Path]:
    """``out``/README.md and its plot from the recorded runs; None (nothing written) without runs."""
    out = Path(out)
    records = load_records(out)
    if not records:
        return None
    best = best_per_model(records)
    lines = ["# Quality at equal GPU time (issue 27, item 4)", "",
             "Written by `research/equal_time.py --report` from the runs in `runs/` (one JSON per tokenization, model, "
             "learning rate and seed) and the timings in `timings/`. Each model's training step (the quality study's "
             "loop: the main job's Trainer, AdamW, bf16 autocast on CUDA) was timed alone on the device: the median of "
             "the timed steps after a warm-up. The budget is the reference model's time for the protocol's steps; "
             "each model trains floor(budget / its step time) steps with the warm-up + cosine schedule over its own "
             "steps, then is scored on the held-out works (bits per byte = held-out nats / ln 2 / UTF-8 bytes of the "
             f"predicted tokens, every row read from a fresh state). MM-Rec is `{MMREC}` (MMRecConfig's defaults); "
             "every model is matched to HGRN's parameter count where its FFN width allows (Gated DeltaNet at fla's "
             "own).", "", "## The issue's targets", ""]
    for status, text in targets(records):
        lines.append(f"* **{status}**: {text}")
    lines.append("")
    lines += quality.skipped_lines(records, out)
    for tokenization in _tokenization_order(best):
        models = best[tokenization]
        first = next(iter(models.values()))[0]
        s = first["spec"]
        budgets = sorted({r[0]["plan"]["budget"] for r in models.values()})
        most_passes = 0.0
        lines += [f"## {tokenization}", "",
                  f"Protocol: vocabulary {s['vocab_size']}, hidden {s['hidden_size']}, {s['layers']} layers, rows of "
                  f"{s['batch_size']} x {s['seq_len']} tokens a step, evaluated every {s['eval_every']} steps and at the "
                  f"last. Budget: {'; '.join(budgets)}.", "",
                  "| model | parameters | ms per step | tokens/s | steps | tokens | passes over the training rows | "
                  "lr: rule | held-out bits per byte (mean over seeds) | each seed | each lr (lowest seed) | "
                  "lowest held-out at an evaluation (lowest seed: step) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for model in _ordered(models):
            runs = models[model]
            r, plan = runs[0], runs[0]["plan"]
            sweep = [x for x in records if x["tokenization"] == tokenization and x["model"] == model
                     and x["seed"] == r["seed"]]
            lowest, at = lowest_bpb(r)
            passes = plan["steps"] * r["spec"]["batch_size"] / train_rows(r, out)
            most_passes = max(most_passes, passes)
            lines.append(f"| {model} | {r['parameters'] / 1e6:.2f}M | {plan['step_seconds'] * 1e3:.2f} | "
                         f"{plan['tokens_per_second']:,.0f} | {plan['steps']} | {_count(plan['tokens'])} | {passes:.1f} | "
                         f"{r['lr']:g}: {r['lr_rule']} | **{mean_bpb(runs):.4f}** | "
                         + ", ".join(f"{x['seed']}: {_bpb(x):.4f}" for x in runs) + " | "
                         + ", ".join(f"{x['lr']:g}: {_bpb(x):.4f}" for x in sorted(sweep, key=lambda x: x["lr"]))
                         + f" | {lowest:.4f}: {at} |")
        lines.append("")
        if most_passes > 1:
            lines += [f"The budget takes a model through the training rows up to {most_passes:.1f} times: a faster "
                      "model sees the same rows more often, and where its held-out loss rose again before the end "
                      "(overfitting) the last column shows it. That column is chosen on the held-out works themselves "
                      "(optimistic, alike for every model); the targets read the final figure, the protocol's.", ""]
    plot_curves(best, out / PLOT)
    lines += [f"![held-out bits per byte against training seconds]({PLOT})", ""]
    lines += _environment(records, out)
    path = out / REPORT
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- command line


def model_name(text: str) -> str:
    try:
        family_of(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--models: ")) from None
    return text


def parse_args(argv):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", type=model_name, metavar="MODEL",
                        help=f"any of {' '.join(MODELS)} or another quality.MMREC_VARIANTS name (default: those four; "
                             "--smoke: mmrec-default llama)")
    parser.add_argument("--tokenizations", nargs="+", choices=("bytes", "bpe"), help="default bytes bpe")
    parser.add_argument("--seeds", nargs="+", type=non_negative_int, default=[0], help="seeds (default 0)")
    parser.add_argument("--budget-seconds", type=positive_float,
                        help="the GPU time every model gets (default: the reference's time for the protocol's steps)")
    parser.add_argument("--reference-steps", type=positive_int,
                        help="the reference's steps that set the budget (default the protocol's 800; --smoke 8)")
    parser.add_argument("--lrs", nargs="+", type=positive_float,
                        help="a learning-rate sweep for every model (default: the best recorded rate, else 2e-3 1e-3 4e-3)")
    parser.add_argument("--lr-records", help="the quality study's output folder the rates are read from "
                                             "(default docs/quality)")
    parser.add_argument("--warmup-steps", type=positive_int, help=f"untimed steps of a timing pass (default {WARMUP_STEPS})")
    parser.add_argument("--timed-steps", type=positive_int, help=f"timed steps of a timing pass (default {TIMED_STEPS})")
    parser.add_argument("--eval-every", type=positive_int, help="evaluate every N steps (default 100)")
    parser.add_argument("--out", help="output folder (default docs/quality/equal_time; --smoke: a new temporary folder)")
    parser.add_argument("--device", type=device_type, help="cuda or cpu (default cuda when available; --smoke: cpu)")
    parser.add_argument("--smoke", action="store_true", help="a tiny protocol on CPU, seconds")
    parser.add_argument("--rerun", action="store_true", help="repeat runs already recorded and replace their records")
    parser.add_argument("--retime", action="store_true", help="measure the step times again, replacing recorded ones")
    parser.add_argument("--max-minutes", type=positive_float,
                        help="time limit of this call: no timing or run is started that would not fit in the time "
                             "left; a run still going at the limit is stopped, not saved")
    parser.add_argument("--time-only", action="store_true", help="make the missing timings and print the plan; train nothing")
    parser.add_argument("--plan", action="store_true", help="print the plan from recorded timings; time and train nothing")
    parser.add_argument("--report", action="store_true", help="write OUT/README.md and the plot from OUT/runs; train nothing")
    parser.add_argument("--threads", type=positive_int, help="CPU threads (default: the idle cores)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return parser.parse_args(argv)


def _folder(text: Optional[str], default: Path, smoke_prefix: Optional[str], name: str) -> Path:
    return quality.study_folder(text, default, smoke_prefix, name, "docs/quality/equal_time")


def protocol_for(args) -> quality.LMProtocol:
    fields = dict(SMOKE) if args.smoke else {}
    for key, value in (("tokenizations", args.tokenizations), ("steps", args.reference_steps),
                       ("eval_every", args.eval_every)):
        if value is not None:
            fields[key] = tuple(value) if isinstance(value, list) else value
    return quality.LMProtocol(**fields)


def main(argv=None) -> int:
    return run_main(lambda: _main(argv))


def _main(argv) -> int:
    args = parse_args(argv)
    if args.plan and args.time_only:
        raise ValueError("--plan and --time-only: choose one (--plan measures nothing, --time-only measures the steps)")
    out = _folder(args.out, REPOSITORY / "docs" / "quality" / "equal_time", "mmrec-equal-time-smoke-" if args.smoke else None,
                  "--out")
    if args.report:
        path = write_report(out)
        print(f"wrote {path}" if path else f"no recorded runs in {out / RUNS}: nothing to report")
        return 0
    given = list(sys.argv[1:] if argv is None else argv)
    command = "python research/equal_time.py " + " ".join(shlex.quote(a) for a in given)
    protocol = protocol_for(args)
    models = list(dict.fromkeys(args.models or ((MMREC, "llama") if args.smoke else MODELS)))
    device = args.device or ("cpu" if args.smoke else ("cuda" if torch.cuda.is_available() else "cpu"))
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device here")
    timing = SMOKE_TIMING if args.smoke else dict(warmup=WARMUP_STEPS, timed=TIMED_STEPS)
    set_threads(args.threads)
    study = EqualTime(out, protocol, device, warmup=args.warmup_steps or timing["warmup"],
                      timed=args.timed_steps or timing["timed"], budget_seconds=args.budget_seconds, rerun=args.rerun,
                      retime=args.retime, max_minutes=args.max_minutes, progress=not args.no_progress, command=command)
    lr_folder = _folder(args.lr_records, REPOSITORY / "docs" / "quality", None, "--lr-records")
    lr_records = quality.load_records(lr_folder, "lm")
    print(f"output: {out}")
    runs, _, budgets, timing_outcome = study.plan(protocol.tokenizations, models, args.seeds, args.lrs, lr_records,
                                                  measure=not args.plan)
    study.print_plan(runs, budgets)
    if args.plan:
        return 0
    outcome = study.run_all(runs) if not args.time_only else {}
    study.log_call(runs, outcome, timing_outcome)
    path = write_report(out)
    if path:
        print(f"wrote {path}")
    return 1 if outcome.get("failed") or timing_outcome["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
