"""mm_rec/loss.py: the chunked linear + cross-entropy against the plain definition
(tests/naive.py), and the model's loss: shifted by one token, -100 ignored, the same through the
training path (no logits) and the evaluation path, labels that are not token ids refused in both,
and a batch with nothing to score handled as transformers' own models handle it."""

import pytest
import torch
import torch.nn.functional as F
from common import VOCAB, random_ids
from naive import naive_causal_lm_loss

from mm_rec.loss import causal_lm_loss
from mm_rec.loss_triton import MAX_BLOCK, cross_entropy_rows_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel: interpreted on CPU (conftest)


def inputs(seed, B=3, T=17, d=8, V=50):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    weight = torch.randn(V, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 3] = labels[2, :5] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_rows", [1, 7, 51, 1000])
@pytest.mark.parametrize("num_items", [None, 29, torch.tensor(29)], ids=["mean", "int", "tensor"])
def test_loss_and_gradients_equal_the_definition(chunk_rows, num_items):
    hidden, weight, labels = inputs(0)
    grads = []
    for fn in (lambda h, w: causal_lm_loss(h, w, labels, num_items, chunk_rows=chunk_rows),
               lambda h, w: naive_causal_lm_loss(h, w, labels, num_items)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(h, w)
        (3.0 * loss).backward()  # a non-unit upstream gradient
        grads.append((loss.detach(), h.grad, w.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_frozen_head_gets_no_gradient_and_hidden_still_does():
    hidden, weight, labels = inputs(1)
    h = hidden.clone().requires_grad_()
    causal_lm_loss(h, weight, labels, chunk_rows=5).backward()
    ref = hidden.clone().requires_grad_()
    naive_causal_lm_loss(ref, weight, labels).backward()
    torch.testing.assert_close(h.grad, ref.grad, rtol=1e-12, atol=1e-12)


def test_bf16_autocast_matches_fp32_within_bf16_precision():
    hidden, weight, labels = (t.float() if t.is_floating_point() else t for t in inputs(2, T=40, d=32, V=300))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = causal_lm_loss(hidden, weight, labels, chunk_rows=16)
    assert loss.dtype == torch.float32
    ref = naive_causal_lm_loss(hidden.double(), weight.double(), labels)
    assert abs(loss.item() - ref.item()) <= 2e-2 * abs(ref.item())  # bf16 operands


@pytest.mark.parametrize("V", [50, MAX_BLOCK + 77])  # one block with a masked tail; two blocks
def test_kernel_row_losses_and_gradients_equal_log_softmax(V):
    """loss_triton's kernel against the definition: loss = -log_softmax at the target, gradient =
    softmax - one-hot, both zero for an ignored row; large logits (an online maximum that moves)
    included."""
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(5, V, generator=g) * 4.0
    logits[1, V - 1] = 300.0  # the row's maximum in its last block
    logits[2] -= 1000.0
    targets = torch.tensor([0, V - 1, 3, -100, V - 2])
    got = logits.clone().to(DEVICE)
    losses = cross_entropy_rows_(got, targets.to(DEVICE), -100).cpu()
    log_p = logits.double().log_softmax(-1)
    valid = targets != -100
    want = torch.where(valid, -log_p.gather(1, targets.clamp(min=0)[:, None])[:, 0], 0.0)
    torch.testing.assert_close(losses.double(), want, rtol=1e-5, atol=1e-5)
    grad = (log_p.exp() - F.one_hot(targets.clamp(min=0), V)) * valid[:, None]
    # float32 logits near -1000 carry their exponent to 6e-5 (one ulp): the softmax to about that, relatively
    torch.testing.assert_close(got.cpu().double(), grad, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
def test_kernel_path_equals_the_definition(chunk_rows):
    """causal_lm_loss with the kernel (backend "triton"): loss and gradients against the definition, in
    float32 (the kernel's arithmetic)."""
    hidden, weight, labels = (t.float() if t.is_floating_point() else t for t in inputs(4))
    got, want = [], []
    for fn, out in ((lambda h, w: causal_lm_loss(h, w, labels.to(DEVICE), 29, chunk_rows=chunk_rows, backend="triton"),
                     got),
                    (lambda h, w: naive_causal_lm_loss(h.double(), w.double(), labels, 29), want)):
        device = DEVICE if out is got else "cpu"
        h, w = hidden.clone().to(device).requires_grad_(), weight.clone().to(device).requires_grad_()
        loss = fn(h, w)
        (3.0 * loss).backward()
        out.extend(t.detach().cpu().double() for t in (loss, h.grad, w.grad))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_kernel_path_in_bf16_equals_the_pytorch_path():
    """Under bf16 autocast the kernel reads the bf16 logits the PyTorch path upcasts: the same loss and
    gradients up to float32 summation order and one bf16 rounding of the gradient."""
    hidden, weight, labels = (t.float() if t.is_floating_point() else t for t in inputs(5, T=40, d=32, V=300))
    results = []
    for backend in ("torch", "triton"):
        h, w = hidden.clone().to(DEVICE).requires_grad_(), weight.clone().to(DEVICE).requires_grad_()
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            loss = causal_lm_loss(h, w, labels.to(DEVICE), chunk_rows=16, backend=backend)
        loss.backward()
        results.append([t.detach().cpu() for t in (loss, h.grad, w.grad)])
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[1][1:], results[0][1:]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3)


def test_model_training_loss_equals_the_logits_loss(tiny_model):
    """The model's training path (no logits) and its evaluation path (logits, then the loss)
    give the same loss and the same gradients."""
    model = tiny_model(seed=3).double().train()
    ids = random_ids((2, 21), seed=3)
    labels = ids.clone()
    labels[1, :4] = -100
    out = model(ids, labels=labels)
    assert out.logits is None
    out.loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hidden = model.model(ids).last_hidden_state
    reference = naive_causal_lm_loss(hidden, model.lm_head.weight, labels)
    reference.backward()
    torch.testing.assert_close(out.loss, reference, rtol=1e-12, atol=1e-12)
    for name, param in model.named_parameters():
        torch.testing.assert_close(fused[name], param.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_model_training_loss_with_the_kernel_equals_the_logits_loss(tiny_model):
    """kernel_backend="triton" in float32: the training path's loss kernel (and the model's other kernels)
    against the evaluation path's logits and loss, gradients included."""
    model = tiny_model(seed=4, kernel_backend="triton").to(DEVICE).train()
    ids = random_ids((2, 21), seed=4).to(DEVICE)
    labels = ids.clone()
    labels[0, 5:9] = -100
    out = model(ids, labels=labels)
    assert out.logits is None
    out.loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(ids).logits
    reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    reference.backward()
    torch.testing.assert_close(out.loss, reference, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(fused[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_training_loss_is_the_chunked_op_and_equals_eager(backend, tiny_model):
    """Under torch.compile (fullgraph) the training loss is one opaque op: no [rows, vocabulary] logits in the
    graph, and the same loss and gradients as the eager step."""
    model = tiny_model(seed=5).train()
    ids = random_ids((2, 21), seed=5)
    labels = ids.clone()
    labels[1, :3] = -100
    results = []
    for run in ("eager", "compiled"):
        model.zero_grad()
        forward = torch.compile(model, fullgraph=True, backend=backend) if run == "compiled" else model
        out = forward(ids, labels=labels)
        assert out.logits is None
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_loss_is_shifted_cross_entropy_ignoring_minus_100(tiny_model):
    model = tiny_model(seed=3)
    ids = torch.randint(0, VOCAB, (2, 13))
    labels = ids.clone()
    labels[0, 5] = labels[1, :3] = labels[1, 12] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, VOCAB).double()
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100
    manual = -logits[keep].log_softmax(-1).gather(1, targets[keep, None]).mean()
    torch.testing.assert_close(out.loss.double(), manual, rtol=1e-5, atol=1e-6)
    # An independent check that the shift is by exactly one token: labels = ids predicts ids[t + 1].
    unshifted = F.cross_entropy(out.logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    assert not torch.isclose(out.loss, unshifted)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("bad", [-1, -5, -101, VOCAB, VOCAB + 7])
def test_labels_that_are_not_token_ids_are_refused_in_both_modes(mode, bad, tiny_model):
    """Not -100 (ignored) and not in [0, vocab_size): a ValueError naming labels and the value, in
    training (where the chunked loss would otherwise read -1 as token 0) and in evaluation."""
    model = getattr(tiny_model(seed=3), mode)()
    ids = random_ids((2, 9), seed=3)
    labels = ids.clone()
    labels[1, 4] = bad
    with pytest.raises(ValueError, match=rf"labels must be token ids in \[0, vocab_size={VOCAB}\) or -100.*row 1, "
                                         rf"column 4 holds {bad}"):
        model(ids, labels=labels)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        model(ids, labels=labels.float())


def _llama(vocab_size):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


NOTHING_TO_SCORE = {"none": None, "int 0": 0, "int 7": 7, "tensor 0": torch.tensor(0), "tensor 7": torch.tensor(7)}


@pytest.mark.parametrize("num_items", list(NOTHING_TO_SCORE))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_all_ignored_labels_give_what_transformers_models_give(mode, num_items, tiny_model):
    """Every label -100: the loss is the definition's (the summed loss, 0, over num_items_in_batch,
    else over the scored count 0: NaN), in training and evaluation mode alike, as LlamaForCausalLM
    computes it on the installed transformers; the gradients are zero, as Llama's are."""
    num_items = NOTHING_TO_SCORE[num_items]
    ids = random_ids((2, 9), seed=5)
    labels = torch.full_like(ids, -100)
    losses = {}
    for name, model in (("mmrec", tiny_model(seed=3)), ("llama", _llama(VOCAB))):
        model = getattr(model, mode)()
        loss = model(ids, labels=labels, num_items_in_batch=num_items).loss
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.equal(g, torch.zeros_like(g)) for g in grads), name
        losses[name] = loss.detach()
    definition = torch.tensor(0.0) / (0 if num_items is None else num_items)
    torch.testing.assert_close(losses["mmrec"], definition, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(losses["llama"], definition, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_batch_with_some_labels_ignored_scores_the_rest_in_both_modes(mode, tiny_model):
    """With num_items_in_batch as the Trainer passes it (a tensor, over the whole accumulated
    batch), the loss is the summed loss of the scored labels over it, in both modes."""
    model = getattr(tiny_model(seed=3).double(), mode)()
    ids = random_ids((2, 11), seed=6)
    labels = ids.clone()
    labels[0] = -100
    labels[1, :5] = -100
    num_items = torch.tensor(13)
    loss = model(ids, labels=labels, num_items_in_batch=num_items).loss
    hidden = model.model(ids).last_hidden_state
    reference = naive_causal_lm_loss(hidden, model.lm_head.weight, labels, num_items)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-6, atol=0)  # logits are float32 in eval mode
