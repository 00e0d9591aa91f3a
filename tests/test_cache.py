"""mm_rec/cache.py: MMRecCache and LayerState. The flat tensors of a layer's state, cache files
(round trip bit for bit, every field checked, atomic writes), a cache that does not fit the model
refused, a tiny_checkpoint and reloaded stream that continues exactly, detach() for truncated backprop,
and one cache type for every copy of the code (the package's and a checkpoint's)."""

import os
from pathlib import Path

import pytest
import torch
from common import VOCAB, fresh_process, random_ids
from safetensors.torch import load_file, save_file

import mm_rec
from mm_rec import LayerState, MMRecCache
from mm_rec.cache import CACHE_FORMAT_VERSION

FOLD_FIELDS = ("fold_key_sum", "fold_value_sum", "fold_keep")  # added by version 3


@pytest.mark.parametrize("conv,inputs,channels", [(0, "all", 32), (4, "all", 32), (4, "recurrence", 32 + 32 + 32)])
def test_layer_state_flat_tensors_round_trip(conv, inputs, channels, tiny_model):
    """LayerState.tensors() is the flat {name: tensor} of LayerState.shapes (h, the conv window
    ([B, 0, d] without the conv; [B, K-1, C] with C = d, or the widths of z, g~, p when it convolves
    the recurrence's inputs), then the memory's fields); from_tensors inverts it; map applies a
    function to every tensor."""
    model = tiny_model(short_conv_size=conv, short_conv_inputs=inputs)
    with torch.no_grad():
        cache = model(random_ids((3, 23), seed=18), use_cache=True).cache
    config = model.config
    shapes = LayerState.config_shapes(config, 3)
    assert shapes["conv"] == (3, max(conv - 1, 0), channels)
    assert shapes == LayerState.shapes(3, config.hidden_size, config.blocks_per_segment, config.num_memory_slots, conv,
                                       channels)
    for layer in cache.layers:
        flat = layer.tensors()
        assert list(flat) == list(shapes) and list(flat)[0] == "h"
        assert {name: tuple(t.shape) for name, t in flat.items()} == shapes
        assert flat["h"] is layer.h and flat["conv"] is layer.conv
        assert all(flat[n] is t for n, t in layer.memory.tensors().items())
        again = LayerState.from_tensors(flat)
        assert again.h is layer.h and again.conv is layer.conv
        assert all(again.memory.tensors()[n] is t for n, t in layer.memory.tensors().items())
        doubled = layer.map(lambda t: t * 2)
        assert isinstance(doubled, LayerState)
        for name, t in flat.items():
            assert torch.equal(doubled.tensors()[name], t * 2), name


# ---------------------------------------------------------------------------------------
# Cache files
# ---------------------------------------------------------------------------------------

@pytest.fixture
def cache_file(tmp_path, tiny_model):
    """A valid cache file (2 layers, 2 rows, no convolution: an empty conv window) and its tensors
    and metadata, to break."""
    model = tiny_model(short_conv_size=0)
    with torch.no_grad():
        cache = model(random_ids((2, 23)), use_cache=True).cache
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
            torch.testing.assert_close(a.tensors()[name], t, rtol=0, atol=0, msg=name)
    assert os.listdir(path.parent) == [path.name]  # no temporary file left


def _rewrite(path, tensors, meta):
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=meta)


def _drop(name):
    return lambda t, m: t.pop(name)


