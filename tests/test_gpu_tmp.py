"""GPU checks of the whole model (run on the H100; skipped without CUDA)."""

import pytest
import torch

from mm_rec import MMRecConfig, MMRecForCausalLM

pytestmark = pytest.mark.gpu


def gpu_model(backend, dtype, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
               memory_block_size=16, memory_segment_length=128, num_memory_slots=8, scan_backend=backend)
    cfg.update(overrides)
    return MMRecForCausalLM(MMRecConfig(**cfg)).to("cuda", dtype).eval()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_triton_backend_logits_equal_torch_backend(dtype, tol):
    ids = torch.randint(0, 512, (4, 600), device="cuda")
    with torch.no_grad():
        triton_logits = gpu_model("triton", dtype)(ids).logits
        torch_logits = gpu_model("torch", dtype)(ids).logits
    scale = torch_logits.abs().max()
    assert (triton_logits - torch_logits).abs().max() <= tol * max(1.0, scale.item())


def test_auto_backend_picks_triton_on_cuda():
    from mm_rec.scan import resolve_backend
    assert resolve_backend("auto", torch.device("cuda")) == "triton"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_exactness_on_gpu_chunked_and_token_by_token(dtype, tol):
    model = gpu_model("triton", dtype)
    ids = torch.randint(0, 512, (2, 300), device="cuda")
    cuts = [0, 100, 101, 257] + list(range(258, 301))  # chunks, then token by token
    with torch.no_grad():
        full = model(ids).logits
        cache, parts = None, []
        for a, b in zip(cuts[:-1], cuts[1:]):
            out = model(ids[:, a:b], cache=cache, use_cache=True)
            cache = out.cache
            parts.append(out.logits)
        chunked = torch.cat(parts, 1)
    scale = max(1.0, full.abs().max().item())
    assert (chunked - full).abs().max() <= tol * scale


def test_compiled_training_step_matches_eager():
    model = gpu_model("triton", torch.float32).train()
    ids = torch.randint(0, 512, (2, 256), device="cuda")
    eager_loss = model(ids, labels=ids).loss
    eager_grads = torch.autograd.grad(eager_loss, [p for p in model.parameters()], allow_unused=True)
    compiled = torch.compile(model)
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert abs(loss.item() - eager_loss.item()) <= 1e-3 * abs(eager_loss.item())
    for p, g in zip(model.parameters(), eager_grads):
        if g is not None:
            assert torch.allclose(p.grad, g, atol=1e-3, rtol=1e-2)


def test_bf16_training_step_long_sequence_is_finite():
    model = gpu_model("triton", torch.bfloat16).train()
    ids = torch.randint(0, 512, (2, 4096), device="cuda")
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
