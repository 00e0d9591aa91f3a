"""The level-0 memory: MDI's data-dependent decay, the gates and the recurrence (docs/ARCHITECTURE.md section 1).

    a_t       = W_E GELU(p_t) + b_E                       decay logits, W_E: pe_dim -> d
    log g_t   = clamp(logsigmoid(a_t), log 1e-6, log(1 - 1e-6))       (float32)
    h_t       = gamma_t h_{t-1} + (1 - gamma_t) g_t z_t
    g_t       = sigmoid(g~_t)                   recurrence_gate="input"  (a parallel scan)
              | sigmoid(W_g h_{t-1} + b_g)      recurrence_gate="state"  (a loop over t)

Padding: a padded position has gamma = 1 and input 0, so the state passes through.
Resets (packed documents): the carry into a document's first token is zeroed; the
token's own input keeps its weight (1 - gamma_t), exactly as at the start of a stream.

``recurrence`` is the one entry point: the "input" mode's fast path (``recurrence_inputs``,
fused in recurrence_triton.py on CUDA, then one scan) and the "state" mode's loop
(``StateGate``, a variant in state_gate.py) share its contract.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import initialization as init

from .scan import resolve_backend, scan
from .state_gate import StateGate

LOG_GAMMA_MIN = math.log(1e-6)
LOG_GAMMA_MAX = math.log1p(-1e-6)


class MDIDecay(nn.Module):
    """P -> GELU -> E: the decay generator. p: [B, T, pe_dim] -> log gamma [B, T, d] (fp32)."""

    def __init__(self, config):
        super().__init__()
        self.W_E = nn.Linear(config.pe_dim, config.hidden_size, bias=True)

    def logits(self, p: Tensor) -> Tensor:
        """a = W_E GELU(p): the decay logits, [B, T, d] in the model dtype."""
        return self.W_E(F.gelu(p))

    def forward(self, p: Tensor) -> Tensor:
        return log_gamma_from_logits(self.logits(p))


def log_gamma_from_logits(a: Tensor) -> Tensor:
    """clamp(logsigmoid(a), LOG_GAMMA_MIN, LOG_GAMMA_MAX) in float32 (the state's dtype)."""
    return F.logsigmoid(a.float()).clamp(LOG_GAMMA_MIN, LOG_GAMMA_MAX)


def init_decay_generator_(linear: nn.Linear, lo: float, hi: float) -> None:
    """Small W_E; b_E such that 1 - sigmoid(b_E) is log-uniform over [lo, hi] across channels
    (config.decay_init_min / max), so a fresh model already has memories of about 1 / hi to
    1 / lo tokens. (transformers' ``init`` functions leave a tensor loaded from a checkpoint as
    it is.)"""
    weight, bias = linear.weight, linear.bias
    bound = 0.1 * math.sqrt(6.0 / (weight.shape[0] + weight.shape[1]))
    init.uniform_(weight, -bound, bound)
    rate = torch.logspace(math.log10(lo), math.log10(hi), bias.numel(), dtype=torch.float64)
    init.copy_(bias, torch.log1p(-rate) - torch.log(rate))  # sigmoid(b) = 1 - rate


def gated_input(log_gamma: Tensor, gate_logits: Tensor, z: Tensor) -> Tensor:
    """x = (1 - gamma) sigmoid(g~) z in float32, with 1 - gamma = -expm1(log gamma) (exact near gamma = 1)."""
    return -torch.expm1(log_gamma) * torch.sigmoid(gate_logits.float()) * z.float()


class _RecurrenceInputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, g, z, real, reset):
        from .recurrence_triton import recurrence_inputs_fwd

        ctx.save_for_backward(a, g, z, real, reset)
        return recurrence_inputs_fwd(a, g, z, real, reset, LOG_GAMMA_MIN, LOG_GAMMA_MAX)

    @staticmethod
    def backward(ctx, d_x, d_carry):
        from .recurrence_triton import recurrence_inputs_bwd

        a, g, z, real, reset = ctx.saved_tensors
        d_x = torch.zeros_like(a, dtype=torch.float32) if d_x is None else d_x
        d_carry = torch.zeros_like(a, dtype=torch.float32) if d_carry is None else d_carry
        return (*recurrence_inputs_bwd(a, g, z, real, reset, d_x, d_carry, LOG_GAMMA_MIN, LOG_GAMMA_MAX), None, None)


