"""Ground truth for the tests: readable per-token loops written from docs/ARCHITECTURE.md."""

import torch


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
        hb = h[b]
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
                           attention_mask=None, position_ids=None):
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
                K, V = naive_fold(K, V, summaries, decay)
                summaries = []
            assert len(open_block) == p % N
            keys = torch.cat([K] + [s[0][None] for s in summaries])
            values = torch.cat([V] + [s[1][None] for s in summaries])
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
