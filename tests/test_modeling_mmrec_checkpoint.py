"""A checkpoint folder of mm_rec/modeling_mmrec.py as a Hub model: what save_pretrained writes,
loading it with and without mm_rec installed (trust_remote_code), the Auto classes, pipeline(),
the tokenizer, and partial checkpoints (the missing tensors initialised by _init_weights).
Checkpoints that do not fit: test_loading.py."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from common import REPO, fresh_process, random_ids, tokenizer_fields
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
from transformers.dynamic_module_utils import get_relative_import_files

import mm_rec.modeling_mmrec
from mm_rec import MMRecForCausalLM, MMRecModel
from mm_rec.hem import projection_layout
from mm_rec.hub import is_our_card
from mm_rec_train.data import byte_level_tokenizer

TEXT = "Now is the winter of our discontent made glorious summer"
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer, tiny_model):
    """A tiny model with non-trivial norm weights, saved with its tokenizer; reference logits
    and a greedy continuation of TEXT written next to it."""
    path = tmp_path_factory.mktemp("checkpoint")
    model = tiny_model(seed=0, **tokenizer_fields(tokenizer))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("readout_norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    input_ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids).logits
        hidden = model.model(input_ids).last_hidden_state
        generated = model.generate(input_ids, max_new_tokens=12, do_sample=False)
    reference = path.parent / "reference.pt"
    torch.save({"input_ids": input_ids, "logits": logits, "hidden": hidden, "generated": generated}, reference)
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


AUTO_MAP = {"AutoConfig": "configuration_mmrec.MMRecConfig", "AutoModel": "modeling_mmrec.MMRecModel",
            "AutoModelForCausalLM": "modeling_mmrec.MMRecForCausalLM"}


def test_save_pretrained_writes_a_self_contained_folder(saved):
    path, _, _ = saved
    files = set(os.listdir(path))
    needed = {Path(f).name for f in get_relative_import_files(mm_rec.modeling_mmrec.__file__)}
    assert {"scan_triton.py", "scan.py", "hub.py", "configuration_mmrec.py", "cache.py"} <= needed
    assert needed | {"modeling_mmrec.py", WEIGHTS, "config.json", "generation_config.json", "README.md",
                     "tokenizer.json", "tokenizer_config.json"} <= files
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "mmrec"
    assert config["auto_map"] == AUTO_MAP
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 0 and generation["pad_token_id"] == 1
    card = (path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n"
                           "tags:\n- custom_code\n- mm-rec\n---\n")
    assert "trust_remote_code=True" in card and is_our_card(path / "README.md")


def test_saving_either_model_names_every_auto_class(tiny_model, tmp_path):
    """The base model's folder, like the causal LM's, names all three Auto classes."""
    model = tiny_model()
    model.model.save_pretrained(tmp_path / "base")
    assert json.loads((tmp_path / "base" / "config.json").read_text())["auto_map"] == AUTO_MAP


# The start of a script run with `python -S` (no site processing, so no editable-install finder): the
# venv's site-packages only, and a check that `import mm_rec` fails there.
WITHOUT_MM_REC = f"""
import sys
sys.path.append({sysconfig.get_paths()["purelib"]!r})
try:
    import mm_rec
except ImportError:
    pass
else:
    raise SystemExit(f"mm_rec must not be importable in this test, found {{mm_rec.__file__}}")
"""


def test_loads_where_mm_rec_is_not_importable(saved, tmp_path):
    """A fresh interpreter without site processing (so no editable-install finder), the venv's
    site-packages only, no PYTHONPATH, cwd elsewhere, where `import mm_rec` fails: transformers must
    load everything from the folder, through each Auto class of its auto_map, giving the outputs of
    the model that was saved."""
    path, _, reference = saved
    script = WITHOUT_MM_REC + f"""
