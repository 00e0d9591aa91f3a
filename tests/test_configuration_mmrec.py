"""mm_rec/configuration_mmrec.py: every field validated (ValueError naming it), unknown fields
refused while transformers' own are kept, the aliases (the seed's names, scan_backend), and the
round trip through config.json, old files included."""

import json
import re

import pytest
import torch
from common import VOCAB, random_ids
from transformers import AutoConfig, PretrainedConfig
from transformers.activations import ACT2FN

from mm_rec import MMRecConfig, MMRecForCausalLM


@pytest.mark.parametrize("field, value, named", [
    ("hidden_size", 33, "hidden_size"),  # not divisible by 2 heads
    ("memory_segment_length", 18, "memory_segment_length"),  # not a multiple of the block size 4
    ("recurrence_gate", "gru", "recurrence_gate"),
    ("kernel_backend", "cuda", r"kernel_backend must be one of \('auto', 'triton', 'torch'\), got 'cuda'"),
    ("hidden_act", "nope", r"hidden_act must be one of \(.*'gelu'.*'silu'.*\), got 'nope'"),
    ("hidden_act", None, "hidden_act must be one of"),
    ("vocab_size", 0, "vocab_size"),
    ("hidden_size", 0, "hidden_size"),
    ("num_hidden_layers", 0, "num_hidden_layers"),
    ("num_attention_heads", -4, "num_attention_heads"),
    ("intermediate_size", 0, "intermediate_size"),
    ("pe_dim", 0, "pe_dim"),
    ("memory_block_size", 0, "memory_block_size"),
    ("memory_segment_length", -16, "memory_segment_length"),
    ("num_memory_slots", 0, "num_memory_slots"),
    ("memory_decay", 0.0, "memory_decay"),
    ("memory_decay", 1.0, "memory_decay"),
    ("memory_decay", 1.5, "memory_decay"),
    ("dropout", -0.1, "dropout"),
    ("dropout", 1.0, "dropout"),
    ("decay_init_min", 0.0, "decay_init_min"),
    ("decay_init_max", 1.0, "decay_init_max"),
    ("decay_init_max", "0.5", "decay_init_max"),
    ("decay_init_min", 0.6, "decay_init_min"),  # above decay_init_max 0.5
    ("ffn_gate", 1, "ffn_gate"),
    ("short_conv_size", 1, "short_conv_size must be an integer, 0 .* or at least 2"),
    ("short_conv_size", -2, "short_conv_size"),
    ("short_conv_size", 4.0, "short_conv_size"),
    ("short_conv_size", "4", "short_conv_size"),
    ("short_conv_size", True, "short_conv_size"),
    ("short_conv_size", None, "short_conv_size"),
    ("short_conv_inputs", "memory", r"short_conv_inputs must be one of \('all', 'recurrence'\)"),
    ("short_conv_inputs", "Recurrence", "short_conv_inputs"),
    ("short_conv_inputs", None, "short_conv_inputs"),
])
def test_config_rejects_bad_values(field, value, named, tiny_config):
    with pytest.raises(ValueError, match=named):
        tiny_config(**{field: value})


@pytest.mark.parametrize("options", [{"output_gate": False}, {"memory_levels": "none"}])
def test_gate_memory_changes_nothing_without_a_gate_or_a_memory(options, tiny_model):
    """gate_memory (default True) extends the output gate over the memory read: with no output
    gate, or no memory read, the model is the same with it on or off (same weights, same logits)."""
    ids = random_ids((2, 19))
    on, off = tiny_model(seed=3, gate_memory=True, **options), tiny_model(seed=3, gate_memory=False, **options)
    assert on.state_dict().keys() == off.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(on(ids).logits, off(ids).logits, rtol=0, atol=0)


def test_no_convolution_whatever_its_inputs_say(tiny_config):
    """short_conv_size=0 turns the convolution off; short_conv_inputs (default "recurrence") then
    chooses nothing, so no kernel and an empty conv state either way."""
    from mm_rec.cache import LayerState

    for inputs in ("all", "recurrence"):
        config = tiny_config(short_conv_size=0, short_conv_inputs=inputs)
        model = MMRecForCausalLM(config)
        assert not any("short_conv" in name for name, _ in model.named_parameters())
        assert LayerState.config_shapes(config, 2)["conv"] == (2, 0, config.hidden_size)


