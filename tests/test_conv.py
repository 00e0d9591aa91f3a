"""mm_rec/conv.py: the short convolution against tests/naive.py's float64 loop on plain, left-padded,
packed and holed rows, carried across chunks; the dense path against the general one; the identity
init (a fresh model with the conv computes what it computes without, also when from_pretrained fills
the missing kernel in); its gradients; and no weight decay on its kernel. mm_rec/conv_triton.py: the
dense path's kernels against the PyTorch path (interpreted on CPU at small shapes; at training
width on a GPU), values and gradients, and the backend switch in a whole model."""

import os

import pytest
import torch
import torch.nn.functional as F
from common import document_positions, random_ids
from naive import naive_short_conv

from mm_rec import MMRecForCausalLM
from mm_rec.conv import ShortConv
from mm_rec.conv_triton import AVAILABLE as TRITON_AVAILABLE
from mm_rec.positions import token_layout

B, T, D = 3, 23, 8
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not TRITON_AVAILABLE or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
                                  reason="needs Triton on CUDA or interpreted (TRITON_INTERPRET=1)")


def rows(kind):
    """(attention_mask [B, T], position_ids or None) of each kind of row."""
    mask = torch.ones(B, T, dtype=torch.long)
    position_ids = None
    if kind in ("left_padded", "holes", "packed_holes"):
        mask[1, :5] = 0
    if kind in ("holes", "packed_holes"):
        mask[0, [3, 4, 9, 17, 22]] = 0  # holes inside windows and at the end
        mask[2, [0, 6, 7, 8]] = 0
    if kind in ("packed", "packed_holes"):
        position_ids = torch.stack([torch.cat([torch.arange(9), torch.arange(2), torch.arange(12)]),
                                    torch.cat([torch.arange(1), torch.arange(1), torch.arange(21)]),
                                    torch.cat([torch.arange(4), torch.arange(19)])])
    if kind == "packed_holes":  # a hole right after a document start, and a document start after a hole
        mask[0, [10, 12]] = 0
    return mask, position_ids


def random_conv(K, seed=0):
    torch.manual_seed(seed)
    conv = ShortConv(D, K)
    with torch.no_grad():
        conv.weight.normal_()
    return conv


def layout_of(mask, position_ids, dense=False):
    return token_layout(mask, position_ids, torch.zeros(mask.shape[0], dtype=torch.long), dense=dense)