BAD_CACHE_FILES = {
    "no version": (lambda t, m: m.pop("version"), "no 'version'"),
    "newer version": (lambda t, m: m.update(version=str(CACHE_FORMAT_VERSION + 1)),
                      f"format version {CACHE_FORMAT_VERSION + 1} \\(written by a newer mm_rec\\)"),
    "version 0": (lambda t, m: m.update(version="0"), "format version 0; this mm_rec reads versions 1, 2, 3"),
    "missing conv": (_drop("layers.0.conv"), "missing tensors \\['layers.0.conv'\\]"),
    "conv of another width": (lambda t, m: t.update({"layers.1.conv": torch.zeros(2, 3, 32)}),
                              "layer 1 conv has shape \\(2, 3, 32\\), expected \\(2, 0, 32\\)"),
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


def test_cache_file_of_another_model_is_refused(cache_file, tiny_config):
    path, _, _, _, config = cache_file
    with pytest.raises(ValueError, match="cache has 2 layers, the model has 3"):
        MMRecCache.load(path, config=tiny_config(num_hidden_layers=3, short_conv_size=0))
    with pytest.raises(ValueError, match="slot_keys has shape"):
        MMRecCache.load(path, config=tiny_config(num_memory_slots=5, short_conv_size=0))
    with pytest.raises(ValueError, match="conv has shape \\(2, 0, 32\\), expected \\(2, 3, 32\\)"):
        MMRecCache.load(path, config=tiny_config(short_conv_size=4, short_conv_inputs="all"))


def test_cache_of_the_other_conv_inputs_is_refused(tmp_path, tiny_model):
    """A cache of a model convolving u ([B, 3, d]) does not fit one convolving z, g~, p ([B, 3, 2d + pe_dim])
    nor the other way round; the error names both conv fields."""
    ids = random_ids((2, 9), seed=2)
    for saved, other in (("all", "recurrence"), ("recurrence", "all")):
        with torch.no_grad():
            cache = tiny_model(short_conv_size=4, short_conv_inputs=saved)(ids, use_cache=True).cache
        cache.save(tmp_path / f"{saved}.safetensors")
        model = tiny_model(short_conv_size=4, short_conv_inputs=other)
        message = f"conv has shape .*short_conv_size=4, short_conv_inputs='{other}'"
        with pytest.raises(ValueError, match=message):
            MMRecCache.load(tmp_path / f"{saved}.safetensors", config=model.config)
        with pytest.raises(ValueError, match=message):
            model(ids, cache=cache)


def _as_version_1(path):
    """Rewrite a cache file as version 1 wrote it: no conv tensors (nor the fold fields of version 3)."""
    tensors, meta = load_file(path), {"format": "mmrec-cache", "version": "1", "num_layers": "2"}
    _rewrite(path, {k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] not in ("conv", *FOLD_FIELDS)}, meta)


def test_version_1_cache_file_loads_without_a_conv_and_is_refused_with_one(tmp_path, tiny_model):
    """A version-1 file (written before the short convolution) continues a stream of a model without
    the conv exactly; for a model with one it raises, naming the file."""
    model = tiny_model(short_conv_size=0)
    ids = random_ids((2, 30), seed=3)
    path = tmp_path / "old.safetensors"
    with torch.no_grad():
        full = model(ids).logits
        model(ids[:, :17], use_cache=True).cache.save(path)
        _as_version_1(path)
        for config in (None, model.config):
            cache = MMRecCache.load(path, config=config)
            assert all(tuple(layer.conv.shape) == (2, 0, 32) and layer.conv.dtype == torch.float32
                       for layer in cache.layers)
            assert (model(ids[:, 17:], cache=cache).logits - full[:, 17:]).abs().max() <= 1e-4
    with pytest.raises(ValueError, match=f"{path.name}.*version 1.*short_conv_size=4"):
        MMRecCache.load(path, config=tiny_model(short_conv_size=4).config)


