"""The checkpoint folder as a Hub model: what save_pretrained writes, loading it with and without
mm_rec installed (trust_remote_code), pipeline(), the model card, and loading broken
checkpoints (see test_conformance.py for partial checkpoints)."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
from transformers.dynamic_module_utils import get_relative_import_files

import mm_rec.modeling_mmrec
from hf_common import tiny_model
from mm_rec import MMRecConfig, MMRecForCausalLM
from mm_rec.data import byte_level_tokenizer
from mm_rec.hub import is_our_card, write_model_card

TEXT = "Now is the winter of our discontent made glorious summer"
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """A tiny model with non-trivial norm weights, saved with its tokenizer; reference logits
    and a greedy continuation of TEXT written next to it."""
    path = tmp_path_factory.mktemp("checkpoint")
    model = tiny_model(tokenizer).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("readout_norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    input_ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids).logits
        generated = model.generate(input_ids, max_new_tokens=12, do_sample=False)
    reference = path.parent / "reference.pt"
    torch.save({"input_ids": input_ids, "logits": logits, "generated": generated}, reference)
    return path, model, reference


def greedy_text(reference, new_tokens: int) -> str:
    """TEXT followed by the first ``new_tokens`` tokens of the saved greedy continuation, decoded:
    what the text-generation pipeline must return."""
    expected = torch.load(reference)
    n = expected["input_ids"].shape[1]
    continuation = expected["generated"][0, n:n + new_tokens]
    assert len(continuation) == new_tokens
    return TEXT + byte_level_tokenizer().decode(continuation, skip_special_tokens=True)


def _clean_env(hf_home) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(hf_home))
    return env


def test_save_pretrained_writes_a_self_contained_folder(saved):
    path, _, _ = saved
    files = set(os.listdir(path))
    needed = {Path(f).name for f in get_relative_import_files(mm_rec.modeling_mmrec.__file__)}
    assert {"scan_triton.py", "scan.py", "hub.py", "configuration_mmrec.py", "cache.py"} <= needed
    assert needed | {"modeling_mmrec.py", WEIGHTS, "config.json", "generation_config.json", "README.md",
                     "tokenizer.json", "tokenizer_config.json"} <= files
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "mmrec"
    assert config["auto_map"] == {"AutoConfig": "configuration_mmrec.MMRecConfig",
                                  "AutoModelForCausalLM": "modeling_mmrec.MMRecForCausalLM"}
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 0 and generation["pad_token_id"] == 1
    card = (path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n- custom_code\n- mm-rec\n---\n")
    assert "trust_remote_code=True" in card and is_our_card(path / "README.md")


def test_loads_where_mm_rec_is_not_importable(saved, tmp_path):
    """A fresh interpreter without site processing (so no editable-install finder), the venv's
    site-packages only, cwd elsewhere: transformers must load everything from the folder."""
    path, _, reference = saved
    script = f"""
