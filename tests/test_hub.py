"""mm_rec/hub.py: the model card (written into a folder unless a user's README is there,
rewritten when it is ours) and the LoRA target module names (every Linear of a block but the
decay generator's, in the fused and the unfused layout)."""

import pytest
import torch

from mm_rec import LORA_TARGET_MODULES, LORA_TARGET_MODULES_UNFUSED, MMRecForCausalLM
from mm_rec.hub import is_our_card, write_model_card


def test_model_card_keeps_a_user_readme(tmp_path, tiny_config):
    config = tiny_config(num_hidden_layers=1)
    user_card = tmp_path / "README.md"
    user_card.write_text("# My own notes\n")
    assert write_model_card(tmp_path, config) is False
    assert user_card.read_text() == "# My own notes\n"
    user_card.unlink()
    assert write_model_card(tmp_path, config, metrics={"eval_loss": 1.5}) is True
    assert write_model_card(tmp_path, config, metrics={"eval_loss": 1.25}) is True  # ours: rewritten
    assert "| eval_loss | 1.2500 |" in user_card.read_text()
    assert is_our_card(user_card)


@pytest.mark.parametrize("use_hem, recurrence_gate, output_gate, ffn_gate", [
    (True, "input", False, False), (False, "input", False, False), (False, "input", True, True),
    (False, "state", False, False), (True, "state", True, True)])
def test_lora_targets_are_the_blocks_linear_maps_but_the_timescales(use_hem, recurrence_gate, output_gate, ffn_gate,
                                                                   tiny_config):
    """PEFT's own matching of the target names adapts every Linear of every block except the
    decay generator mdi.W_E and the state gate state_gate.W_g (the memory timescales), and
    nothing outside the blocks."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(19)
    config = tiny_config(use_hem=use_hem, recurrence_gate=recurrence_gate, output_gate=output_gate, ffn_gate=ffn_gate)
    model = MMRecForCausalLM(config)
    blocks = {name for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")}
    expected = {name for name in blocks if not name.endswith(("mdi.W_E", "state_gate.W_g"))}
    targets = LORA_TARGET_MODULES if use_hem else LORA_TARGET_MODULES_UNFUSED
    adapted = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=targets))
    wrapped = {name.removeprefix("base_model.model.") for name, module in adapted.named_modules()
               if isinstance(module, peft.tuners.lora.LoraLayer)}
    assert wrapped == expected


def test_model_card_lists_every_field_that_shapes_the_model(tiny_config):
    """The card's configuration table gives the value of every MMRecConfig field that decides the
    architecture (everything but how it runs, trains, and its special tokens)."""
    import inspect

    from mm_rec import MMRecConfig
    from mm_rec.hub import model_card

    not_architecture = {"kernel_backend", "use_cache", "inference_chunk_size", "decode_cuda_graph", "dropout",
                        "initializer_range", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                        "pad_token_id"}
    config = tiny_config(memory_block_size=1, hidden_act="gelu")
    card = model_card(config)
    for name in set(inspect.signature(MMRecConfig.__init__).parameters) - {"self", "kwargs"} - not_architecture:
        assert f"| `{name}` | {getattr(config, name)} |" in card, name
