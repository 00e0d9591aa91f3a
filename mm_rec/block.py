"""One MM-Rec block (docs/ARCHITECTURE.md section 1):

    u = RMSNorm1(x);  q, k, v, z, g~, p = HEM(u);  log gamma = MDI(p)
    h = recurrence(z, gate, gamma);  r = GroupRMSNorm_H(h);  m = MultiMemoryAttention(q, k, v)
    x' = x + Dropout(W_o (r + m));  y = x' + Dropout(FFN(RMSNorm2(x')))

with output_gate, r * silu(o) in place of r, or (r + m) * silu(o) in place of r + m with gate_memory;
with short_conv_size K, a depthwise causal convolution c_t = sum_{j<K} w_j * a_(t-j) over the current
and previous K - 1 real tokens of the document (conv.py), on
  short_conv_inputs="all":        a = u, and HEM(c) in place of HEM(u) (every slice sees the window);
  short_conv_inputs="recurrence": a = [z, g~, p] (channels concatenated; g~ in the "input" gate mode
                                  only), split back into the z, g~, p the recurrence and MDI read;
                                  q, k, v (the memory) and o (the output gate) stay per token.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .cache import LayerState
from .conv import ShortConv, conv_channels
from .hem import HEMProjection, Projections
from .memory import MemoryState, MultiMemoryAttention
from .norms import GroupRMSNorm, RMSNorm
from .positions import TokenLayout
from .readout_triton import AVAILABLE as READOUT_KERNEL
from .recurrence import MDIDecay, recurrence
from .scan import resolve_backend
from .state_gate import StateGate
from .swiglu_triton import AVAILABLE as SWIGLU_KERNEL
from .swiglu_triton import DTYPES as SWIGLU_DTYPES


class _SwiGLUDown(torch.autograd.Function):
    """down(silu(a) * b) that keeps a, b and the weight for the backward, where PyTorch's three operations keep a,
    silu(a), b and the product: the backward recomputes silu(a) and the product (two elementwise passes), then takes
    the gradients with the operations PyTorch's own backward runs, so the results are the same to the bit. With
    ``fused`` (FeedForward._swiglu_in_kernels), the elementwise work is swiglu_triton's kernels instead: one pass
    forward, and one backward that writes both gradients and the recomputed product (rounded where PyTorch rounds)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, weight: Tensor, fused: bool = False) -> Tensor:
        ctx.weight_dtype, ctx.fused = weight.dtype, fused
        weight = weight.to(a.dtype)  # as autocast casts it for the linear (a: the compute dtype)
        ctx.save_for_backward(a, b, weight)
        with torch.autocast(a.device.type, enabled=False):
            if fused:
                from .swiglu_triton import swiglu_forward  # looked up per call: the tests spy on the kernels

                return F.linear(swiglu_forward(a, b), weight)
            return F.linear(F.silu(a) * b, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, b, weight = ctx.saved_tensors
        if ctx.fused:
            grad = grad.to(a.dtype)
            from .swiglu_triton import swiglu_backward

            d_a, d_b, product = swiglu_backward(grad @ weight, a, b)
            return d_a, d_b, (grad.flatten(0, -2).T @ product.flatten(0, -2)).to(ctx.weight_dtype), None
        grad, act = grad.to(a.dtype), F.silu(a)
        d_product = grad @ weight
        d_weight = (grad.flatten(0, -2).T @ (act * b).flatten(0, -2)).to(ctx.weight_dtype)
        return torch.ops.aten.silu_backward(d_product * b, a), d_product * act, d_weight, None


class FeedForward(nn.Module):
    """d -> intermediate_size -> d: down(act(up x)), or with ``gated`` down(act(gate x) * up x)
    (a GLU; SwiGLU with act "silu", whose product and down projection are one autograd node, ``_SwiGLUDown``).
    ``kernel_backend``: config.kernel_backend, which decides (with the device) whether that node's elementwise work
    runs as Triton kernels."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, gated: bool = False,
                 kernel_backend: str = "auto"):
        super().__init__()
        self.gate = nn.Linear(hidden_size, intermediate_size, bias=False) if gated else None
        self.up = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = ACT2FN[act]
        self.swiglu = gated and act == "silu"
        self.kernel_backend = kernel_backend

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is None:
            return self.down(self.act(self.up(x)))
        if self.swiglu and self._down_is_plain():
            a, b = self.gate(x), self.up(x)
            return _SwiGLUDown.apply(a, b, self.down.weight, self._swiglu_in_kernels(a, b))
        return self.down(self.act(self.gate(x)) * self.up(x))

    def _down_is_plain(self) -> bool:
        """Whether ``down`` is a bare nn.Linear whose weight is all its forward does: not replaced (a PEFT adapter, a
        quantised layer) and without hooks (accelerate's offloading, a user's), which the fused node would bypass."""
        down = self.down
        return (type(down) is nn.Linear and not (down._forward_hooks or down._forward_pre_hooks)
                and not hasattr(down, "_hf_hook") and not torch.nn.modules.module._global_forward_hooks
                and not torch.nn.modules.module._global_forward_pre_hooks)

    def _swiglu_in_kernels(self, a: Tensor, b: Tensor) -> bool:
        """Whether _SwiGLUDown's elementwise work runs as swiglu_triton's kernels: where the backend resolves to Triton
        (CUDA, or the interpreter with kernel_backend="triton", as every kernel of the model), for a and b of one shape
        and one of the kernels' dtypes. Traced (torch.compile, torch.export), the PyTorch operations, which the
        compiler fuses itself; elsewhere (kernel_backend="torch", "auto" on a CPU) too."""
        return (SWIGLU_KERNEL and a.dtype == b.dtype and a.dtype in SWIGLU_DTYPES
                and a.shape == b.shape and not torch.compiler.is_compiling()
                and resolve_backend(self.kernel_backend, a.device) == "triton")


class MMRecBlock(GradientCheckpointingLayer):
    """A GradientCheckpointingLayer: ``gradient_checkpointing_enable`` / ``activation_checkpointing_enable``
    recompute it in the backward. ``x`` must stay the first positional argument (use_reentrant=True
    tracks gradients through positional tensors only); the carried state is an input, never
    updated in place, so the recompute sees the same state."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.hidden_size = d
        self.blocks_per_segment = config.blocks_per_segment
        self.kernel_backend = config.kernel_backend
        self.norm1 = RMSNorm(d, config.rms_norm_eps)
        self.conv_channels = conv_channels(config)
        self.short_conv = (ShortConv(self.conv_channels, config.short_conv_size, config.kernel_backend)
                           if config.short_conv_size else None)
        self.conv_recurrence = config.short_conv_inputs == "recurrence"  # else it convolves u (HEM's input)
        self.hem = HEMProjection(config)
        self.mdi = MDIDecay(config)
        self.state_gate = StateGate(d) if config.recurrence_gate == "state" else None
        self.readout_norm = GroupRMSNorm(d, config.num_attention_heads, config.rms_norm_eps)
        self.memory = MultiMemoryAttention(config) if config.memory_levels != "none" else None
        self.num_memory_slots = config.num_memory_slots
        self.gate_memory = config.gate_memory
        self.W_o = nn.Linear(d, d, bias=False)
        self.norm2 = RMSNorm(d, config.rms_norm_eps)
        self.ffn = FeedForward(d, config.intermediate_size, config.hidden_act, config.ffn_gate, config.kernel_backend)
        self.dropout = nn.Dropout(config.dropout)

    def fresh_state(self, batch_size: int) -> LayerState:
        """The layer's state before any token: h = 0, an empty conv window (zeros) and the memory's
        fresh state."""
        device = self.norm1.weight.device
        h = torch.zeros(batch_size, self.hidden_size, dtype=torch.float32, device=device)
        window = self.short_conv.kernel_size - 1 if self.short_conv is not None else 0
        conv = torch.zeros(batch_size, window, self.conv_channels, dtype=torch.float32, device=device)
        if self.memory is None:  # memory_levels="none": the cache keeps the state's shape, untouched
            memory = MemoryState.zeros(batch_size, self.hidden_size, self.blocks_per_segment, self.num_memory_slots,
                                       device)
        else:
            memory = self.memory.fresh_state(batch_size)
        return LayerState(h=h, conv=conv, memory=memory)

    def forward(self, x: Tensor, layout: TokenLayout, state: Optional[LayerState] = None) -> Tuple[Tensor, LayerState]:
        """x: [B, T, d]; state: the layer's carried state (None: the start of a stream).
        Returns (y [B, T, d], the state after the last token)."""
        if state is None:
            state = self.fresh_state(x.shape[0])
        u, conv = self.norm1(x), state.conv
        if self.short_conv is not None and not self.conv_recurrence:
            u, conv = self.short_conv(u, layout, conv)
        proj = self.hem(u)
        if self.short_conv is not None and self.conv_recurrence:
            proj, conv = self._convolve_recurrence_inputs(proj, layout, conv)
        h, h_last = recurrence(proj.z, proj.gate, self.mdi.logits(proj.p), layout.real, layout.reset, state.h,
                               self.state_gate, self.kernel_backend)
        memory, m = state.memory, None
        out_gate = proj.out_gate
        if out_gate is not None and out_gate.requires_grad:  # on its own: a saved view would keep the whole projection
            out_gate = out_gate.contiguous()
        if self.memory is not None:
            m, memory = self.memory(proj.q, proj.kv, layout, state.memory)
        if self.gate_memory and m is not None and self._reads_out_in_one_kernel(h):
            from .readout_triton import gated_readout

            r = gated_readout(h, self.readout_norm.weight, m, out_gate, self.readout_norm.num_groups,
                              self.readout_norm.eps)
        else:
            r = self.readout_norm(h, proj.z.dtype)  # in the compute dtype (bf16 under autocast), as W_o reads it
            gate = F.silu(out_gate) if out_gate is not None else None
            if gate is not None and not self.gate_memory:
                r = r * gate
            if m is not None:
                r = r + m
            if gate is not None and self.gate_memory:  # the gate covers the memory read too
                r = r * gate
        x = x + self.dropout(self.W_o(r))
        return x + self.dropout(self.ffn(self.norm2(x))), LayerState(h=h_last, conv=conv, memory=memory)

    def _reads_out_in_one_kernel(self, h: Tensor) -> bool:
        """(norm(h) w + m) silu(og) runs as readout_triton's two kernels (library ops, traced too: they beat what
        inductor generates for the PyTorch path, docs/benchmarks/train_gpu_compiled.md) where the backend resolves
        to Triton, for a float32 state (the kernels compute in float32: a float64 model keeps the PyTorch path)."""
        return READOUT_KERNEL and h.dtype == torch.float32 and resolve_backend(self.kernel_backend, h.device) == "triton"

    def _convolve_recurrence_inputs(self, proj: Projections, layout: TokenLayout,
                                    conv: Tensor) -> Tuple[Projections, Tensor]:
        """short_conv_inputs="recurrence": convolve [z, g~ (None in "state" mode), p] ([B, T, C],
        conv.conv_inputs' order) and split it back. Returns (the projections with those slices
        replaced, the conv state after this call [B, K-1, C])."""
        parts = [t for t in (proj.z, proj.gate, proj.p) if t is not None]
        c, conv = self.short_conv(torch.cat(parts, -1), layout, conv)
        split = torch.split(c, [t.shape[-1] for t in parts], dim=-1)
        return proj._replace(z=split[0], gate=split[1] if proj.gate is not None else None, p=split[-1]), conv
