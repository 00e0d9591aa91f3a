"""The design note's state-gated recurrence, a documented variant (recurrence_gate="state",
docs/ARCHITECTURE.md section 1):

    h_t = gamma_t h'_t + (1 - gamma_t) sigmoid(W_g h'_t + b_g) z_t,    h'_t = keep_t h_(t-1)

The gate reads the previous state, so the tokens of a row are walked one after another (a Triton
program per row on CUDA, state_gate_triton.py; a PyTorch loop elsewhere). The default
recurrence (recurrence.py) gates by the current token alone and runs as one parallel scan.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .scan import resolve_backend


class StateGate(nn.Module):
    """The state gate sigma(W_g h_{t-1} + b_g) (recurrence_gate="state"); makes the recurrence sequential."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.W_g = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, z: Tensor, log_gamma: Tensor, reset: Tensor, h0: Optional[Tensor],
                backend: str = "auto") -> Tuple[Tensor, Tensor]:
        """The recurrence with this gate, a loop over t; ``recurrence``'s contract. Float32 throughout
        (autocast off), like the state. ``backend`` as the scan's: "auto" walks t in a Triton kernel
        on CUDA and in a PyTorch loop elsewhere."""
        B, T, d = z.shape
        h0 = z.new_zeros(B, d, dtype=torch.float32) if h0 is None else h0.float()
        keep = (~reset).float()[..., None]
        triton = resolve_backend(backend, z.device) == "triton" and not torch.compiler.is_compiling()
        with torch.autocast(device_type=z.device.type, enabled=False):
            H = _StateGateLoop.apply(z.float(), log_gamma.float(), keep, self.W_g.weight.float(), self.W_g.bias.float(),
                                     h0, triton)
        return H, H[:, -1].clone()  # its own storage: a cache does not keep H alive


class _StateGateLoop(torch.autograd.Function):
    """h_t = gamma_t h'_t + (1 - gamma_t) sigmoid(W h'_t + b) z_t with h'_t = keep_t h_(t-1), as one
    autograd node. The walk over t is one Triton program per row on CUDA (``triton=True``,
    state_gate_triton.py) or a PyTorch loop of a few kernels per step that records nothing; the
    backward walks t in reverse keeping only the carried gradient; dW, db, dz and d log gamma are
    then a few batched operations over all t.

    z, log_gamma: [B, T, d] float32; keep: [B, T, 1] (0 where a document starts); weight [d, d],
    bias [d], h0 [B, d]. Returns H [B, T, d]."""

    @staticmethod
    def forward(ctx, z, log_gamma, keep, weight, bias, h0, triton):
        B, T, d = z.shape
        gamma = torch.exp(log_gamma)
        zo = -torch.expm1(log_gamma) * z  # (1 - gamma) z
        if triton:
            from .state_gate_triton import state_gate_fwd

            H, S = state_gate_fwd(gamma, zo, keep[..., 0], weight, bias, h0)
        else:
            H, S = z.new_empty(B, T, d), z.new_empty(B, T, d)
            weight_t, h = weight.t(), h0
            for t in range(T):
                hp = h * keep[:, t]
                s = torch.sigmoid(torch.addmm(bias, hp, weight_t), out=S[:, t])
                h = torch.addcmul(gamma[:, t] * hp, s, zo[:, t], out=H[:, t])
        ctx.triton = triton
        ctx.save_for_backward(z, log_gamma, keep, weight, h0, H, S)
        return H

    @staticmethod
    def backward(ctx, grad_H):
        z, log_gamma, keep, weight, h0, H, S = ctx.saved_tensors
        B, T, d = z.shape
        HP = keep * torch.cat([h0[:, None], H[:, :-1]], dim=1)  # h'_t
        gamma = torch.exp(log_gamma)
        one_minus_gamma = -torch.expm1(log_gamma)
        da_per_g = S * (1 - S) * one_minus_gamma * z  # d(W h' + b) per unit of dh_t
        grad_H = grad_H.float()
        if ctx.triton:
            from .state_gate_triton import state_gate_bwd

            G, DA, carry = state_gate_bwd(grad_H, da_per_g, gamma, keep[..., 0], weight)
        else:
            G, DA = torch.empty_like(z), torch.empty_like(z)
            carry = torch.zeros_like(h0)
            for t in range(T - 1, -1, -1):
                g = torch.add(grad_H[:, t], carry, out=G[:, t])
                da = torch.mul(g, da_per_g[:, t], out=DA[:, t])
                carry = torch.addmm(g * gamma[:, t], da, weight) * keep[:, t]  # dh_(t-1) = keep_t (gamma_t g + W^T da)
        GS = G * S
        grad_z = GS * one_minus_gamma
        grad_log_gamma = gamma * (G * HP - GS * z)  # d gamma / d log gamma = gamma, d (1 - gamma) = -gamma
        grad_weight = DA.reshape(-1, d).t() @ HP.reshape(-1, d)
        return grad_z, grad_log_gamma, None, grad_weight, DA.sum(dim=(0, 1)), carry, None
