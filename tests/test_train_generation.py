"""scripts/generate.py and mm_rec_train/generation.py from the user's side: the command, what it
prints, the JSON it writes and the state file before and after. The models are tiny random ones
saved with the untrained byte-level tokenizer (no training needed): the references are the model
itself, recomputed over the whole token history from a fresh state."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from common import REPO, tiny_model
from safetensors.torch import load_file, save_file
from script_runs import script
from transformers import AutoModelForCausalLM

from mm_rec import MMRecCache
from mm_rec_train import generation
from mm_rec_train.data import byte_level_tokenizer

generate_script = script("generate")


def save_folder(path, seed: int, **overrides):
    """A tiny random model (weights drawn after ``torch.manual_seed(seed)``) and the byte-level
    tokenizer (EOS id 0, PAD id 1), saved as train.py saves a run."""
    tokenizer = byte_level_tokenizer()
    model = tiny_model(seed=seed, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, **overrides)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_folder(tmp_path_factory.mktemp("gen") / "model_a", seed=0)


@pytest.fixture(scope="module")
def other_folder(tmp_path_factory):
    """Another model of exactly the same shapes (other weights)."""
    return save_folder(tmp_path_factory.mktemp("gen") / "model_b", seed=1)


@pytest.fixture(scope="module")
def model(folder):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()


def run(capsys, *argv):
    """(exit status, stdout, stderr) of ``generate.py *argv``."""
    status = generate_script.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def run_json(capsys, tmp_path, *argv):
    out = tmp_path / "record.json"
    status, stdout, stderr = run(capsys, *argv, "--json", out)
    assert status == 0, stderr
    return json.loads(out.read_text()), stdout, stderr


def assert_one_line_error(result, *words):
    status, _, err = result
    err = err.strip()
    assert status == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for word in words:
        assert word in err, err


def file_stamp(path):
    return path.read_bytes(), os.stat(path).st_mtime_ns, os.stat(path).st_mode


def greedy_reference(model, ids, n, eos=None):
    """Greedy continuation recomputed from the whole history at every step (no cache)."""
    ids, new = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            new.append(int(model(torch.tensor([ids + new])).logits[0, -1].argmax()))
            if new[-1] == eos:
                break
    return new


def assert_state_is_the_history(model, path, history):
    """The saved state is the state after reading ``history`` from a fresh one: the same tensors
    (of the block summaries, the filled ones: the others are unused), and the same logits for
    the tokens that follow."""
    saved = MMRecCache.load(path, config=model.config)
    with torch.no_grad():
        fresh = model(torch.tensor([history]), use_cache=True).cache
        assert saved.position.tolist() == fresh.position.tolist() == [len(history)]
        for i, (a, b) in enumerate(zip(saved.layers, fresh.layers)):
            filled = int(b.memory.block_count[0])
            assert int(a.memory.block_count[0]) == filled, f"layer {i}"
            for name, t in b.tensors().items():
                got = a.tensors()[name]
                if name in ("block_keys", "block_values"):
                    got, t = got[:, :filled], t[:, :filled]
                torch.testing.assert_close(got, t, rtol=1e-4, atol=1e-5, msg=f"layer {i} {name}")
        probe = torch.tensor([[7, 200]])
        torch.testing.assert_close(model(probe, cache=saved).logits, model(probe, cache=fresh).logits, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------
# Generation through generate(): the flags, the stream, the seed
# ---------------------------------------------------------------------------------------


def test_greedy_prints_the_prompt_and_the_likeliest_continuation(folder, model, tmp_path, capsys):
    record, out, err = run_json(capsys, tmp_path, folder, "--prompt", "ROMEO.", "--greedy", "--max-new-tokens", "12")
    tokenizer = byte_level_tokenizer()
    assert record["prompt_ids"] == tokenizer("ROMEO.")["input_ids"]
    assert record["generated_ids"] == greedy_reference(model, record["prompt_ids"], 12)
    assert out == "ROMEO." + tokenizer.decode(record["generated_ids"], skip_special_tokens=True) + "\n"
    assert err == ""  # no warning from transformers about the generation flags


@pytest.mark.parametrize("flags", [["--top-k", "1"], ["--top-p", "1e-6"], ["--temperature", "1e-4", "--top-k", "0"]],
                         ids=["top-k 1", "top-p 1e-6", "temperature 1e-4"])
def test_sampling_flags_that_leave_one_token_give_the_greedy_text(flags, folder, tmp_path, capsys):
    """Sampling restricted to the likeliest token by --top-k, --top-p or a vanishing --temperature
    is greedy search, whatever the seed: each flag reaches the sampler."""
    prompt = ["--prompt", "To be", "--max-new-tokens", "16"]
    greedy, _, _ = run_json(capsys, tmp_path, folder, *prompt, "--greedy")
    for seed in ("0", "1"):
        sampled, _, _ = run_json(capsys, tmp_path, folder, *prompt, *flags, "--seed", seed)
        assert sampled["generated_ids"] == greedy["generated_ids"]


def test_sampling_is_seeded_and_an_empty_prompt_starts_a_document(folder, tmp_path, capsys):
    runs = []
    for seed in (3, 3, 4):
        record, out, _ = run_json(capsys, tmp_path, folder, "--prompt", "", "--max-new-tokens", "16", "--seed", seed,
                                  "--top-p", "0.9", "--temperature", "1.5")
        runs.append((record, out))
    assert runs[0][0]["prompt_ids"] == [byte_level_tokenizer().eos_token_id]
    assert runs[0] == runs[1]  # the same ids and the same printed text on a rerun
    assert runs[0][0]["generated_ids"] != runs[2][0]["generated_ids"]


def test_sampling_config_maps_the_flags_onto_the_folders_generation_config(folder, model):
    tokenizer = byte_level_tokenizer()
    sampled = generation.sampling_config(model, tokenizer, 7, temperature=0.5, top_k=3, top_p=0.25)
    assert (sampled.do_sample, sampled.temperature, sampled.top_k, sampled.top_p) == (True, 0.5, 3, 0.25)
    assert (sampled.max_new_tokens, sampled.num_beams, sampled.eos_token_id, sampled.pad_token_id) == (7, 1, 0, 1)
    assert generation.sampling_config(model, tokenizer, 7, greedy=True).do_sample is False
    assert model.generation_config.max_new_tokens != 7  # the model's own config is left as it was


def test_the_end_of_run_sample_is_seeded_and_leaves_the_callers_random_state(model):
    tokenizer = byte_level_tokenizer()
    config = generation.sampling_config(model, tokenizer, 10, temperature=2.0, top_k=0)
    before = torch.random.get_rng_state()
    first, _ = generation.generate(model, [5, 6, 7], config, seed=11)
    assert torch.equal(torch.random.get_rng_state(), before)
    again, _ = generation.generate(model, [5, 6, 7], config, seed=11)
    other, _ = generation.generate(model, [5, 6, 7], config, seed=12)
    assert first == again != other


# ---------------------------------------------------------------------------------------
# --state: continuing exactly, the separator, the EOS
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("separator", [None, "", " | "], ids=["default newline", "glued", "custom"])
def test_state_continues_exactly_as_feeding_the_whole_conversation(separator, folder, model, tmp_path, capsys):
    tokenizer = byte_level_tokenizer()
    state = tmp_path / "chat.safetensors"
    turn1, _, err = run_json(capsys, tmp_path, folder, "--prompt", "ROMEO.", "--greedy", "--max-new-tokens", "12",
                             "--state", state)
    history = turn1["prompt_ids"] + turn1["generated_ids"]
    assert len(turn1["generated_ids"]) == 12 and f"state after {len(history)} tokens" in err
    assert_state_is_the_history(model, state, history)  # stopped at --max-new-tokens: it read every token printed

    joined = ["--separator", separator] if separator is not None else []
    turn2, out, _ = run_json(capsys, tmp_path, folder, "--prompt", "JULIET. And", "--greedy", "--max-new-tokens", "12",
                             "--state", state, *joined)
    read = ("\n" if separator is None else separator) + "JULIET. And"
    assert turn2["read"] == read and turn2["prompt_ids"] == tokenizer(read, add_special_tokens=False)["input_ids"]
    assert out == read + tokenizer.decode(turn2["generated_ids"], skip_special_tokens=True) + "\n"
    history += turn2["prompt_ids"]
    assert turn2["generated_ids"] == greedy_reference(model, history, 12)
    assert_state_is_the_history(model, state, history + turn2["generated_ids"])
    assert turn2["stream_tokens"] == len(history) + 12


def test_state_after_eos_has_read_the_eos_and_the_next_turn_gets_no_separator(folder, model, tmp_path, capsys):
    """A folder whose generation config ends text at a token the model produces a few tokens in."""
    tokenizer = byte_level_tokenizer()
    prompt = tokenizer("ROMEO.")["input_ids"]
    free = greedy_reference(model, prompt, 12)
    k = next(i for i in range(1, 12) if free[i] not in free[:i])  # the first token the model has not produced before
    eos_folder = tmp_path / "eos_model"
    shutil.copytree(folder, eos_folder)
    config_file = eos_folder / "generation_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "eos_token_id": free[k]}))

    state = tmp_path / "chat.safetensors"
    turn1, _, _ = run_json(capsys, tmp_path, eos_folder, "--prompt", "ROMEO.", "--greedy", "--max-new-tokens", "12",
                           "--state", state)
    assert turn1["generated_ids"] == free[:k + 1]  # stopped at the EOS, which it printed
    assert_state_is_the_history(model, state, prompt + free[:k + 1])

    turn2, out, _ = run_json(capsys, tmp_path, eos_folder, "--prompt", "JULIET.", "--greedy", "--max-new-tokens", "5",
                             "--state", state)
    assert turn2["prompt_ids"] == tokenizer("JULIET.", add_special_tokens=False)["input_ids"]  # no newline before it
    assert out.startswith("JULIET.")
    history = prompt + free[:k + 1] + turn2["prompt_ids"]
    assert turn2["generated_ids"] == greedy_reference(model, history, 5, eos=free[k])


def test_state_files_get_the_mode_of_any_new_file_and_keep_a_replaced_ones(folder, tmp_path, capsys):
    state = tmp_path / "chat.safetensors"
    old = os.umask(0o027)
    try:
        assert run(capsys, folder, "--prompt", "a", "--max-new-tokens", "2", "--state", state)[0] == 0
    finally:
        os.umask(old)
    assert oct(os.stat(state).st_mode & 0o777) == oct(0o640)
    os.chmod(state, 0o604)
    assert run(capsys, folder, "--prompt", "b", "--max-new-tokens", "2", "--state", state)[0] == 0
    assert oct(os.stat(state).st_mode & 0o777) == oct(0o604)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.safetensors"]  # no temporary left


# ---------------------------------------------------------------------------------------
# --state files that are refused, unchanged
# ---------------------------------------------------------------------------------------


def test_state_of_another_model_of_the_same_shapes_is_refused_unchanged(folder, other_folder, tmp_path, capsys):
    state = tmp_path / "chat.safetensors"
    assert run(capsys, folder, "--prompt", "ROMEO.", "--max-new-tokens", "4", "--state", state)[0] == 0
    before = file_stamp(state)
    assert_one_line_error(run(capsys, other_folder, "--prompt", "x", "--state", state), "--state", "another model",
                          str(folder.resolve()))
    assert file_stamp(state) == before

    # the same weights with one config field changed is another model too
    eps_folder = tmp_path / "eps_model"
    shutil.copytree(folder, eps_folder)
    config = json.loads((eps_folder / "config.json").read_text())
    (eps_folder / "config.json").write_text(json.dumps({**config, "rms_norm_eps": config["rms_norm_eps"] * 10}))
    assert_one_line_error(run(capsys, eps_folder, "--prompt", "x", "--state", state), "--state", "another model")
    assert file_stamp(state) == before

    # a copy of the model elsewhere is the same model: it continues the stream
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    assert run(capsys, moved, "--prompt", "x", "--max-new-tokens", "2", "--state", state)[0] == 0
    assert file_stamp(state)[0] != before[0]


def test_state_that_records_no_model_is_refused_unchanged(folder, model, tmp_path, capsys):
    state = tmp_path / "python.safetensors"
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), use_cache=True).cache.save(state)  # MMRecCache.save from Python
    before = file_stamp(state)
    assert_one_line_error(run(capsys, folder, "--prompt", "x", "--state", state), "--state", "records no model")
    assert file_stamp(state) == before


def test_state_that_is_a_folder_is_a_one_line_error(folder, tmp_path, capsys):
    target = tmp_path / "a_folder"
    target.mkdir()
    (target / "kept.txt").write_text("mine")
    assert_one_line_error(run(capsys, folder, "--prompt", "x", "--state", target),
                          f"--state {target}: is a folder, expected a file")
    assert [p.name for p in target.iterdir()] == ["kept.txt"]


def test_state_with_nan_is_refused_unchanged(folder, tmp_path, capsys):
    state = tmp_path / "chat.safetensors"
    assert run(capsys, folder, "--prompt", "ROMEO.", "--max-new-tokens", "4", "--state", state)[0] == 0
    meta = MMRecCache.load_metadata(state)
    tensors = load_file(state)
    tensors["layers.1.h"][0, 3] = float("nan")
    save_file(tensors, state, metadata=meta)
    before = file_stamp(state)
    for flags in (["--seed", "2"], ["--greedy"]):
        assert_one_line_error(run(capsys, folder, "--prompt", "x", "--state", state, *flags), "--state", "layer 1 h",
                              "NaN")
        assert file_stamp(state) == before


# ---------------------------------------------------------------------------------------
# Broken models, bad flags: one line
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, named", [(float("nan"), "its weights hold NaN or inf (model.norm.weight)"),
                                          (3e38, "although its weights and the state it started from are finite")],
                         ids=["NaN weight", "overflow"])
def test_non_finite_logits_are_a_one_line_error_naming_the_cause(value, named, folder, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"][:] = value
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    state = tmp_path / "chat.safetensors"
    for flags in (["--seed", "1"], ["--greedy"], ["--state", state]):
        assert_one_line_error(run(capsys, broken, "--prompt", "ROMEO.", *flags), "non-finite logits", named)
    assert not state.exists()  # nothing saved from a failed generation


def test_prompt_that_is_not_utf8_is_a_one_line_error(folder, tmp_path, capsys):
    text = os.fsdecode(b"caf\xe9")  # what Python makes of the argument $'caf\xe9'
    assert_one_line_error(run(capsys, folder, "--prompt", text), "--prompt", "UTF-8", "0xe9")
    assert_one_line_error(run(capsys, folder, "--prompt", "x", "--separator", text), "--separator", "UTF-8")


@pytest.mark.slow
def test_prompt_that_is_not_utf8_from_the_shell(folder):
    """The raw bytes on the command line, as a shell passes $'caf\\xe9'."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "generate.py"), str(folder), b"--prompt", b"caf\xe9"],
                          capture_output=True, env=env, timeout=300)
    err = done.stderr.decode(errors="replace").strip()
    assert done.returncode == 2 and done.stdout == b"", err
    assert err.splitlines() == [err] and err.startswith("error: argument --prompt") and "0xe9" in err, err


