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


@pytest.mark.parametrize("use_hem, targets", [(True, LORA_TARGET_MODULES), (False, LORA_TARGET_MODULES_UNFUSED)])
def test_lora_targets_are_the_blocks_linear_maps_but_the_decay_generator(use_hem, targets, tiny_config):
    """Each target name ends the name of a Linear in every block; together they cover every
    Linear of the blocks but mdi.W_E (the memory timescales), and nothing outside the blocks."""
    torch.manual_seed(19)
    model = MMRecForCausalLM(tiny_config(use_hem=use_hem))
    linears = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    targeted = {name for name in linears if name.rsplit(".", 1)[-1] in targets}
    for i in range(model.config.num_hidden_layers):
        in_block = {name for name in targeted if name.startswith(f"model.layers.{i}.")}
        assert {name.rsplit(".", 1)[-1] for name in in_block} == set(targets), i
    blocks = {name for name in linears if name.startswith("model.layers.")}
    assert targeted == blocks - {name for name in blocks if name.endswith("mdi.W_E")}