def recurrence_inputs(a: Tensor, gate_logits: Tensor, z: Tensor, real: Tensor, reset: Tensor,
                      backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """The scan's inputs of the "input" mode from the decay logits a = W_E GELU(p).

    a, gate_logits, z: [B, T, d]; real, reset: [B, T] bool. Returns (x, carry) [B, T, d] fp32:
    x = (1 - gamma) sigmoid(g~) z and carry = log gamma (0 at padding, -inf at a reset).
    One fused Triton pass (recurrence_triton.py) where ``backend`` (the scan's choices) resolves to
    Triton; the same formulas in PyTorch otherwise, and under torch.compile, which fuses them itself.
    """
    if resolve_backend(backend, a.device) == "triton" and not torch.compiler.is_compiling():
        from .recurrence_triton import token_rows

        # z and g~ are slices of the fused projection (or of the convolution's output): read in place
        return _RecurrenceInputs.apply(token_rows(a), token_rows(gate_logits), token_rows(z), real, reset)
    log_gamma = log_gamma_from_logits(a).masked_fill(~real[..., None], 0.0)
    return gated_input(log_gamma, gate_logits, z), log_gamma.masked_fill(reset[..., None], float("-inf"))


class _FusedRecurrence(torch.autograd.Function):
    """``recurrence_inputs`` and the scan as one autograd node (Triton, eager). The backward recomputes
    the scan's carry (log gamma, float32) from a, g~, z, which the inputs' own backward keeps anyway, instead
    of storing it: 4 bytes less per token and channel held for the backward, for one elementwise pass."""

    @staticmethod
    def forward(ctx, a, g, z, real, reset, h0):
        from .recurrence_triton import recurrence_inputs_fwd
        from .scan_triton import scan_fwd

        x, carry = recurrence_inputs_fwd(a, g, z, real, reset, LOG_GAMMA_MIN, LOG_GAMMA_MAX)
        h, h_T = scan_fwd(x, carry, h0)
        ctx.save_for_backward(a, g, z, real, reset, h, h0)
        return h, h_T

    @staticmethod
    def backward(ctx, d_h, d_h_T):
        from .recurrence_triton import recurrence_inputs_bwd, recurrence_inputs_fwd
        from .scan_triton import scan_bwd

        a, g, z, real, reset, h, h0 = ctx.saved_tensors
        _, carry = recurrence_inputs_fwd(a, g, z, real, reset, LOG_GAMMA_MIN, LOG_GAMMA_MAX)
        d_h = torch.zeros_like(h) if d_h is None else d_h.contiguous()
        d_x, d_carry, d_h0 = scan_bwd(d_h, None if d_h_T is None else d_h_T.contiguous(), h, carry, h0)
        del carry
        d_a, d_g, d_z = recurrence_inputs_bwd(a, g, z, real, reset, d_x, d_carry, LOG_GAMMA_MIN, LOG_GAMMA_MAX)
        return d_a, d_g, d_z, None, None, d_h0


def recurrence(z: Tensor, gate_logits: Optional[Tensor], decay_logits: Tensor, real: Tensor, reset: Tensor,
               h0: Optional[Tensor], state_gate: Optional[StateGate] = None, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """h_t = gamma_t h_(t-1) + (1 - gamma_t) g_t z_t over a sequence.

    z: [B, T, d]; gate_logits: [B, T, d] g~ ("input" mode) or None with ``state_gate`` ("state"
    mode); decay_logits: [B, T, d] a = W_E GELU(p); real, reset: [B, T] bool; h0: [B, d] fp32 or
    None (zeros); backend: "auto", "triton" or "torch" (``config.kernel_backend``), for every kernel
    it runs. Returns (h [B, T, d] fp32, h_T [B, d] fp32).
    """
    if state_gate is None:
        fused = (resolve_backend(backend, z.device) == "triton" and not torch.compiler.is_compiling()
                 and z.shape[1] > 0)
        if fused:
            from .recurrence_triton import token_rows

            h0 = None if h0 is None else h0.float().contiguous()
            return _FusedRecurrence.apply(token_rows(decay_logits), token_rows(gate_logits), token_rows(z), real, reset, h0)
        x, carry = recurrence_inputs(decay_logits, gate_logits, z, real, reset, backend)
        return scan(x, carry, h0, output_final_state=True, backend=backend)
    log_gamma = log_gamma_from_logits(decay_logits).masked_fill(~real[..., None], 0.0)
    return state_gate(z, log_gamma, reset, h0, backend)