@pytest.mark.parametrize("with_config", [True, False])
def test_version_2_cache_file_decodes_across_a_fold_exactly(with_config, tmp_path, tiny_model):
    """A version-2 file holds no accumulated fold (fold_*, added by version 3): it is recomputed from the
    slots and summaries, on load with a config or by the model's first step without one, so decoding token
    by token across the segment's end folds exactly as the stream without a file (left-padded rows)."""
    model = tiny_model(memory_decay=0.7)
    ids = random_ids((2, 30), seed=5)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    path = tmp_path / "v2.safetensors"
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        model(ids[:, :11], attention_mask=mask[:, :11], use_cache=True).cache.save(path)
        tensors = load_file(path)
        _rewrite(path, {k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] not in FOLD_FIELDS},
                 {"format": "mmrec-cache", "version": "2", "num_layers": "2"})
        cache = MMRecCache.load(path, **({"config": model.config} if with_config else {}))
        assert cache.stale_folds != with_config
        steps = []
        for t in range(11, 30):  # positions 11..29 (10..26 in the padded row): a fold at 16
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    assert not cache.stale_folds
    assert (torch.cat(steps, 1) - full[:, 11:]).abs().max() <= 1e-4


@pytest.mark.parametrize("inputs,gate,channels", [("all", "input", 32), ("recurrence", "input", 32 + 32 + 32),
                                                  ("recurrence", "state", 32 + 32)])
def test_cache_with_conv_save_load_continues_identically(inputs, gate, channels, tmp_path, tiny_model):
    """The conv window ([B, K-1, C]) goes to disk and back bit for bit, with left-padded rows, and
    the stream continues as if never interrupted."""
    model = tiny_model(short_conv_size=4, short_conv_inputs=inputs, recurrence_gate=gate)
    ids = random_ids((2, 33), seed=4)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    mask[0, [19, 20]] = 0  # padding at the end of the saved part
    path = tmp_path / "conv.safetensors"
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = model(ids[:, :21], attention_mask=mask[:, :21], use_cache=True).cache
        cache.save(path)
        restored = MMRecCache.load(path, config=model.config)
        for saved, loaded in zip(cache.layers, restored.layers):
            assert tuple(loaded.conv.shape) == (2, 3, channels) and loaded.conv.any()
            for name, t in saved.tensors().items():
                assert torch.equal(loaded.tensors()[name], t), name
        tail = model(ids[:, 21:], attention_mask=mask[:, 21:], cache=restored).logits
    real = mask[:, 21:].bool()
    assert (tail - full[:, 21:])[real].abs().max() <= 1e-4


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


def test_cache_file_carries_extra_metadata_but_not_over_its_own(cache_file):
    path, cache, _, meta, config = cache_file
    cache.save(path, metadata={"written_by": "a test", "turn": "2"})
    assert MMRecCache.load_metadata(path) == {**meta, "written_by": "a test", "turn": "2"}
    assert torch.equal(MMRecCache.load(path, config=config).position, cache.position)
    before = path.read_bytes()
    for bad, named in (({"version": "9"}, "version"), ({"turn": 2}, "strings")):
        with pytest.raises(ValueError, match=named):
            cache.save(path, metadata=bad)
    assert path.read_bytes() == before and os.listdir(path.parent) == [path.name]


def test_cache_file_mode_is_any_new_files_and_a_replaced_files_stays(cache_file):
    """Like a file the user creates: 0666 less the umask for a new file (safetensors alone writes
    0600); the mode of the file it replaces otherwise."""
    path, cache, _, _, _ = cache_file
    for umask, expected in ((0o022, 0o644), (0o077, 0o600)):
        path.unlink()
        old = os.umask(umask)
        try:
            cache.save(path)
        finally:
            os.umask(old)
        assert oct(os.stat(path).st_mode & 0o777) == oct(expected)
    os.chmod(path, 0o640)
    cache.save(path)
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o640)


def test_cache_load_of_a_folder_says_so(tmp_path):
    with pytest.raises(ValueError, match="is a folder, expected a file"):
        MMRecCache.load(tmp_path)


