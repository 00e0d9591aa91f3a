"""Ground truth for the tests: readable per-token loops and formulas written from
docs/ARCHITECTURE.md (and transformers' causal-LM loss). None of them calls mm_rec."""

import math

import torch
import torch.nn.functional as F


def naive_scan(x, log_gamma, initial_state=None):
    """h_t = x_t + gamma_t * h_{t-1}, one step at a time, in float64. Returns (h, h_T)."""
    B, T, D = x.shape
    h = torch.zeros(B, D, dtype=torch.float64) if initial_state is None else initial_state.double()
    gamma = torch.exp(log_gamma.double())
    out = []
    for t in range(T):
        h = x[:, t].double() + gamma[:, t] * h
        out.append(h)
    return torch.stack(out, 1), h


def naive_scan_grads(x, log_gamma, h0, grad_h, grad_h_T):
    """Autograd through the float64 naive_scan: (d_x, d_log_gamma, d_h0) of sum(h grad_h) + sum(h_T grad_h_T)."""
    x, log_gamma, h0 = (t.detach().double().requires_grad_() for t in (x, log_gamma, h0))
    h, h_T = naive_scan(x, log_gamma, h0)
    ((h * grad_h.double()).sum() + (h_T * grad_h_T.double()).sum()).backward()
    return x.grad, log_gamma.grad, h0.grad


def naive_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def naive_rms_norm(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def naive_log_gamma(a):
    """log gamma = clamp(log sigmoid(a), log 1e-6, log(1 - 1e-6)), from the decay logits a, in float64."""
    return (-torch.log1p(torch.exp(-a.double()))).clamp(math.log(1e-6), math.log1p(-1e-6))


def naive_decay(p, W_E, b_E):
    """MDI's decay generator: log gamma = clamp(log sigmoid(W_E GELU(p) + b_E)), in float64."""
    return naive_log_gamma(naive_gelu(p.double()) @ W_E.double().T + b_E.double())


def naive_recurrence_inputs(a, gate_logits, z, real, reset):
    """The scan's inputs of the "input" mode from the decay logits a, in float64:
    x = (1 - gamma) sigmoid(g~) z and carry = log gamma (0 at padding, -inf at a reset)."""
    log_gamma = naive_log_gamma(a).masked_fill(~real[..., None], 0.0)
    x = -torch.expm1(log_gamma) * torch.sigmoid(gate_logits.double()) * z.double()
    return x, log_gamma.masked_fill(reset[..., None], float("-inf"))


def naive_causal_lm_loss(hidden, weight, labels, num_items_in_batch=None):
    """transformers' causal-LM loss written out: logits, shift by one, -100 ignored; summed over
    tokens and divided by num_items_in_batch (default: the number of scored tokens)."""
    logits = (hidden @ weight.T).double()
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:]
    total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return total / (num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum())


def naive_positions(attention_mask, position_ids=None):
    """Per-row lists of (t, p, starts_document) for the real tokens, from docs/ARCHITECTURE.md section 5:
    p counts the real tokens of the row; with position_ids, p is taken as given and p == 0
    starts a new document."""
    B, T = attention_mask.shape
    rows = []
    for b in range(B):
        tokens, count = [], 0
        for t in range(T):
            if not bool(attention_mask[b, t]):
                continue
            p = count if position_ids is None else int(position_ids[b, t])
            tokens.append((t, p, position_ids is not None and p == 0))
            count += 1
        rows.append(tokens)
    return rows


def naive_recurrence(z, log_gamma, attention_mask=None, reset=None, h0=None, gate_logits=None, state_gate=None):
    """h_t = gamma_t h_{t-1} + (1 - gamma_t) g_t z_t, one token at a time, in float64.

    g_t = sigmoid(gate_logits_t) ("input" mode) or sigmoid(W_g h_{t-1} + b_g) with
    state_gate = (W_g, b_g) ("state" mode). A padded token (attention_mask 0) leaves h
    unchanged; a reset token sees h_{t-1} = 0 (a fresh stream). Returns (h [B, T, d], h_T).
    """
    B, T, d = z.shape
    z, log_gamma = z.double(), log_gamma.double()
    gamma, rate = torch.exp(log_gamma), -torch.expm1(log_gamma)  # 1 - gamma, exact also near gamma = 1
    h = torch.zeros(B, d, dtype=torch.float64) if h0 is None else h0.double().clone()
    out = torch.zeros(B, T, d, dtype=torch.float64)
    for b in range(B):
        hb = h[b].clone()  # not a view of h: autograd can differentiate the loop (h[b] is written below)
        for t in range(T):
            if attention_mask is not None and not bool(attention_mask[b, t]):
                out[b, t] = hb
                continue
            if reset is not None and bool(reset[b, t]):
                hb = torch.zeros_like(hb)
            if state_gate is None:
                g = torch.sigmoid(gate_logits[b, t].double())
            else:
                W_g, b_g = state_gate
                g = torch.sigmoid(W_g.double() @ hb + b_g.double())
            hb = gamma[b, t] * hb + rate[b, t] * g * z[b, t]
            out[b, t] = hb
        h[b] = hb
    return out, h


