"""MM-Rec behaves like a model that ships inside transformers: gradient checkpointing layers and
their options, the declared config fields, the loading contract (missing tensors initialised and
reported, checkpoints that do not fit the config refused naming the field), the Auto classes,
tokenizers without remote code, one cache type for every copy of the code, validated cache
files, clear errors for bad inputs, and torch.export of prefill and decode steps."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mm_rec
from mm_rec import MMRecCache, MMRecConfig, MMRecForCausalLM, MMRecModel, is_mmrec_cache
from mm_rec.cache import CACHE_FORMAT_VERSION

REPO = Path(__file__).resolve().parents[1]
VOCAB = 64
WEIGHTS = "model.safetensors"


def tiny_config(**overrides) -> MMRecConfig:
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, memory_block_size=4,
                  memory_segment_length=16, num_memory_slots=4, scan_backend="torch", eos_token_id=1, pad_token_id=0)
    fields.update(overrides)
    return MMRecConfig(**fields)


def tiny_model(seed=0, **overrides) -> MMRecForCausalLM:
    torch.manual_seed(seed)
    return MMRecForCausalLM(tiny_config(**overrides)).eval()


def random_ids(shape, seed=0):
    return torch.randint(2, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def cache_of(output):
    return output.cache


def fresh_process(script: str, *args, tmp_path, stdin=None, timeout=300) -> dict:
    """Run ``script`` in a new interpreter (this worktree first on the path, offline) and return
    the JSON object it prints last."""
    path = [str(REPO), str(REPO / "tests"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=timeout, stdin=stdin)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    result["_output"] = run.stdout + run.stderr
    return result


# --------------------------------------------------------------------- gradient checkpointing
def _gradients_and_recomputes(model, ids):
    """Parameter gradients of the LM loss, and how often each block's FFN started (2: recomputed;
    a pre-hook, since a non-reentrant recompute stops once the last saved tensor is back)."""
    calls = [0] * len(model.model.layers)
    hooks = [layer.ffn.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(model.model.layers)]
    model(ids, labels=ids).loss.backward()
    for hook in hooks:
        hook.remove()
    return {name: p.grad for name, p in model.named_parameters()}, calls


ENTRY_POINTS = ["gradient_checkpointing_enable"] + (
    ["activation_checkpointing_enable"] if hasattr(MMRecForCausalLM, "activation_checkpointing_enable") else [])


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("every_n_layers", [1, 2])
def test_gradient_checkpointing_options_give_the_same_gradients(entry, use_reentrant, every_n_layers):
    from transformers.modeling_layers import GradientCheckpointingLayer

    ids = random_ids((2, 37))
    plain, calls = _gradients_and_recomputes(tiny_model(num_hidden_layers=3).train(), ids)
    assert calls == [1, 1, 1]
    model = tiny_model(num_hidden_layers=3).train()
    assert all(isinstance(layer, GradientCheckpointingLayer) for layer in model.model.layers)
    enable = getattr(model, entry)
    kwargs_name = "gradient_checkpointing_kwargs" if entry == "gradient_checkpointing_enable" else \
        "activation_checkpointing_kwargs"
    enable(**{kwargs_name: {"use_reentrant": use_reentrant}, "every_n_layers": every_n_layers})
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [i % every_n_layers == 0 for i in range(3)]
    checkpointed, calls = _gradients_and_recomputes(model, ids)
    assert calls == [2 if i % every_n_layers == 0 else 1 for i in range(3)]
    assert all(g is not None for g in plain.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointing_keeps_the_cache_of_a_training_forward():
    """A training-mode forward asked for a cache returns the same state with checkpointing on."""
    ids = random_ids((2, 21))
    states = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        states.append(cache_of(model(ids, use_cache=True)))
    for plain, checkpointed in zip(states[0].layers, states[1].layers):
        for name, t in plain.tensors().items():
            torch.testing.assert_close(getattr(checkpointed, name), t, rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------ use_cache
def test_use_cache_is_a_config_field_that_sets_the_forward_default(tmp_path):
    assert MMRecConfig().use_cache is True
    config = tiny_config(use_cache=False)
    config.save_pretrained(tmp_path)
    assert MMRecConfig.from_pretrained(tmp_path).use_cache is False
    with pytest.raises(ValueError, match="use_cache"):
        tiny_config(use_cache="yes")
    ids = random_ids((1, 9))
    model = tiny_model()
    with torch.no_grad():
        assert model.config.use_cache is True
        assert is_mmrec_cache(cache_of(model(ids)))  # evaluation: the config's default
        model.config.use_cache = False
        assert cache_of(model(ids)) is None
        assert is_mmrec_cache(cache_of(model(ids, use_cache=True)))
        model.config.use_cache = True
        model.train()
        assert cache_of(model(ids)) is None  # training: none unless asked
        assert is_mmrec_cache(cache_of(model(ids, use_cache=True)))


# --------------------------------------------------------------------------- loading contract
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("conformance") / "model"
    tiny_model().save_pretrained(path)
    return path


def _copy_without(saved, folder, dropped):
    shutil.copytree(saved, folder)
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
def test_partial_checkpoint_initialises_exactly_the_missing_tensors(saved, tmp_path, loader):
    """Missing tensors are reported and initialised as __init__ would (the deterministic ones
    equal a fresh model's, the random ones follow the init distribution); every loaded tensor,
    including the other parameter of a half-loaded Linear, is the checkpoint's. The checkpoint's
    own code (trust_remote_code, in a process where mm_rec's registration cannot take over) too."""
    folder = _copy_without(saved, tmp_path / "partial", PARTIAL)
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
    assert torch.equal(params["model.layers.0.hem.W_fused.bias"], torch.zeros(5 * 32 + 8))
    up = params["model.layers.1.ffn.up.weight"]  # N(0, initializer_range): 4096 draws
    assert abs(up.mean().item()) < 0.002 and abs(up.std().item() / 0.02 - 1) < 0.05
    slots = params["model.layers.1.memory.slot_values"]  # N(0, 1)
    assert torch.isfinite(slots).all() and 0.5 < slots.std().item() < 1.5
    assert not torch.equal(slots, fresh["model.layers.1.memory.slot_values"])  # drawn, not copied


def test_init_weights_on_a_half_loaded_linear_touches_only_the_unloaded_parameter():
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


@pytest.mark.parametrize("saved_layers,config_layers", [(4, 2), (2, 4), (3, 2)])
def test_checkpoint_with_another_layer_count_is_refused(tmp_path, saved_layers, config_layers):
    tiny_model(num_hidden_layers=saved_layers).save_pretrained(tmp_path / "model")
    message = f"num_hidden_layers: the checkpoint has {saved_layers} layers, the config {config_layers}"
    with pytest.raises(ValueError, match=message):
        MMRecForCausalLM.from_pretrained(tmp_path / "model", num_hidden_layers=config_layers)
    with pytest.raises(ValueError, match=message):
        MMRecModel.from_pretrained(tmp_path / "model", num_hidden_layers=config_layers)


def test_checkpoint_of_another_width_names_hidden_size(saved):
    with pytest.raises(ValueError, match=r"hidden_size: model\.embed_tokens\.weight \(checkpoint \(64, 32\), model \(64, 48\)\)"):
        MMRecForCausalLM.from_pretrained(saved, hidden_size=48, intermediate_size=128, pe_dim=8)
    model, info = MMRecForCausalLM.from_pretrained(saved, hidden_size=48, intermediate_size=128, pe_dim=8,
                                                   ignore_mismatched_sizes=True, output_loading_info=True)
    assert "model.embed_tokens.weight" in [key for key, *_ in info["mismatched_keys"]]
    assert model.model.embed_tokens.weight.shape == (VOCAB, 48)


def test_checkpoint_of_another_layer_layout_names_use_hem(saved):
    with pytest.raises(ValueError, match="use_hem"):
        MMRecForCausalLM.from_pretrained(saved, use_hem=False)


def test_base_model_loads_from_the_causal_lm_checkpoint(saved):
    """The head-less MMRecModel takes the `model.` tensors of a causal-LM checkpoint."""
    base = MMRecModel.from_pretrained(saved)
    full = MMRecForCausalLM.from_pretrained(saved)
    ids = random_ids((1, 11))
    with torch.no_grad():
        torch.testing.assert_close(base(ids).last_hidden_state, full.model(ids).last_hidden_state, rtol=0, atol=0)


# -------------------------------------------------------------------- Auto classes, tokenizer
def test_import_registers_the_auto_classes_for_a_folder_without_auto_map(saved, tmp_path):
    folder = tmp_path / "no_auto_map"
    shutil.copytree(saved, folder)
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
def test_tokenizer_of_a_checkpoint_loads_without_asking(saved, tmp_path, imports, kwargs):
    """stdin closed: transformers' remote-code question would be printed and answered by EOF.
    AutoTokenizer reads the folder's config.json first (transformers 5.x); with mm_rec imported the
    config class is registered locally, so nothing is asked; a process without mm_rec must say
    trust_remote_code (True, as the model card does, or False: the tokenizer needs no remote code)."""
    from mm_rec.data import byte_level_tokenizer

    folder = tmp_path / "with_tokenizer"
    shutil.copytree(saved, folder)
    tokenizer = byte_level_tokenizer()
    tokenizer.save_pretrained(folder)
    result = fresh_process(TOKENIZER_SCRIPT.format(imports=imports, kwargs=kwargs), folder, tmp_path=tmp_path,
                           stdin=subprocess.DEVNULL, timeout=120)
    assert "Do you wish to run the custom code" not in result["_output"]
    assert result["ids"] == tokenizer("To be, or not to be").input_ids
    assert (result["eos"], result["pad"]) == (tokenizer.eos_token_id, tokenizer.pad_token_id)


# ------------------------------------------------------------ one cache type, every code copy
STREAM_SCRIPT = """
    import importlib, json, sys, torch
    from transformers import AutoModelForCausalLM
    path, cache_file = sys.argv[1], sys.argv[2]
    # The model first: once mm_rec is imported, its registered classes would win over the folder's code.
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    import mm_rec
    remote_cache_module = importlib.import_module(type(model).__module__.rsplit(".", 1)[0] + ".cache")
    g = torch.Generator().manual_seed(0)
    history, turn = torch.randint(2, 64, (1, 40), generator=g), torch.randint(2, 64, (1, 5), generator=g)
    result = dict(model_module=type(model).__module__)
    with torch.no_grad():
        out = model(history, use_cache=True)
        out.cache.save(cache_file)
        cache = mm_rec.MMRecCache.load(cache_file, config=model.config)
        result["package_cache_seen_by_checkpoint_code"] = remote_cache_module.is_mmrec_cache(cache)
        result["checkpoint_cache_seen_by_package"] = mm_rec.is_mmrec_cache(out.cache)
        result["other_objects_rejected"] = not any(f(x) for f in (mm_rec.is_mmrec_cache, remote_cache_module.is_mmrec_cache)
                                                   for x in (None, (), {"layers": [], "position": 0}))
        try:
            full = model(torch.cat([history, turn], 1)).logits[:, -5:]
            continued = model(turn, use_cache=True, cache=cache).logits
            result["forward_diff"] = (continued - full).abs().max().item()
            cache = mm_rec.MMRecCache.load(cache_file, config=model.config)
            kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None)
            streamed = model.continue_stream(turn, cache, **kwargs)
            at_once = model.generate(torch.cat([history, turn], 1), **kwargs)
            result["same_generation"] = torch.equal(streamed[:, 5:], at_once[:, 45:])
        except ValueError as err:
            result["error"] = str(err)
    print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def auto_loaded_stream(saved, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("stream")
    result = fresh_process(STREAM_SCRIPT, saved, tmp_path / "stream.safetensors", tmp_path=tmp_path)
    assert result["model_module"].startswith("transformers_modules."), "the model must come from the folder's code"
    return result


def test_is_mmrec_cache_accepts_every_copy_of_the_code(auto_loaded_stream):
    assert auto_loaded_stream["package_cache_seen_by_checkpoint_code"]
    assert auto_loaded_stream["checkpoint_cache_seen_by_package"]
    assert auto_loaded_stream["other_objects_rejected"]


def test_readme_stream_example_with_a_model_loaded_through_auto(auto_loaded_stream):
    """The README's example, in a fresh process, with the model's classes from transformers_modules
    and the cache from the mm_rec package."""
    assert "error" not in auto_loaded_stream, auto_loaded_stream.get("error")
    assert auto_loaded_stream["forward_diff"] <= 1e-4
    assert auto_loaded_stream["same_generation"]


# ------------------------------------------------------------------------------ cache files
@pytest.fixture
def cache_file(tmp_path):
    """A valid cache file (2 layers, 2 rows) and its tensors and metadata, to break."""
    model = tiny_model()
    with torch.no_grad():
        cache = cache_of(model(random_ids((2, 23)), use_cache=True))
    path = tmp_path / "stream.safetensors"
    cache.save(path)
    meta = {"format": "mmrec-cache", "version": str(CACHE_FORMAT_VERSION), "num_layers": "2"}
    return path, cache, load_file(path), meta, model.config


def test_cache_file_round_trip(cache_file):
    path, cache, _, _, config = cache_file
    loaded = MMRecCache.load(path, config=config)
    torch.testing.assert_close(loaded.position, cache.position, rtol=0, atol=0)
    for a, b in zip(loaded.layers, cache.layers):
        for name, t in b.tensors().items():
            torch.testing.assert_close(getattr(a, name), t, rtol=0, atol=0, msg=name)
    assert os.listdir(path.parent) == [path.name]  # no temporary file left


def _rewrite(path, tensors, meta):
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=meta)


def _drop(name):
    return lambda t, m: t.pop(name)


BAD_CACHE_FILES = {
    "no version": (lambda t, m: m.pop("version"), "no 'version'"),
    "newer version": (lambda t, m: m.update(version="2"), "format version 2 \\(written by a newer mm_rec\\)"),
    "version not an integer": (lambda t, m: m.update(version="one"), "version must be an integer, got 'one'"),
    "no num_layers": (lambda t, m: m.pop("num_layers"), "no 'num_layers'"),
    "num_layers not an integer": (lambda t, m: m.update(num_layers="2.5"), "num_layers must be an integer, got '2.5'"),
    "num_layers negative": (lambda t, m: m.update(num_layers="-1"), "num_layers must be at least 1, got -1"),
    "num_layers zero": (lambda t, m: m.update(num_layers="0"), "num_layers must be at least 1, got 0"),
    "num_layers too large": (lambda t, m: m.update(num_layers="3"), "missing tensors \\['layers.2."),
    "num_layers too small": (lambda t, m: m.update(num_layers="1"), "unexpected tensors \\['layers.1."),
    "missing tensor": (_drop("layers.1.slot_keys"), "missing tensors \\['layers.1.slot_keys'\\]"),
    "missing position": (_drop("position"), "missing tensors \\['position'\\]"),
    "wrong dtype": (lambda t, m: t.update({"layers.0.h": t["layers.0.h"].double()}),
                    "layer 0 h has dtype torch.float64, expected torch.float32"),
    "float counts": (lambda t, m: t.update({"layers.1.block_count": t["layers.1.block_count"].float()}),
                     "layer 1 block_count has dtype torch.float32"),
    "width differs across layers": (lambda t, m: t.update({"layers.1.h": torch.zeros(2, 16)}),
                                    "layer 1 h has shape \\(2, 16\\), expected \\(2, 32\\)"),
    "rows differ across layers": (lambda t, m: t.update({"layers.1.slot_values": t["layers.1.slot_values"][:1]}),
                                  "layer 1 slot_values has shape \\(1, 4, 32\\)"),
    "position shape": (lambda t, m: t.update(position=t["position"][:, None]), "position must be a \\[B\\] int64"),
    "position dtype": (lambda t, m: t.update(position=t["position"].int()), "position must be a \\[B\\] int64"),
    "negative position": (lambda t, m: t.update(position=-t["position"]), "must not be negative"),
    "not a cache file": (lambda t, m: m.update(format="something-else"), "is not an MMRecCache file"),
}


@pytest.mark.parametrize("case", list(BAD_CACHE_FILES))
def test_bad_cache_file_raises_naming_the_field(cache_file, case):
    path, _, tensors, meta, _ = cache_file
    edit, message = BAD_CACHE_FILES[case]
    edit(tensors, meta)
    _rewrite(path, tensors, meta)
    with pytest.raises(ValueError, match=message):
        MMRecCache.load(path)


def test_cache_file_of_another_model_is_refused(cache_file):
    path, _, _, _, config = cache_file
    with pytest.raises(ValueError, match="cache has 2 layers, the model has 3"):
        MMRecCache.load(path, config=tiny_config(num_hidden_layers=3))
    with pytest.raises(ValueError, match="slot_keys has shape"):
        MMRecCache.load(path, config=tiny_config(num_memory_slots=5))


def test_truncated_cache_file_is_refused(cache_file):
    path = cache_file[0]
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read an MMRecCache"):
        MMRecCache.load(path)


def test_cache_save_onto_a_directory_refuses_before_writing(cache_file, tmp_path):
    _, cache, _, _, _ = cache_file
    target = tmp_path / "folder"
    target.mkdir()
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match="is a directory"):
        cache.save(target)
    assert sorted(os.listdir(tmp_path)) == before and os.listdir(target) == []


def test_cache_save_failing_midway_leaves_the_old_file_and_no_temporary(cache_file, monkeypatch):
    path, cache, _, _, _ = cache_file
    before = path.read_bytes()

    def write_half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(mm_rec.cache, "save_file", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        cache.save(path)
    assert os.listdir(path.parent) == [path.name] and path.read_bytes() == before


# ------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.int16, torch.float32])
def test_ids_of_a_non_index_dtype_are_refused(dtype):
    model = tiny_model()
    with pytest.raises(ValueError, match="input_ids must have dtype torch.int64 or torch.int32, got " + str(dtype)):
        model(random_ids((1, 5)).to(dtype))


def test_int32_ids_give_the_int64_logits():
    model = tiny_model()
    ids = random_ids((2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids.int()).logits, model(ids).logits, rtol=0, atol=0)


def test_empty_batch_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="empty batch \\(batch size 0"):
        model(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="empty batch \\(batch size 0"):
        model(inputs_embeds=torch.zeros(0, 5, 32))
    with pytest.raises(ValueError, match="seq_len 0"):
        model(torch.zeros(2, 0, dtype=torch.long))


def test_value_checks_still_run_in_eager_mode():
    model = tiny_model()
    ids = random_ids((1, 6))
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model(ids.masked_fill(ids == ids[0, 0], VOCAB))
    with pytest.raises(ValueError, match="attention_mask must hold only 0"):
        model(ids, attention_mask=torch.full((1, 6), 2))


def test_decode_with_the_exporters_full_length_mask():
    """Exporters pass attention_mask [B, past + T] on every decode step, with left padding."""
    model = tiny_model()
    ids = random_ids((2, 19))
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        out = model(ids[:, :10], attention_mask=mask[:, :10], use_cache=True)
        steps = [out.logits]
        for t in range(10, 19):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], use_cache=True, cache=cache_of(out))
            steps.append(out.logits)
    real = mask.bool()
    assert (torch.cat(steps, 1)[real] - full[real]).abs().max() <= 1e-4


# ------------------------------------------------------------------------------ torch.export
def _export_and_compare(model, args, kwargs, dynamic_shapes=None, others=()):
    """Export ``model``; its program must give the eager logits on the traced inputs and ``others``."""
    program = torch.export.export(model, args=args, kwargs=kwargs, dynamic_shapes=dynamic_shapes)
    for a, kw in [(args, kwargs), *others]:
        with torch.no_grad():
            torch.testing.assert_close(program.module()(*a, **kw).logits, model(*a, **kw).logits, rtol=1e-5, atol=1e-5)
    return program


def _prefill_static(model):
    ids = random_ids((2, 21))
    mask = torch.ones(2, 21, dtype=torch.long)
    mask[0, :3] = 0
    _export_and_compare(model, (ids,), {"attention_mask": mask, "use_cache": False})


def _prefill_dynamic(model):
    """A length that varies in whole memory segments (the memory's layout has ceil(T / L)
    segments, so that is the dimension a program can keep symbolic), from 3 segments (with
    fewer, a size-1 dimension of the fold's recurrence is specialised), without a mask."""
    segments = torch.export.Dim("segments", min=3, max=16)
    L = model.config.memory_segment_length
    others = [((random_ids((2, 5 * L), seed=1),), {"use_cache": False}),
              ((random_ids((2, 4 * L), seed=2),), {"use_cache": False})]
    _export_and_compare(model, (random_ids((2, 3 * L)),), {"use_cache": False},
                        dynamic_shapes={"input_ids": {1: L * segments}, "use_cache": None}, others=others)


def _decode_step(model):
    """One decode step on a cache, with the exporters' [B, past + 1] mask; the exported cache
    output equals the eager one."""
    ids = random_ids((2, 14))
    with torch.no_grad():
        cache = cache_of(model(ids, use_cache=True))
    step = random_ids((2, 1), seed=2)
    kwargs = {"attention_mask": torch.ones(2, 15, dtype=torch.long), "use_cache": True, "cache": cache}
    program = torch.export.export(model, args=(step,), kwargs=kwargs)
    with torch.no_grad():
        exported = program.module()(step, **{**kwargs, "cache": cache.detach()})
        eager = model(step, **{**kwargs, "cache": cache.detach()})
    torch.testing.assert_close(exported.logits, eager.logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(cache_of(exported).layers, cache_of(eager).layers):
        for name, t in b.tensors().items():
            torch.testing.assert_close(getattr(a, name), t, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(cache_of(exported).position, cache_of(eager).position)


EXPORTS = {"prefill static": _prefill_static, "prefill dynamic seq_len": _prefill_dynamic, "decode step": _decode_step}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_of_the_model(case):
    """Prefill (static and dynamic length) and a decode step export, and the program gives the
    eager logits (and cache): no host reads of tensor values anywhere in the forward."""
    EXPORTS[case](tiny_model())