@pytest.mark.parametrize("with_config", [True, False])
@pytest.mark.parametrize("device", [None, "cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_cache_save_load_continues_identically(tmp_path, with_config, device, tiny_model):
    """save -> load (checked against a config or not; onto a device or the default CPU) gives
    back every tensor bit for bit, and the stream continues as if never interrupted. The rows
    are left-padded differently, so positions, open blocks and block counts differ per row."""
    model = tiny_model()
    ids = torch.randint(2, VOCAB, (2, 33))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = model(ids[:, :21], attention_mask=mask[:, :21], use_cache=True).cache
        path = tmp_path / "chat.safetensors"
        cache.save(path)
        restored = MMRecCache.load(path, **({"config": model.config} if with_config else {}),
                                   **({} if device is None else {"device": device}))
        assert restored.position.device.type == (device or "cpu")
        assert torch.equal(restored.position.cpu(), cache.position) and cache.position.tolist() == [21, 15]
        for saved_layer, loaded_layer in zip(cache.layers, restored.layers):
            for name, t in saved_layer.tensors().items():
                loaded = loaded_layer.tensors()[name]
                assert loaded.dtype == t.dtype and torch.equal(loaded.cpu(), t), name
        on = device or "cpu"
        tail = model.to(on)(ids[:, 21:].to(on), attention_mask=mask[:, 21:].to(on), cache=restored, use_cache=True).logits
    assert (tail.cpu() - full[:, 21:]).abs().max() <= 1e-4
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------------------------------
# A cache that does not fit the model; detach()
# ---------------------------------------------------------------------------------------

def test_cache_of_another_model_batch_or_dtype_is_refused(tmp_path, tiny_model):
    model = tiny_model()
    ids = torch.randint(2, VOCAB, (2, 10))
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
        with pytest.raises(ValueError, match="batch size"):
            model(ids[:1], cache=cache)
        wider = tiny_model(hidden_size=64)
        with pytest.raises(ValueError, match="shape"):
            wider(ids, cache=cache)
        deeper = tiny_model(num_hidden_layers=3)
        with pytest.raises(ValueError, match="layers"):
            deeper(ids, cache=cache)
        halved = MMRecCache([layer.map(lambda t: t.half() if t.is_floating_point() else t) for layer in cache.layers],
                            cache.position)
        with pytest.raises(ValueError, match="dtype"):
            model(ids, cache=halved)
        with pytest.raises(ValueError, match="MMRecCache"):
            model(ids, cache=("not", "a cache"))
    cache.save(tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="shape|layers"):
        MMRecCache.load(tmp_path / "c.safetensors", config=wider.config)
    truncated = tmp_path / "bad.safetensors"
    truncated.write_bytes((tmp_path / "c.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read"):
        MMRecCache.load(truncated)


def test_detached_cache_continues_exactly_and_cuts_the_graph(tiny_model):
    """Truncated backprop through time: carry cache.detach() between training chunks."""
    model = tiny_model()
    ids = torch.randint(2, VOCAB, (2, 30))
    with torch.no_grad():
        full = model(ids).logits
    first = model(ids[:, :17], use_cache=True)
    carried = first.cache.detach().to("cpu")
    assert all(not t.requires_grad for layer in carried.layers for t in layer.tensors().values())
    second = model(ids[:, 17:], cache=carried, use_cache=True)
    assert (second.logits.detach() - full[:, 17:]).abs().max() <= 1e-4
    model.zero_grad()
    second.logits.sum().backward()
    # Had the cache kept its graph, that backward would have run through (and freed) the first
    # chunk's graph, and this would raise "Trying to backward through the graph a second time".
    graph_of_first = torch.autograd.grad(first.logits.sum(), model.model.embed_tokens.weight)[0]
    fresh = torch.autograd.grad(model(ids[:, :17]).logits.sum(), model.model.embed_tokens.weight)[0]
    torch.testing.assert_close(graph_of_first, fresh, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# One cache type for every copy of the code
# ---------------------------------------------------------------------------------------

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
def auto_loaded_stream(tiny_checkpoint, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("stream")
    result = fresh_process(STREAM_SCRIPT, tiny_checkpoint, tmp_path / "stream.safetensors", tmp_path=tmp_path)
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