import sys
sys.path.append({sysconfig.get_paths()["purelib"]!r})
import importlib.util, json
assert importlib.util.find_spec("mm_rec") is None, "mm_rec must not be importable in this test"
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline
path, reference = sys.argv[1], torch.load(sys.argv[2])
config = AutoConfig.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
input_ids = tokenizer({TEXT!r}, return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(input_ids).logits
    generated = model.generate(input_ids, max_new_tokens=12, do_sample=False)
text = pipeline("text-generation", model=path, trust_remote_code=True)({TEXT!r}, max_new_tokens=5, do_sample=False)
print(json.dumps(dict(
    config_module=type(config).__module__, model_module=type(model).__module__, model_type=config.model_type,
    same_ids=torch.equal(input_ids, reference["input_ids"]),
    logit_diff=(logits - reference["logits"]).abs().max().item(),
    same_generation=torch.equal(generated, reference["generated"]),
    pipeline_text=text[0]["generated_text"],
)))
"""
    run = subprocess.run(
        [sys.executable, "-S", "-c", script, str(path), str(reference)],
        cwd=tmp_path, env=_clean_env(tmp_path / "hf_home"), capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["model_type"] == "mmrec"
    assert result["config_module"].startswith("transformers_modules.")
    assert result["model_module"].startswith("transformers_modules.")
    assert result["same_ids"] and result["same_generation"]
    assert result["logit_diff"] == 0.0
    assert result["pipeline_text"] == greedy_text(reference, new_tokens=5)


def test_loads_from_the_repo_and_through_the_auto_classes(saved, tokenizer):
    path, model, reference = saved
    expected = torch.load(reference)
    for loaded in (MMRecForCausalLM.from_pretrained(path),
                   AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)):
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(expected["input_ids"]).logits, expected["logits"], rtol=0, atol=0)
    assert isinstance(AutoTokenizer.from_pretrained(path).eos_token_id, int)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generator(TEXT, max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text == greedy_text(reference, new_tokens=4)


def test_model_card_keeps_a_user_readme(tmp_path, tokenizer):
    config = MMRecConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    user_card = tmp_path / "README.md"
    user_card.write_text("# My own notes\n")
    assert write_model_card(tmp_path, config) is False
    assert user_card.read_text() == "# My own notes\n"
    user_card.unlink()
    assert write_model_card(tmp_path, config, metrics={"eval_loss": 1.5}) is True
    assert write_model_card(tmp_path, config, metrics={"eval_loss": 1.25}) is True  # ours: rewritten
    assert "| eval_loss | 1.2500 |" in user_card.read_text()


# ----------------------------------------------------------------------------------- broken
def _broken_copy(saved, tmp_path, edit):
    path, _, _ = saved
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    edit(broken)
    return broken


def _edit_weights(fn):
    def edit(folder):
        tensors = load_file(folder / WEIGHTS)
        fn(tensors)
        save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    return edit


def _truncate(folder):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def _other_model_type(folder):
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))


BROKEN = {
    "missing layer": (_edit_weights(lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.1.")]),
                      "num_hidden_layers: the checkpoint has 1 layers, the config 2"),
    "wrong shape": (_edit_weights(lambda t: t.update({"model.layers.0.W_o.weight": torch.zeros(32, 16)})),
                    r"model.layers.0.W_o.weight \(checkpoint \(32, 16\), model \(32, 32\)\)"),
    "truncated file": (_truncate, "corrupt or truncated"),
    "config of another model type": (_other_model_type, "model_type 'llama', expected 'mmrec'"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoint_raises_naming_the_problem(saved, tmp_path, case):
    edit, message = BROKEN[case]
    broken = _broken_copy(saved, tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        MMRecForCausalLM.from_pretrained(broken)
    if case != "config of another model type":  # that folder's auto_map no longer applies
        with pytest.raises(ValueError, match=message):
            AutoModelForCausalLM.from_pretrained(broken, trust_remote_code=True)


def test_tied_head_is_not_reported_missing(saved):
    path, _, _ = saved
    assert "lm_head.weight" not in load_file(path / WEIGHTS)
    model, info = MMRecForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_ignore_mismatched_sizes_reinitialises_as_asked(saved, tmp_path):
    broken = _broken_copy(saved, tmp_path, BROKEN["wrong shape"][0])
    model, info = MMRecForCausalLM.from_pretrained(broken, ignore_mismatched_sizes=True, output_loading_info=True)
    assert [key for key, *_ in info["mismatched_keys"]] == ["model.layers.0.W_o.weight"]
    assert model.model.layers[0].W_o.weight.shape == (32, 32)


def test_register_auto_classes_resolves_mmrec_without_remote_code(tmp_path):
    """With mm_rec installed, the Auto classes map model_type "mmrec" to its classes directly."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mm_rec import MMRecConfig, MMRecForCausalLM
    from mm_rec.hub import register_auto_classes

    register_auto_classes()
    config = MMRecConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         memory_block_size=4, memory_segment_length=8, num_memory_slots=2)
    model = AutoModelForCausalLM.from_config(config)
    assert type(model) is MMRecForCausalLM
    config.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is MMRecConfig