def test_bad_flags_are_one_line_errors(folder, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    cases = [
        (["--max-new-tokens", "0"], "--max-new-tokens"), (["--temperature", "0"], "--temperature"),
        (["--temperature", "nan"], "--temperature"), (["--top-p", "1.5"], "--top-p"), (["--top-k", "-1"], "--top-k"),
        (["--state", corrupt, "--prompt", "x"], "cannot read an MMRecCache"),
        (["--state", tmp_path / "no" / "dir.st"], "--state"),
    ]
    for flags, named in cases:
        assert_one_line_error(run(capsys, folder, *flags), named)
    assert_one_line_error(run(capsys, tmp_path / "nothing"), "not a saved model folder")
    assert corrupt.read_bytes() == b"\x00" * 64

    state = tmp_path / "chat.safetensors"
    assert run(capsys, folder, "--prompt", "a", "--max-new-tokens", "2", "--state", state)[0] == 0
    assert_one_line_error(run(capsys, folder, "--prompt", "", "--state", state), "--prompt is empty")


def test_help_says_how_turns_are_joined(capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate_script.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--separator" in text and "a newline" in text and "nothing is inserted after an EOS" in text
    assert "GenerationConfig" in text and "continue_stream" in text


@pytest.mark.gpu
def test_the_scripts_load_the_model_onto_the_gpu(folder):
    from mm_rec_train.cli import load_model_folder

    model, _ = load_model_folder(folder)
    assert model.device.type == "cuda" and not model.training
