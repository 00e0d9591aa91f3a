"""mm_rec/hem.py: HEM's one fused projection (one Linear, called once per layer), its conversion
to and from the unfused layout, and the independent initialisation of its slices."""

import math

import pytest
import torch
from common import random_ids

from mm_rec import MMRecForCausalLM
from mm_rec.hem import convert_hem_state_dict


@pytest.mark.parametrize("recurrence_gate, width", [("input", 6), ("state", 5)])  # q k v z (g~) o, then p
def test_hem_is_one_linear_called_once(recurrence_gate, width, tiny_config):
    config = tiny_config(recurrence_gate=recurrence_gate)
    model = MMRecForCausalLM(config).eval()
    d, pe = config.hidden_size, config.pe_dim
    calls = []
    for layer in model.model.layers:
        fused = layer.hem.W_fused
        assert isinstance(fused, torch.nn.Linear) and fused.bias is not None
        assert (fused.in_features, fused.out_features) == (d, width * d + pe)
        assert [n for n, mod in layer.hem.named_modules() if isinstance(mod, torch.nn.Linear)] == ["W_fused"]
        fused.register_forward_hook(lambda mod, inp, out: calls.append(out.shape))
        if recurrence_gate == "state":
            assert tuple(layer.state_gate.W_g.weight.shape) == (d, d)
    model(random_ids((2, 37), seed=15))
    assert calls == [torch.Size([2, 37, width * d + pe])] * config.num_hidden_layers


@pytest.mark.parametrize("recurrence_gate", ["input", "state"])
@pytest.mark.parametrize("to_fused", [True, False])
def test_hem_fused_equals_unfused_after_conversion(recurrence_gate, to_fused, tiny_config):
    source = MMRecForCausalLM(tiny_config(recurrence_gate=recurrence_gate, use_hem=not to_fused)).eval()
    target = MMRecForCausalLM(tiny_config(recurrence_gate=recurrence_gate, use_hem=to_fused)).eval()
    converted = convert_hem_state_dict(source.state_dict(), source.config, to_fused=to_fused)
    target.load_state_dict(converted, strict=True)
    ids = random_ids((2, 35), seed=16)
    torch.testing.assert_close(target(ids).logits, source(ids).logits, rtol=1e-5, atol=1e-5)
    back = convert_hem_state_dict(converted, source.config, to_fused=not to_fused)
    assert back.keys() == source.state_dict().keys()
    for key, tensor in source.state_dict().items():
        assert torch.equal(back[key], tensor), key


def test_hem_conversion_rejects_wrong_shapes(tiny_config):
    config = tiny_config()
    fused = MMRecForCausalLM(config).state_dict()
    bad = dict(fused)
    bad["model.layers.0.hem.W_fused.weight"] = bad["model.layers.0.hem.W_fused.weight"][:-1]
    with pytest.raises(ValueError, match="W_fused"):
        convert_hem_state_dict(bad, config, to_fused=False)
    split = convert_hem_state_dict(fused, config, to_fused=False)
    bad = dict(split)
    bad["model.layers.1.hem.W_k.bias"] = torch.zeros(config.hidden_size + 1)
    with pytest.raises(ValueError, match="W_k"):
        convert_hem_state_dict(bad, config, to_fused=True)
    missing = {k: t for k, t in split.items() if "layers.0.hem.W_g" not in k}
    with pytest.raises(ValueError):
        convert_hem_state_dict(missing, config, to_fused=True)


@pytest.mark.parametrize("use_hem", [True, False])
def test_hem_slices_initialised_independently(use_hem, tiny_config):
    config = tiny_config(hidden_size=32, pe_dim=8, use_hem=use_hem, output_gate=False)
    torch.manual_seed(13)
    hem = MMRecForCausalLM(config).model.layers[0].hem
    d = config.hidden_size
    names = ["q", "k", "v", "z", "g", "p"]
    if use_hem:
        weights = dict(zip(names, hem.W_fused.weight.split([d] * 5 + [8])))
        biases = [hem.W_fused.bias]
    else:
        weights = {n: getattr(hem, f"W_{n}").weight for n in names}
        biases = [getattr(hem, f"W_{n}").bias for n in names]
    for name, weight in weights.items():
        weight = weight.detach()
        bound = math.sqrt(6.0 / (d + weight.shape[0]))  # Xavier of the slice alone
        assert weight.abs().max() <= bound, name
        assert weight.abs().max() > 0.8 * bound, name  # not the (smaller) bound of the whole fused matrix
        assert weight.std() == pytest.approx(bound / math.sqrt(3.0), rel=0.3), name
    for bias in biases:
        assert torch.count_nonzero(bias) == 0