def naive_short_conv(u, weight, attention_mask=None, position_ids=None, state=None):
    """c_t = sum_j w[:, j] * u_(t-j) over the current and previous K - 1 real tokens of t's document,
    one token at a time, in float64 (docs/ARCHITECTURE.md section 1). u: [B, T, d]; weight: [d, K];
    state: [B, K-1, d], the K - 1 real u's before this call (oldest first; default zeros).
    Returns (c [B, T, d] (zeros at padding), the state after the call [B, K-1, d])."""
    B, T, d = u.shape
    K = weight.shape[1]
    u, weight = u.double(), weight.double()
    state = torch.zeros(B, K - 1, d, dtype=torch.float64) if state is None else state.double()
    out, finals = torch.zeros(B, T, d, dtype=torch.float64), []
    for b, tokens in enumerate(naive_positions(torch.ones(B, T) if attention_mask is None else attention_mask,
                                               position_ids)):
        previous = list(state[b])  # the document's real u's so far, oldest first
        for t, _, starts_document in tokens:
            if starts_document:
                previous = []
            previous.append(u[b, t])
            for j in range(min(K, len(previous))):
                out[b, t] += weight[:, j] * previous[-1 - j]
        window = [torch.zeros(d, dtype=torch.float64)] * (K - 1) + previous
        finals.append(torch.stack(window[len(window) - (K - 1):]) if K > 1 else torch.zeros(0, d, dtype=torch.float64))
    return out, torch.stack(finals)


def naive_route(slot_keys_at_start, block_key):
    """argmax_j <K_j, k>, ties to the lowest j (a strict > in a loop)."""
    best, best_score = 0, None
    for j in range(slot_keys_at_start.shape[0]):
        score = float(slot_keys_at_start[j] @ block_key)
        if best_score is None or score > best_score:
            best, best_score = j, score
    return best


def naive_fold(slot_keys, slot_values, blocks, decay):
    """Fold block summaries [(k_bar, v_bar), ...] into slots [S, d] one block at a time:
    K_j <- lam K_j + (1 - lam) k_bar with j routed against the slots at the segment start."""
    K, V = slot_keys.double().clone(), slot_values.double().clone()
    start = K.clone()
    for block_key, block_value in blocks:
        j = naive_route(start, block_key.double())
        K[j] = decay * K[j] + (1 - decay) * block_key.double()
        V[j] = decay * V[j] + (1 - decay) * block_value.double()
    return K, V


def naive_memory_attention(q, k, v, slot_keys, slot_values, block_size, segment_length, decay, num_heads,
                           attention_mask=None, position_ids=None, memory_levels="slots+blocks"):
    """The whole multi-memory attention of docs/ARCHITECTURE.md section 2, token by token, in float64.

    q, k, v: [B, T, d]; slot_*: the learned slots [S, d]. Keeps explicit lists per row: the
    long-term slots, the completed block summaries of the current segment, the open block.
    Returns (m [B, T, d] (zeros at padding), per-row final memory dicts).
    """
    B, T, d = q.shape
    N, L, dh = block_size, segment_length, d // num_heads
    q, k, v = q.detach().double(), k.detach().double(), v.detach().double()
    slot_keys, slot_values = slot_keys.detach(), slot_values.detach()
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.bool)
    out = torch.zeros(B, T, d, dtype=torch.float64)
    finals = []
    for b, tokens in enumerate(naive_positions(attention_mask, position_ids)):
        K, V = slot_keys.double().clone(), slot_values.double().clone()
        summaries, open_block = [], []
        for t, p, starts_document in tokens:
            if starts_document:
                K, V = slot_keys.double().clone(), slot_values.double().clone()
                summaries, open_block = [], []
            elif p % L == 0 and p > 0:
                if memory_levels != "blocks":  # "blocks": the slots never fold
                    K, V = naive_fold(K, V, summaries, decay)
                summaries = []
            assert len(open_block) == p % N
            visible = summaries if memory_levels != "slots" else []  # "slots": summaries unseen
            keys = torch.cat([K] + [s[0][None] for s in visible])
            values = torch.cat([V] + [s[1][None] for s in visible])
            for head in range(num_heads):
                cols = slice(head * dh, (head + 1) * dh)
                weights = torch.softmax(keys[:, cols] @ q[b, t, cols] / dh ** 0.5, dim=0)
                out[b, t, cols] = weights @ values[:, cols]
            open_block.append((k[b, t], v[b, t]))
            if len(open_block) == N:
                summaries.append((torch.stack([e[0] for e in open_block]).mean(0),
                                  torch.stack([e[1] for e in open_block]).mean(0)))
                open_block = []
        finals.append({"slot_keys": K, "slot_values": V, "summaries": summaries, "open_block": open_block})
    return out, finals