KINDS = ["plain", "left_padded", "packed", "holes", "packed_holes"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("K", [2, 4])
def test_short_conv_matches_naive_reference(kind, K):
    """Outputs at real tokens and the state after the call, from a carried (random) state."""
    conv = random_conv(K)
    mask, position_ids = rows(kind)
    u, state = torch.randn(B, T, D), torch.randn(B, K - 1, D)
    with torch.no_grad():
        c, after = conv(u, layout_of(mask, position_ids), state)
    c_ref, after_ref = naive_short_conv(u, conv.weight, mask, position_ids, state)
    real = mask.bool()
    torch.testing.assert_close(c.double()[real], c_ref[real], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(c).all() and after.dtype == torch.float32
    torch.testing.assert_close(after.double(), after_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_short_conv_in_chunks_equals_one_call(kind):
    """Any chunking carrying the state gives the same outputs and final state (a chunk of padding only
    leaves the state as it was)."""
    K = 4
    conv = random_conv(K, seed=1)
    mask, position_ids = rows(kind)
    mask[:, 11:14] = 0  # a chunk below holds padding only
    u = torch.randn(B, T, D)
    state = torch.zeros(B, K - 1, D)
    with torch.no_grad():
        whole, whole_state = conv(u, layout_of(mask, position_ids), state)
        parts = []
        for a, b in [(0, 1), (1, 7), (7, 11), (11, 14), (14, 15), (15, T)]:
            ids = None if position_ids is None else position_ids[:, a:b]
            c, state = conv(u[:, a:b], layout_of(mask[:, a:b], ids), state)
            parts.append(c)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(parts, 1)[real], whole[real], rtol=0, atol=1e-6)
    torch.testing.assert_close(state, whole_state, rtol=0, atol=0)


def test_dense_path_equals_general_path_bit_for_bit():
    conv = random_conv(4, seed=2)
    u, state = torch.randn(B, T, D), torch.randn(B, 3, D)
    mask = torch.ones(B, T, dtype=torch.long)
    dense, general = layout_of(mask, None, dense=True), layout_of(mask, None)
    assert dense.dense and not general.dense
    c_dense, after_dense = conv(u, dense, state)
    c_general, after_general = conv(u, general, state)
    assert torch.equal(c_dense, c_general) and torch.equal(after_dense, after_general)
    grads = [torch.autograd.grad(c.square().sum(), conv.weight)[0] for c in (c_dense, c_general)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-6)
    assert not layout_of(mask, torch.arange(T).expand(B, -1), dense=True).dense  # position_ids: resets possible


@pytest.mark.parametrize("kind", ["plain", "packed_holes"])
def test_short_conv_gradients_match_naive_reference(kind):
    conv = random_conv(3, seed=3)
    mask, position_ids = rows(kind)
    real = mask.bool()
    u, state = torch.randn(B, T, D, requires_grad=True), torch.randn(B, 2, D, requires_grad=True)
    target = torch.randn(B, T, D)
    c, after = conv(u, layout_of(mask, position_ids, dense=kind == "plain"), state)
    ((c * target)[real].sum() + after.square().sum()).backward()
    w64 = conv.weight.detach().double().requires_grad_()
    u64, state64 = u.detach().double().requires_grad_(), state.detach().double().requires_grad_()
    c_ref, after_ref = naive_short_conv(u64, w64, mask, position_ids, state64)
    ((c_ref * target.double())[real].sum() + after_ref.square().sum()).backward()
    for got, want in ((conv.weight.grad, w64.grad), (u.grad, u64.grad), (state.grad, state64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("inputs,channels", [("all", 32), ("recurrence", 32 + 32 + 32)])
def test_identity_init_gives_the_model_without_the_conv(inputs, channels, tiny_config, tmp_path):
    """A fresh model with short_conv_size=4 (its kernel the identity, [C, K]) has the logits of the
    same weights without the conv; so does a checkpoint without the conv loaded with it
    (from_pretrained initialises the missing kernels to the identity and reports them)."""
    torch.manual_seed(4)
    with_conv = MMRecForCausalLM(tiny_config(short_conv_size=4, short_conv_inputs=inputs)).eval()
    without = MMRecForCausalLM(tiny_config(short_conv_size=0)).eval()
    kernels = {k: v for k, v in with_conv.state_dict().items() if "short_conv" in k}
    assert len(kernels) == 2 and all(torch.equal(w[:, 0], torch.ones(channels)) and not w[:, 1:].any()
                                     for w in kernels.values())
    without.load_state_dict({k: v for k, v in with_conv.state_dict().items() if k not in kernels})
    ids = random_ids((2, 30))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        want = without(ids, attention_mask=mask).logits
        torch.testing.assert_close(with_conv(ids, attention_mask=mask).logits, want, rtol=0, atol=0)
        without.save_pretrained(tmp_path)
        loaded, info = MMRecForCausalLM.from_pretrained(tmp_path, short_conv_size=4, short_conv_inputs=inputs,
                                                        output_loading_info=True)
        assert sorted(info["missing_keys"]) == sorted(f"model.{k}" if not k.startswith("model.") else k
                                                      for k in kernels)
        for name, w in loaded.state_dict().items():
            if "short_conv" in name:
                assert torch.equal(w, kernels[name]), name
        torch.testing.assert_close(loaded.eval()(ids, attention_mask=mask).logits, want, rtol=0, atol=0)


@pytest.mark.parametrize("inputs", ["all", "recurrence"])
def test_checkpoint_with_another_conv_width_is_refused(inputs, tiny_model, tmp_path):
    tiny_model(short_conv_size=4, short_conv_inputs=inputs).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="short_conv_size"):
        MMRecForCausalLM.from_pretrained(tmp_path, short_conv_size=3)
    with pytest.raises(ValueError, match="short_conv_size"):
        MMRecForCausalLM.from_pretrained(tmp_path, short_conv_size=0, short_conv_inputs="all")


@pytest.mark.parametrize("saved,other", [("all", "recurrence"), ("recurrence", "all")])
def test_checkpoint_of_the_other_conv_inputs_is_refused(saved, other, tiny_model, tmp_path):
    """The kernel is [d, K] on u and [2d + pe_dim, K] on z, g~, p: a checkpoint of one mode loaded
    into the other raises naming short_conv_inputs (it would otherwise re-initialise the kernel);
    the same mode loads."""
    model = tiny_model(short_conv_size=4, short_conv_inputs=saved)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="short_conv_inputs: .*short_conv.weight"):
        MMRecForCausalLM.from_pretrained(tmp_path, short_conv_inputs=other)
    loaded = MMRecForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.short_conv_inputs == saved
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_the_conv_kernel_gets_no_weight_decay(tiny_model, tmp_path):
    """Neither the quality study's AdamW nor the main job's Trainer decays the [d, K]
    kernel (a per-channel scale started at the identity, like a norm's weight), and both decay
    the same parameters: the matrices, not norms' weights nor biases."""
    from quality import optimizer_for
    from transformers import TrainingArguments

    from mm_rec_train.trainer import _trainer_class

    model = tiny_model(short_conv_size=4)
    kernels = {id(p) for n, p in model.named_parameters() if n.endswith("short_conv.weight")}
    assert len(kernels) == 2
    groups = optimizer_for(model, 1e-3, 0.1, torch.device("cpu")).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed and not decayed & kernels
    assert model.model.embed_tokens.weight in [p for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", weight_decay=0.1)
    trainer = _trainer_class()(model=model, args=args)
    names = set(trainer.get_decay_parameter_names(model))
    assert names and not any("short_conv" in n for n in names)
    assert any(n.endswith("W_fused.weight") for n in names)
    # one rule for both: every matrix but the kernels decays, no vector does (every norm's weight alike)
    matrices = {n for n, p in model.named_parameters() if p.ndim >= 2 and not n.endswith("short_conv.weight")}
    assert names == matrices
    assert decayed == {id(p) for n, p in model.named_parameters() if n in matrices}


@pytest.mark.parametrize("options", [{}, {"short_conv_inputs": "recurrence"},
                                     {"short_conv_inputs": "recurrence", "recurrence_gate": "state"}],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "all")
def test_model_with_conv_streams_packed_holed_rows_token_by_token(options, tiny_model):
    """Packed documents with padding holes, fed whole, in chunks and token by token, carrying the cache."""
    model = tiny_model(short_conv_size=4, memory_block_size=1, output_gate=True, **options)
    T = 37
    ids = random_ids((2, T), seed=5)
    starts = torch.zeros(2, T, dtype=torch.bool)
    starts[0, [0, 13, 16]] = starts[1, [0, 2]] = True
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, [5, 14, 17, 30]] = 0  # never a document's first token
    mask[1, [1, 3, 4, 20]] = 0
    position_ids = document_positions(starts, mask)
    real = mask.bool()
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=position_ids).logits
        for cuts in ([0, 6, 14, 15, 29, T], list(range(T + 1))):
            cache, parts = None, []
            for a, b in zip(cuts[:-1], cuts[1:]):
                out = model(ids[:, a:b], attention_mask=mask[:, a:b], position_ids=position_ids[:, a:b], cache=cache,
                            use_cache=True)
                cache = out.cache
                parts.append(out.logits)
            assert (torch.cat(parts, 1) - full)[real].abs().max() <= 1e-4
        # each document alone, without padding
        for row in range(2):
            bounds = starts[row].nonzero()[:, 0].tolist() + [T]
            for a, b in zip(bounds[:-1], bounds[1:]):
                keep = real[row, a:b]
                alone = model(ids[row:row + 1, a:b][:, keep]).logits[0]
                assert (full[row, a:b][keep] - alone).abs().max() <= 1e-4


# ---------------------------------------------------------------------------------------
# The dense path's Triton kernels (conv_triton.py)
# ---------------------------------------------------------------------------------------

def dense_pair(K, C, seed=0):
    """The same random ShortConv [C, K] with backend "torch" and "triton", on DEVICE."""
    torch.manual_seed(seed)
    conv = ShortConv(C, K, "torch")
    with torch.no_grad():
        conv.weight.normal_()
    fast = ShortConv(C, K, "triton")
    fast.load_state_dict(conv.state_dict())
    return conv.to(DEVICE), fast.to(DEVICE)


def run_dense(conv, u, state, probes):
    """(c, new state, du, d state, d weight) of one dense call, with a loss through c and the new state
    (either probe None: that output unused)."""
    u, state = u.detach().requires_grad_(), state.detach().requires_grad_()
    conv.zero_grad()
    mask = torch.ones(u.shape[:2], dtype=torch.long, device=u.device)
    c, after = conv(u, token_layout(mask, None, mask.new_zeros(u.shape[0]), dense=True), state)
    loss = sum((out.float() * probe).sum() for out, probe in zip((c, after), probes) if probe is not None)
    loss.backward()
    return c.detach(), after.detach(), u.grad, state.grad, conv.weight.grad


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [2, 4])
@pytest.mark.parametrize("T_", [1, 3, 9])
@pytest.mark.parametrize("C", [5, 20])
def test_triton_dense_path_equals_the_torch_path(dtype, K, T_, C):
    """c equals _window_sum's bit for bit (the same products added in the same order); in bfloat16,
    interpreted, to one ulp (the interpreter rounds to bfloat16 toward zero). The new state (E's
    last K - 1 rows, some from the carried state when T < K - 1) is equal, and the gradients of u,
    state and w through both outputs are those of the PyTorch path."""
    torch_conv, triton_conv = dense_pair(K, C)
    u, state = torch.randn(2, T_, C, device=DEVICE).to(dtype), torch.randn(2, K - 1, C, device=DEVICE)
    probes = (torch.randn(2, T_, C, device=DEVICE), torch.randn(2, K - 1, C, device=DEVICE))
    got, want = (run_dense(conv, u, state, probes) for conv in (triton_conv, torch_conv))
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    if dtype == torch.float32 or DEVICE == "cuda":
        assert torch.equal(got[0], want[0])
    else:
        torch.testing.assert_close(got[0], want[0], rtol=2 ** -7, atol=0)
    assert torch.equal(got[1], want[1])
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-5)
    for name, a, b in zip(["du", "dstate", "dweight"], got[2:], want[2:]):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")