import json
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, pipeline
path, reference = sys.argv[1], torch.load(sys.argv[2])
config = AutoConfig.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
base = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
input_ids = tokenizer({TEXT!r}, return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(input_ids).logits
    hidden = base(input_ids).last_hidden_state
    generated = model.generate(input_ids, max_new_tokens=12, do_sample=False)
text = pipeline("text-generation", model=path, trust_remote_code=True)({TEXT!r}, max_new_tokens=5, do_sample=False)
print(json.dumps(dict(
    config_class=type(config).__module__ + "." + type(config).__name__,
    model_class=type(model).__module__ + "." + type(model).__name__,
    base_class=type(base).__module__ + "." + type(base).__name__, model_type=config.model_type,
    same_ids=torch.equal(input_ids, reference["input_ids"]),
    logit_diff=(logits - reference["logits"]).abs().max().item(),
    hidden_diff=(hidden - reference["hidden"]).abs().max().item(),
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
    for key, name in (("config_class", "configuration_mmrec.MMRecConfig"), ("model_class", "modeling_mmrec.MMRecForCausalLM"),
                      ("base_class", "modeling_mmrec.MMRecModel")):
        assert result[key].startswith("transformers_modules.") and result[key].endswith("." + name), result[key]
    assert result["same_ids"] and result["same_generation"]
    assert result["logit_diff"] == 0.0 and result["hidden_diff"] == 0.0
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


def test_base_model_loads_from_the_causal_lm_checkpoint(tiny_checkpoint):
    """The head-less MMRecModel takes the `model.` tensors of a causal-LM checkpoint."""
    base = MMRecModel.from_pretrained(tiny_checkpoint)
    full = MMRecForCausalLM.from_pretrained(tiny_checkpoint)
    ids = random_ids((1, 11))
    with torch.no_grad():
        torch.testing.assert_close(base(ids).last_hidden_state, full.model(ids).last_hidden_state, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# Partial checkpoints: the missing tensors initialised as __init__ would
# ---------------------------------------------------------------------------------------

def _copy_without(checkpoint, folder, dropped):
    shutil.copytree(checkpoint, folder)
    tensors = load_file(folder / WEIGHTS)
    for key in dropped:
        tensors.pop(key)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    return folder


PARTIAL = ["model.layers.1.ffn.up.weight", "model.layers.0.mdi.W_E.bias", "model.layers.0.hem.W_fused.bias",
           "model.layers.1.memory.slot_values"]


AUTO_LOAD_SCRIPT = """
    import json, sys
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, output_loading_info=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, sys.argv[2])
    print(json.dumps(dict(module=type(model).__module__, missing=sorted(info["missing_keys"]),
                          others=sorted(info["unexpected_keys"]) + sorted(k for k, *_ in info["mismatched_keys"]))))
"""


@pytest.mark.parametrize("loader", ["package", "auto_remote_code"])
def test_partial_checkpoint_initialises_exactly_the_missing_tensors(tiny_checkpoint, tmp_path, loader, tiny_model):
    """Missing tensors are reported and initialised as __init__ would (the deterministic ones
    equal a fresh model's, the random ones follow the init distribution); every loaded tensor,
    including the other parameter of a half-loaded Linear, is the checkpoint's. The checkpoint's
    own code (trust_remote_code, in a process where mm_rec's registration cannot take over) too."""
    folder = _copy_without(tiny_checkpoint, tmp_path / "partial", PARTIAL)
    checkpoint = load_file(folder / WEIGHTS)
    if loader == "package":
        model, info = MMRecForCausalLM.from_pretrained(folder, output_loading_info=True)
        params = {k: v.detach() for k, v in model.state_dict().items()}
        missing, others = sorted(info["missing_keys"]), [*info["unexpected_keys"], *info["mismatched_keys"]]
    else:
        result = fresh_process(AUTO_LOAD_SCRIPT, folder, tmp_path / "loaded.safetensors", tmp_path=tmp_path)
        assert result["module"].startswith("transformers_modules.")
        params, missing, others = load_file(tmp_path / "loaded.safetensors"), result["missing"], result["others"]
    assert missing == sorted(PARTIAL) and not others
    for key, tensor in checkpoint.items():
        torch.testing.assert_close(params[key], tensor, rtol=0, atol=0, msg=key)
    fresh = tiny_model(seed=123).state_dict()
    torch.testing.assert_close(params["model.layers.0.mdi.W_E.bias"], fresh["model.layers.0.mdi.W_E.bias"], rtol=0, atol=0)
    width = sum(w for _, w in projection_layout(tiny_model().config))  # q, k, v, z, g~, o: 32 each; p
    assert width == 7 * 32 and torch.equal(params["model.layers.0.hem.W_fused.bias"], torch.zeros(width))
    up = params["model.layers.1.ffn.up.weight"]  # N(0, initializer_range): 96 x 32 draws
    assert abs(up.mean().item()) < 0.002 and abs(up.std().item() / 0.02 - 1) < 0.05
    slots = params["model.layers.1.memory.slot_values"]  # N(0, 1)
    assert torch.isfinite(slots).all() and 0.5 < slots.std().item() < 1.5
    assert not torch.equal(slots, fresh["model.layers.1.memory.slot_values"])  # drawn, not copied


def test_init_weights_on_a_half_loaded_linear_touches_only_the_unloaded_parameter(tiny_model):
    """_init_weights applied to a module whose weight is flagged loaded: the weight keeps its
    value bit for bit, the bias gets __init__'s value."""
    model = tiny_model()
    linear = model.model.layers[0].mdi.W_E
    with torch.no_grad():
        linear.weight.fill_(3.0)
        linear.bias.fill_(7.0)
    linear.weight._is_hf_initialized = True
    model._init_weights(linear)
    assert torch.equal(linear.weight, torch.full_like(linear.weight, 3.0))
    assert torch.equal(linear.bias, tiny_model(seed=5).model.layers[0].mdi.W_E.bias)


# ---------------------------------------------------------------------------------------
# Auto classes and the tokenizer without remote code
# ---------------------------------------------------------------------------------------

def test_import_registers_the_auto_classes_for_a_folder_without_auto_map(tiny_checkpoint, tmp_path):
    folder = tmp_path / "no_auto_map"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))
    for name in os.listdir(folder):
        if name.endswith(".py"):
            os.remove(folder / name)
    result = fresh_process("""
        import json, sys, torch
        import mm_rec
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
        path = sys.argv[1]
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        ids = torch.arange(2, 13)[None]
        with torch.no_grad():
            logits = model(ids).logits
            reference = mm_rec.MMRecForCausalLM.from_pretrained(path).eval()(ids).logits
        print(json.dumps(dict(config=type(AutoConfig.from_pretrained(path)).__module__,
                              causal=type(model).__module__ + "." + type(model).__name__,
                              base=type(AutoModel.from_pretrained(path)).__name__,
                              diff=(logits - reference).abs().max().item())))
    """, folder, tmp_path=tmp_path)
    assert result["config"] == "mm_rec.configuration_mmrec"
    assert result["causal"] == "mm_rec.modeling_mmrec.MMRecForCausalLM"
    assert result["base"] == "MMRecModel" and result["diff"] == 0.0


def test_import_maps_the_auto_classes_to_mmrec_without_remote_code(tmp_path, tiny_config):
    """Importing mm_rec registers model_type "mmrec" with the Auto classes: from_config and a
    saved config resolve to the package's classes directly."""
    from transformers import AutoConfig, AutoModel

    from mm_rec import MMRecConfig

    config = tiny_config(num_hidden_layers=1)
    assert type(AutoModelForCausalLM.from_config(config)) is MMRecForCausalLM
    assert type(AutoModel.from_config(config)) is MMRecModel
    config.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is MMRecConfig


TOKENIZER_SCRIPT = """
    import json, sys, time
    {imports}
    from transformers import AutoTokenizer
    start = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1]{kwargs})
    print(json.dumps(dict(seconds=time.monotonic() - start, ids=tokenizer("To be, or not to be").input_ids,
                          eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)))
"""


@pytest.mark.parametrize("imports,kwargs", [("import mm_rec", ""), ("", ", trust_remote_code=True"),
                                            ("", ", trust_remote_code=False")])
def test_tokenizer_of_a_checkpoint_loads_without_asking(tiny_checkpoint, tmp_path, imports, kwargs):
    """stdin closed: transformers' remote-code question would be printed and answered by EOF.
    AutoTokenizer reads the folder's config.json first (transformers 5.x); with mm_rec imported the
    config class is registered locally, so nothing is asked; a process without mm_rec must say
    trust_remote_code (True, as the model card does, or False: the tokenizer needs no remote code)."""
    from mm_rec_train.data import byte_level_tokenizer

    folder = tmp_path / "with_tokenizer"
    shutil.copytree(tiny_checkpoint, folder)
    tokenizer = byte_level_tokenizer()
    tokenizer.save_pretrained(folder)
    result = fresh_process(TOKENIZER_SCRIPT.format(imports=imports, kwargs=kwargs), folder, tmp_path=tmp_path,
                           stdin=subprocess.DEVNULL, timeout=120)
    assert "Do you wish to run the custom code" not in result["_output"]
    assert result["ids"] == tokenizer("To be, or not to be").input_ids
    assert (result["eos"], result["pad"]) == (tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_the_readme_loading_lines_run_without_a_question_where_mm_rec_is_not_importable(saved, tmp_path):
    """The README's Python lines that load a saved folder, taken from the README itself, in a fresh
    interpreter where `import mm_rec` fails and stdin is closed: transformers neither asks whether to
    run the folder's code nor falls back to a generic config, and the tokenizer encodes as saved."""
    path, _, reference = saved
    readme = (REPO / "README.md").read_text()
    block = next(b for b in readme.split("```python")[1:] if "AutoTokenizer.from_pretrained" in b).split("```")[0]
    lines = "\n".join(line for line in block.splitlines() if line.strip()).replace('"runs/laptop"', "sys.argv[1]")
    script = WITHOUT_MM_REC + f"""
import json, torch
{lines}
ids = tok({TEXT!r}, return_tensors="pt").input_ids
print(json.dumps(dict(model=type(model).__name__, ids=ids.tolist())))
"""
    run = subprocess.run([sys.executable, "-S", "-c", script, str(path)], cwd=tmp_path, env=_clean_env(tmp_path / "hf"),
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "custom code" not in run.stdout + run.stderr and "model of type" not in run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["model"] == "MMRecForCausalLM"
    assert result["ids"] == torch.load(reference)["input_ids"].tolist()