def test_config_seed_aliases_and_round_trip(tmp_path):
    config = MMRecConfig(vocab_size=VOCAB, num_hidden_layers=2, memory_block_size=4, memory_segment_length=16,
                         num_memory_slots=3, model_dim=24, num_heads=3, ffn_dim=40, recurrence_gate="state",
                         use_hem=False, memory_decay=0.9, pe_dim=5, decay_init_min=0.01, decay_init_max=0.5,
                         ffn_gate=True, short_conv_size=3, short_conv_inputs="recurrence")
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (24, 3, 40)
    with pytest.raises(ValueError, match="model_dim"):
        MMRecConfig(hidden_size=32, model_dim=24)
    for seed_name in ("model_dim", "num_heads", "ffn_dim"):
        assert seed_name not in config.to_dict()
    config.save_pretrained(tmp_path)
    loaded = MMRecConfig.from_pretrained(tmp_path)
    assert loaded.model_type == "mmrec"
    fields = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "pe_dim", "hidden_act", "rms_norm_eps", "memory_block_size", "memory_segment_length",
              "num_memory_slots", "memory_decay", "recurrence_gate", "use_hem", "kernel_backend", "dropout",
              "initializer_range", "tie_word_embeddings", "decay_init_min", "decay_init_max", "ffn_gate",
              "short_conv_size", "short_conv_inputs"]
    for field in fields:
        assert getattr(loaded, field) == getattr(config, field), field


def test_every_activation_transformers_knows_is_accepted(tiny_config):
    for name in ACT2FN:
        assert tiny_config(hidden_act=name).hidden_act == name


@pytest.mark.parametrize("field, close", [("memory_blok_size", "memory_block_size"), ("hiden_size", "hidden_size"),
                                          ("scan_backends", "kernel_backend"), ("zzz_unrelated", None)])
def test_unknown_fields_are_refused_at_construction_and_named_when_loaded(field, close, tiny_config, tmp_path, caplog):
    """PretrainedConfig stores any keyword as an attribute; MMRecConfig refuses a name that is
    neither its own field nor transformers' at construction. A config.json holding one (written by
    hand, or saved from a config given an attribute later) loads with a warning naming it, the
    value kept, so that whatever save_pretrained wrote loads and saves again unchanged."""
    hint = f".*did you mean '{close}'" if close else ""
    with pytest.raises(ValueError, match=f"unknown field.*'{field}'" + hint):
        tiny_config(**{field: 3})
    config = tiny_config()
    setattr(config, field, 3)
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())[field] == 3
    for load in (MMRecConfig.from_pretrained, AutoConfig.from_pretrained):
        caplog.clear()
        with caplog.at_level("WARNING"):
            loaded = load(tmp_path)
        same = {k: v for k, v in loaded.to_dict().items() if k != "_name_or_path"}
        assert getattr(loaded, field) == 3 and same == {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
        assert re.search(f"does not use.*'{field}'" + hint, caplog.text)


# What transformers' PretrainedConfig takes, on the installed version or an earlier one, and what
# transformers, its integrations and old config files pass: accepted, and kept where transformers keeps it.
TRANSFORMERS_KWARGS = dict(
    transformers_version="5.17.0", architectures=["MMRecForCausalLM"], dtype="bfloat16", torch_dtype="float32",
    output_hidden_states=True, return_dict=False, chunk_size_feed_forward=0, is_encoder_decoder=False,
    id2label={"0": "A", "1": "B"}, problem_type="regression", name_or_path="some/where", _name_or_path="some/where",
    _commit_hash="abc", _attn_implementation_autoset=True, auto_map={"AutoConfig": "configuration_mmrec.MMRecConfig"},
    tokenizer_class="PreTrainedTokenizerFast", is_decoder=True, max_length=20, do_sample=False, num_beams=1,
    temperature=1.0, top_k=50, quantization_config={"quant_method": "bitsandbytes"},
)


def test_transformers_fields_are_accepted(tiny_config):
    config = tiny_config(**TRANSFORMERS_KWARGS)
    assert config.dtype == torch.bfloat16 and config.output_hidden_states and config.return_dict is False
    assert config.id2label == {0: "A", 1: "B"} and config.problem_type == "regression"
    assert config.architectures == ["MMRecForCausalLM"] and config.auto_map["AutoConfig"].endswith("MMRecConfig")
    assert config.quantization_config == {"quant_method": "bitsandbytes"}


def test_every_field_of_the_installed_pretrained_config_is_accepted(tiny_config):
    """Each name a default PretrainedConfig holds or writes (whatever the installed transformers
    adds) passes through MMRecConfig's constructor with its default value."""
    base = PretrainedConfig()
    for name, value in {**vars(base), **base.to_dict()}.items():
        if name in ("model_type",):  # a class attribute of MMRecConfig: config.json carries "mmrec"
            continue
        tiny_config(**{name: value})


OLD_CONFIG = {  # a checkpoint's config.json before kernel_backend (transformers 5.17, two Auto classes)
    "architectures": ["MMRecForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_mmrec.MMRecConfig", "AutoModelForCausalLM": "modeling_mmrec.MMRecForCausalLM"},
    "bos_token_id": None, "decay_init_max": 0.1, "decay_init_min": 0.001, "decode_cuda_graph": True, "dropout": 0.0,
    "dtype": "float32", "eos_token_id": 1, "ffn_gate": False, "gate_memory": False, "hidden_act": "gelu",
    "hidden_size": 32, "inference_chunk_size": 4096, "initializer_range": 0.02, "intermediate_size": 128,
    "memory_block_size": 4, "memory_decay": 0.99, "memory_levels": "slots+blocks", "memory_segment_length": 16,
    "model_type": "mmrec", "num_attention_heads": 2, "num_hidden_layers": 2, "num_memory_slots": 4,
    "output_gate": False, "pad_token_id": 0, "pe_dim": 8, "recurrence_gate": "input", "rms_norm_eps": 1e-06,
    "scan_backend": "torch", "short_conv_inputs": "all", "short_conv_size": 0, "tie_word_embeddings": True,
    "transformers_version": "5.17.0", "use_cache": True, "use_hem": True, "vocab_size": VOCAB,
}


def test_an_old_config_json_loads_with_the_same_meaning(tmp_path, tiny_model):
    """scan_backend, the former name of the backend switch, loads as kernel_backend (config.scan_backend
    still reads it), and the folder saves back without the old name; the model it builds is the
    one of today's config. Its architecture is that of the defaults before the study's choices became
    them, so this is also a checkpoint of the old defaults keeping its meaning."""
    (tmp_path / "config.json").write_text(json.dumps(OLD_CONFIG))
    config = MMRecConfig.from_pretrained(tmp_path)
    assert config.kernel_backend == "torch" and config.scan_backend == "torch"
    for name, value in OLD_CONFIG.items():
        if name not in ("scan_backend", "transformers_version", "dtype"):
            assert getattr(config, name) == value, name
    old_defaults = {name: OLD_CONFIG[name] for name in ("output_gate", "ffn_gate", "hidden_act", "pe_dim", "decay_init_max",
                                                        "short_conv_size", "short_conv_inputs", "intermediate_size")}
    model = tiny_model(seed=4, **old_defaults)
    torch.manual_seed(4)
    rebuilt = MMRecForCausalLM(config).eval()
    ids = random_ids((1, 9))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits, rtol=0, atol=0)
    config.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["kernel_backend"] == "torch" and "scan_backend" not in saved


