"""mm_rec/configuration_mmrec.py: every field validated (ValueError naming it), the seed's
aliases, and the round trip through config.json."""

import pytest
from common import VOCAB

from mm_rec import MMRecConfig


@pytest.mark.parametrize("field, value, named", [
    ("hidden_size", 33, "hidden_size"),  # not divisible by 2 heads
    ("memory_segment_length", 18, "memory_segment_length"),  # not a multiple of the block size 4
    ("recurrence_gate", "gru", "recurrence_gate"),
    ("scan_backend", "cuda", "scan_backend"),
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
    ("decay_init_min", 0.5, "decay_init_min"),  # above decay_init_max 0.1
    ("ffn_gate", 1, "ffn_gate"),
    ("gate_memory", True, "output_gate=True"),  # no output gate to extend
    ("short_conv_size", 1, "short_conv_size must be an integer, 0 .* or at least 2"),
    ("short_conv_size", -2, "short_conv_size"),
    ("short_conv_size", 4.0, "short_conv_size"),
    ("short_conv_size", "4", "short_conv_size"),
    ("short_conv_size", True, "short_conv_size"),
    ("short_conv_size", None, "short_conv_size"),
    ("short_conv_inputs", "memory", r"short_conv_inputs must be one of \('all', 'recurrence'\)"),
    ("short_conv_inputs", "Recurrence", "short_conv_inputs"),
    ("short_conv_inputs", None, "short_conv_inputs"),
    ("short_conv_inputs", "recurrence", "short_conv_inputs='recurrence'.*short_conv_size >= 2"),  # no conv to place
])
def test_config_rejects_bad_values(field, value, named, tiny_config):
    with pytest.raises(ValueError, match=named):
        tiny_config(**{field: value})


def test_gate_memory_needs_a_memory(tiny_config):
    with pytest.raises(ValueError, match="memory_levels"):
        tiny_config(output_gate=True, gate_memory=True, memory_levels="none")


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
              "num_memory_slots", "memory_decay", "recurrence_gate", "use_hem", "scan_backend", "dropout",
              "initializer_range", "tie_word_embeddings", "decay_init_min", "decay_init_max", "ffn_gate",
              "short_conv_size", "short_conv_inputs"]
    for field in fields:
        assert getattr(loaded, field) == getattr(config, field), field