def naive_block(block, config, x, attention_mask, position_ids, dropout_masks=None):
    """docs/ARCHITECTURE.md section 1 for one block, written out in float64 from its parameters.
    dropout_masks: None (evaluation) or the two [B, T, d] multipliers of the residual branches,
    x' = x + M1 * W_o(r + m) and y = x' + M2 * FFN(RMSNorm(x')) (dropout's kept / (1 - p), or 0).
    Returns (h, y)."""
    M1, M2 = (1.0, 1.0) if dropout_masks is None else (m.double() for m in dropout_masks)
    P = {name: p.detach().double() for name, p in block.named_parameters()}
    d, eps = config.hidden_size, config.rms_norm_eps
    x = x.double()
    u = naive_rms_norm(x, P["norm1.weight"], eps)
    has_conv = bool(getattr(config, "short_conv_size", 0))
    conv_recurrence = has_conv and getattr(config, "short_conv_inputs", "all") == "recurrence"
    if has_conv and not conv_recurrence:
        u, _ = naive_short_conv(u, P["short_conv.weight"], attention_mask, position_ids)
    memory = config.memory_levels != "none"
    names = (["q", "k", "v"] if memory else []) + ["z"] + (["g"] if config.recurrence_gate == "input" else [])
    names += (["og"] if config.output_gate else []) + ["p"]
    widths = [config.pe_dim if n == "p" else d for n in names]
    if config.use_hem:
        W = dict(zip(names, P["hem.W_fused.weight"].split(widths)))
        bias = dict(zip(names, P["hem.W_fused.bias"].split(widths)))
    else:
        W = {n: P[f"hem.W_{n}.weight"] for n in names}
        bias = {n: P[f"hem.W_{n}.bias"] for n in names}
    proj = {n: u @ W[n].T + bias[n] for n in names}
    if conv_recurrence:  # the recurrence's inputs z, g~ (input gate), p, each with its own rows of the kernel
        w, row = P["short_conv.weight"], 0
        for n in [n for n in ("z", "g", "p") if n in proj]:
            width = proj[n].shape[-1]
            proj[n], _ = naive_short_conv(proj[n], w[row:row + width], attention_mask, position_ids)
            row += width
        assert row == w.shape[0]
    log_gamma = naive_decay(proj["p"], P["mdi.W_E.weight"], P["mdi.W_E.bias"])
    real = attention_mask.bool()
    reset = real & (position_ids == 0) if position_ids is not None else None
    if config.recurrence_gate == "input":
        h, _ = naive_recurrence(proj["z"], log_gamma, real, reset, gate_logits=proj["g"])
    else:
        h, _ = naive_recurrence(proj["z"], log_gamma, real, reset,
                                state_gate=(P["state_gate.W_g.weight"], P["state_gate.W_g.bias"]))
    H = config.num_attention_heads
    r = naive_rms_norm(h.unflatten(-1, (H, -1)), 1.0, eps).flatten(-2) * P["readout_norm.weight"]
    gated = getattr(config, "gate_memory", False)
    if config.output_gate and not gated:
        r = r * proj["og"] * torch.sigmoid(proj["og"])  # silu
    if memory:
        m, _ = naive_memory_attention(
            proj["q"], proj["k"], proj["v"], P["memory.slot_keys"], P["memory.slot_values"], config.memory_block_size,
            config.memory_segment_length, config.memory_decay, H, attention_mask, position_ids, config.memory_levels,
        )
        r = r + m
    if config.output_gate and gated:  # the gate over the state readout and the memory read together
        r = r * proj["og"] * torch.sigmoid(proj["og"])
    x = x + M1 * (r @ P["W_o.weight"].T)
    u = naive_rms_norm(x, P["norm2.weight"], eps)
    act = {"gelu": naive_gelu, "silu": lambda a: a * torch.sigmoid(a)}[config.hidden_act]
    if config.ffn_gate:  # GLU: act(gate u) * up u
        inner = act(u @ P["ffn.gate.weight"].T) * (u @ P["ffn.up.weight"].T)
    else:
        inner = act(u @ P["ffn.up.weight"].T)
    return h, x + M2 * (inner @ P["ffn.down.weight"].T)