def test_saved_config_json_holds_every_field_so_defaults_never_change_a_checkpoint(tmp_path, monkeypatch):
    """config.json names every MMRecConfig field, defaults included; a folder saved now loads as
    the same model under code whose defaults differ (simulated by changing every default)."""
    import inspect

    config = MMRecConfig()
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    own = set(inspect.signature(MMRecConfig.__init__).parameters) - {"self", "kwargs"}
    assert own <= set(saved), sorted(own - set(saved))
    other = {"output_gate": False, "ffn_gate": False, "hidden_act": "gelu", "memory_block_size": 32,
             "short_conv_size": 0, "decay_init_max": 0.1, "hidden_size": 64, "pe_dim": 16}
    defaults = list(MMRecConfig.__init__.__defaults__)
    names = [n for n in inspect.signature(MMRecConfig.__init__).parameters if n not in ("self", "kwargs")]
    monkeypatch.setattr(MMRecConfig.__init__, "__defaults__",
                        tuple(other.get(name, value) for name, value in zip(names, defaults)))
    assert MMRecConfig().output_gate is False  # the defaults did change
    loaded = MMRecConfig.from_pretrained(tmp_path)
    assert {name: getattr(loaded, name) for name in own} == {name: getattr(config, name) for name in own}


def test_scan_backend_and_kernel_backend_must_agree():
    assert MMRecConfig(scan_backend="triton").kernel_backend == "triton"
    assert MMRecConfig(scan_backend="torch", kernel_backend="torch").kernel_backend == "torch"
    with pytest.raises(ValueError, match="kernel_backend='triton' and its alias scan_backend='torch'"):
        MMRecConfig(kernel_backend="triton", scan_backend="torch")
