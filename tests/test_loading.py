"""mm_rec/loading.py: a checkpoint that does not fit the config is refused, naming the config
field (layers, widths, layer layout) or the problem (corrupt file, another model type), through
the package and through the Auto classes; ignore_mismatched_sizes re-initialises as asked; the
tied head is not reported missing."""

import json
import shutil

import pytest
import torch
from common import VOCAB
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from mm_rec import MMRecForCausalLM, MMRecModel

WEIGHTS = "model.safetensors"


@pytest.mark.parametrize("saved_layers,config_layers", [(4, 2), (2, 4), (3, 2)])
def test_checkpoint_with_another_layer_count_is_refused(tmp_path, saved_layers, config_layers, tiny_model):
    tiny_model(num_hidden_layers=saved_layers).save_pretrained(tmp_path / "model")
    message = f"num_hidden_layers: the checkpoint has {saved_layers} layers, the config {config_layers}"
    with pytest.raises(ValueError, match=message):
        MMRecForCausalLM.from_pretrained(tmp_path / "model", num_hidden_layers=config_layers)
    with pytest.raises(ValueError, match=message):
        MMRecModel.from_pretrained(tmp_path / "model", num_hidden_layers=config_layers)


def test_checkpoint_of_another_width_names_hidden_size(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"hidden_size: model\.embed_tokens\.weight \(checkpoint \(64, 32\), model \(64, 48\)\)"):
        MMRecForCausalLM.from_pretrained(tiny_checkpoint, hidden_size=48, intermediate_size=128, pe_dim=8)
    model, info = MMRecForCausalLM.from_pretrained(tiny_checkpoint, hidden_size=48, intermediate_size=128, pe_dim=8,
                                                   ignore_mismatched_sizes=True, output_loading_info=True)
    assert "model.embed_tokens.weight" in [key for key, *_ in info["mismatched_keys"]]
    assert model.model.embed_tokens.weight.shape == (VOCAB, 48)


def test_checkpoint_of_another_layer_layout_names_use_hem(tiny_checkpoint):
    with pytest.raises(ValueError, match="use_hem"):
        MMRecForCausalLM.from_pretrained(tiny_checkpoint, use_hem=False)


# ---------------------------------------------------------------------------------------
# Broken checkpoints
# ---------------------------------------------------------------------------------------

def _broken_copy(checkpoint, tmp_path, edit):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
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
def test_broken_checkpoint_raises_naming_the_problem(tiny_checkpoint, tmp_path, case):
    edit, message = BROKEN[case]
    broken = _broken_copy(tiny_checkpoint, tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        MMRecForCausalLM.from_pretrained(broken)
    if case != "config of another model type":  # that folder's auto_map no longer applies
        with pytest.raises(ValueError, match=message):
            AutoModelForCausalLM.from_pretrained(broken, trust_remote_code=True)


def test_tied_head_is_not_reported_missing(tiny_checkpoint):
    assert "lm_head.weight" not in load_file(tiny_checkpoint / WEIGHTS)
    model, info = MMRecForCausalLM.from_pretrained(tiny_checkpoint, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_ignore_mismatched_sizes_reinitialises_as_asked(tiny_checkpoint, tmp_path):
    broken = _broken_copy(tiny_checkpoint, tmp_path, BROKEN["wrong shape"][0])
    model, info = MMRecForCausalLM.from_pretrained(broken, ignore_mismatched_sizes=True, output_loading_info=True)
    assert [key for key, *_ in info["mismatched_keys"]] == ["model.layers.0.W_o.weight"]
    assert model.model.layers[0].W_o.weight.shape == (32, 32)