@needs_triton
@pytest.mark.parametrize("used", ["c", "state"])
def test_triton_dense_path_with_strided_rows_and_one_output_used(used):
    """u a slice of wider rows (its row stride is not C); only c, or only the new state, carries a gradient
    (then the PyTorch path leaves w's gradient None, the kernel zeros)."""
    torch_conv, triton_conv = dense_pair(3, 6, seed=1)
    u = torch.randn(2, 5, 10, device=DEVICE)[..., 2:8]
    state = torch.randn(2, 2, 6, device=DEVICE)
    probes = (torch.randn(2, 5, 6, device=DEVICE), None) if used == "c" else (None, torch.randn(2, 2, 6, device=DEVICE))
    got, want = (run_dense(conv, u, state, probes) for conv in (triton_conv, torch_conv))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for name, a, b in zip(["du", "dstate", "dweight"], got[2:], want[2:]):
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@needs_triton
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's tl.where (recurrence_triton)
@pytest.mark.parametrize("inputs", ["all", "recurrence"])
def test_kernel_backend_runs_the_conv_kernel_on_dense_rows_only(inputs, tiny_model, monkeypatch):
    """A whole model in training, forward and backward, without padding (the dense path): "triton"
    runs the conv kernels, "torch" does not, and both give the same logits and gradients; with
    padding (the general path) neither runs them."""
    import mm_rec.conv_triton as kernels

    ran = []
    for name in ("short_conv_fwd", "short_conv_bwd"):
        def spy(*args, _kernel=getattr(kernels, name), _name=name):
            ran.append(_name)
            return _kernel(*args)
        monkeypatch.setattr(kernels, name, spy)
    ids = random_ids((2, 20)).to(DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        ran.clear()
        model = tiny_model(kernel_backend=backend, short_conv_size=4, short_conv_inputs=inputs).to(DEVICE).train()
        logits = model(ids).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        results[backend] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()}, sorted(set(ran)))
        ran.clear()
        with torch.no_grad():
            model(ids, attention_mask=torch.ones_like(ids).index_fill_(1, torch.tensor([0], device=DEVICE), 0))
        assert not ran, backend
    assert results["torch"][2] == [] and results["triton"][2] == ["short_conv_bwd", "short_conv_fwd"]
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-4, atol=1e-5)
    for name, grad in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_dense_path_at_training_width_on_gpu(dtype):
    """At the training width (C = 2304, several tiles each way) and K = 4: c bit for bit, the gradients
    against the PyTorch path's."""
    torch_conv, triton_conv = dense_pair(4, 2304)
    u, state = torch.randn(2, 1000, 2304, device="cuda").to(dtype), torch.randn(2, 3, 2304, device="cuda")
    probes = (torch.randn(2, 1000, 2304, device="cuda"), torch.randn(2, 3, 2304, device="cuda"))
    got, want = (run_dense(conv, u, state, probes) for conv in (triton_conv, torch_conv))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-5)
    for name, a, b in zip(["du", "dstate", "dweight"], got[2:], want[2:]):
        torch.testing.assert_close(a, b, **(tol if name != "dweight" else dict(rtol=1e-4, atol=1e-3)),
                                   msg=lambda m: f"{name}: {m}")
