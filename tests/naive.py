"""Ground truth for the tests: readable per-token loops written from ARCHITECTURE.md."""

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
