"""MMRecConfig: the hyper-parameters of an MM-Rec model (docs/ARCHITECTURE.md section 6)."""

from __future__ import annotations

import inspect
from typing import Optional

from transformers import PretrainedConfig

RECURRENCE_GATES = ("input", "state")
MEMORY_LEVELS = ("slots+blocks", "slots", "blocks", "none")
SCAN_BACKENDS = ("auto", "triton", "torch")
SHORT_CONV_INPUTS = ("all", "recurrence")

# The seed's names for three of the fields.
_SEED_ALIASES = {"model_dim": "hidden_size", "num_heads": "num_attention_heads", "ffn_dim": "intermediate_size"}


class MMRecConfig(PretrainedConfig):
    r"""Configuration of an MM-Rec causal language model.

    Args:
        vocab_size: number of token ids.
        hidden_size: model width d (the seed's ``model_dim``).
        num_hidden_layers: number of MM-Rec blocks.
        num_attention_heads: heads H of the state readout norm and the memory attention
            (the seed's ``num_heads``); must divide ``hidden_size``.
        intermediate_size: FFN inner width (the seed's ``ffn_dim``); default 4d.
        pe_dim: width of the MDI decay generator P -> GELU -> E; default d // 4.
        decay_init_min, decay_init_max: at initialisation, 1 - gamma of the d channels spans
            [decay_init_min, decay_init_max] log-uniformly (memories of about 1 / rate tokens);
            default 1e-3 .. 0.1, about 10 to 1000 tokens.
        hidden_act: FFN activation.
        ffn_gate: a gated FFN, down(act(gate x) * up x) (SwiGLU with hidden_act="silu"), instead
            of down(act(up x)).
        rms_norm_eps: epsilon of every RMS norm.
        memory_block_size: N, tokens per level-1 block summary. 1 makes level 1 exact
            attention over the segment's earlier tokens (in-context recall, more compute).
        memory_segment_length: tokens per memory segment (a multiple of N); at each
            segment boundary the block summaries fold into the long-term slots.
        num_memory_slots: S, long-term memory slots per layer.
        memory_decay: lambda of the slot EMA, in (0, 1).
        recurrence_gate: "input" (parallel scan) or "state" (the seed's sequential gate).
        memory_levels: what the memory attention reads: "slots+blocks" (the design), "slots"
            (the long-term slots only; block summaries still fold into them), "blocks" (the
            segment's block summaries and the learned slots, which never fold), or "none" (no
            memory attention: the block is the recurrence and the FFN). For ablations.
        output_gate: gate the state readout, r = GroupRMSNorm(h) * silu(o), with o one more
            slice of the HEM projection.
        gate_memory: with ``output_gate``, the gate covers the memory read too:
            (GroupRMSNorm(h) + m) * silu(o) instead of GroupRMSNorm(h) * silu(o) + m.
        short_conv_size: K, the width of a causal depthwise convolution over the previous K - 1
            real tokens of the same document and the current one, applied to the block's normed
            input before the fused projection (mm_rec/conv.py); initialised to the identity. 0 (the
            default) leaves it out; 1 is refused (a per-channel scale that the projection already has).
        short_conv_inputs: what the short convolution reads (needs ``short_conv_size`` >= 2 unless
            "all"): "all" (the default), the normed input u, so every HEM slice sees the window;
            "recurrence", the HEM slices that feed the recurrence only (z, the input gate's g~ and
            the decay input p, convolved after the projection), leaving the memory's q, k, v and
            the output gate per token.
        use_hem: one fused projection GEMM (True) or separate seed-named linears (False).
        scan_backend: "auto", "triton" or "torch".
        dropout: residual dropout.
        initializer_range: std of embeddings and FFN weights.
        use_cache: whether an evaluation-mode forward returns the ``MMRecCache`` when the call does
            not say (training-mode forwards return none unless asked).
        decode_cuda_graph: generate() replays its one-token decode steps from a captured CUDA
            graph on CUDA (same logits as the eager step; False runs every step eagerly).
        inference_chunk_size: in eval mode without labels, ``MMRecForCausalLM`` runs longer inputs
            in chunks of this many tokens carrying the cache (exact), so a long prompt's peak
            memory is set by the chunk; None runs every input in one pass.
    """

    model_type = "mmrec"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 8192,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        intermediate_size: Optional[int] = None,
        pe_dim: Optional[int] = None,
        decay_init_min: float = 1e-3,
        decay_init_max: float = 0.1,
        hidden_act: str = "gelu",
        ffn_gate: bool = False,
        rms_norm_eps: float = 1e-6,
        memory_block_size: int = 32,
        memory_segment_length: int = 512,
        num_memory_slots: int = 16,
        memory_decay: float = 0.99,
        recurrence_gate: str = "input",
        memory_levels: str = "slots+blocks",
        output_gate: bool = False,
        gate_memory: bool = False,
        short_conv_size: int = 0,
        short_conv_inputs: str = "all",
        use_hem: bool = True,
        scan_backend: str = "auto",
        dropout: float = 0.0,
        initializer_range: float = 0.02,
        inference_chunk_size: Optional[int] = 4096,
        decode_cuda_graph: bool = True,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        bos_token_id: Optional[int] = None,
        eos_token_id: Optional[int] = None,
        pad_token_id: Optional[int] = None,
        **kwargs,
    ):
        given = {"hidden_size": hidden_size, "num_attention_heads": num_attention_heads,
                 "intermediate_size": intermediate_size}
        defaults = {"hidden_size": 256, "num_attention_heads": 4, "intermediate_size": None}
        for seed_name, hf_name in _SEED_ALIASES.items():
            if seed_name in kwargs:
                value = kwargs.pop(seed_name)
                if given[hf_name] != defaults[hf_name] and given[hf_name] != value:
                    raise ValueError(f"MMRecConfig got {hf_name}={given[hf_name]!r} and its seed alias "
                                     f"{seed_name}={value!r}: pass one of them")
                given[hf_name] = value
        hidden_size, num_attention_heads, intermediate_size = (
            given["hidden_size"], given["num_attention_heads"], given["intermediate_size"])
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size if intermediate_size is not None else 4 * hidden_size
        self.pe_dim = pe_dim if pe_dim is not None else max(1, hidden_size // 4)
        self.decay_init_min = decay_init_min
        self.decay_init_max = decay_init_max
        self.hidden_act = hidden_act
        self.ffn_gate = ffn_gate
        self.rms_norm_eps = rms_norm_eps
        self.memory_block_size = memory_block_size
        self.memory_segment_length = memory_segment_length
        self.num_memory_slots = num_memory_slots
        self.memory_decay = memory_decay
        self.recurrence_gate = recurrence_gate
        self.memory_levels = memory_levels
        self.output_gate = output_gate
        self.gate_memory = gate_memory
        self.short_conv_size = short_conv_size
        self.short_conv_inputs = short_conv_inputs
        self.use_hem = use_hem
        self.scan_backend = scan_backend
        self.dropout = dropout
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.inference_chunk_size = inference_chunk_size
        self.decode_cuda_graph = decode_cuda_graph
        self._validate()
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "pe_dim", "memory_block_size", "memory_segment_length",
                    "num_memory_slots")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"MMRecConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"MMRecConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.memory_segment_length % self.memory_block_size != 0:
            raise ValueError(
                f"MMRecConfig.memory_segment_length ({self.memory_segment_length}) must be a multiple of "
                f"memory_block_size ({self.memory_block_size})"
            )
        if not 0.0 < float(self.memory_decay) < 1.0:
            raise ValueError(f"MMRecConfig.memory_decay must be in (0, 1), got {self.memory_decay!r}")
        low, high = self.decay_init_min, self.decay_init_max
        for name, value in (("decay_init_min", low), ("decay_init_max", high)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ValueError(f"MMRecConfig.{name} must be a number in (0, 1), got {value!r}")
        if low > high:
            raise ValueError(f"MMRecConfig.decay_init_min ({low}) must not exceed decay_init_max ({high})")
        if self.recurrence_gate not in RECURRENCE_GATES:
            raise ValueError(f"MMRecConfig.recurrence_gate must be one of {RECURRENCE_GATES}, got {self.recurrence_gate!r}")
        if self.memory_levels not in MEMORY_LEVELS:
            raise ValueError(f"MMRecConfig.memory_levels must be one of {MEMORY_LEVELS}, got {self.memory_levels!r}")
        if self.scan_backend not in SCAN_BACKENDS:
            raise ValueError(f"MMRecConfig.scan_backend must be one of {SCAN_BACKENDS}, got {self.scan_backend!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"MMRecConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not float(self.rms_norm_eps) > 0.0:
            raise ValueError(f"MMRecConfig.rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        for name in ("use_hem", "use_cache", "decode_cuda_graph", "output_gate", "gate_memory", "ffn_gate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MMRecConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.gate_memory and (not self.output_gate or self.memory_levels == "none"):
            raise ValueError("MMRecConfig.gate_memory=True gates the memory read with the output gate: it needs "
                             f"output_gate=True and a memory (memory_levels != 'none'), got output_gate="
                             f"{self.output_gate!r}, memory_levels={self.memory_levels!r}")
        conv = self.short_conv_size
        if isinstance(conv, bool) or not isinstance(conv, int) or conv < 0 or conv == 1:
            raise ValueError(f"MMRecConfig.short_conv_size must be an integer, 0 (no convolution) or at least 2 "
                             f"(1 would only scale each channel, which the projection after it already does), "
                             f"got {conv!r}")
        if self.short_conv_inputs not in SHORT_CONV_INPUTS:
            raise ValueError(f"MMRecConfig.short_conv_inputs must be one of {SHORT_CONV_INPUTS}, "
                             f"got {self.short_conv_inputs!r}")
        if self.short_conv_inputs != "all" and conv == 0:
            raise ValueError(f"MMRecConfig.short_conv_inputs={self.short_conv_inputs!r} chooses what the short "
                             f"convolution reads: it needs short_conv_size >= 2, got short_conv_size=0")
        chunk = self.inference_chunk_size
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0):
            raise ValueError(f"MMRecConfig.inference_chunk_size must be a positive integer or None, got {chunk!r}")

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """Refuse the config of another model type (transformers would only warn, then build
        an MM-Rec model from unrelated fields)."""
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"the config has model_type {model_type!r}, expected {cls.model_type!r}: not an MM-Rec checkpoint")
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def unknown_fields(cls, fields) -> list:
        """The names in ``fields`` that are not MMRecConfig arguments, sorted (PretrainedConfig would
        store a misspelt one as a silent attribute)."""
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        return sorted(name for name in fields if name not in accepted)

    @property
    def blocks_per_segment(self) -> int:
        return self.memory_segment_length // self.memory_block_size


# save_pretrained copies this file next to config.json and names it in auto_map (AutoConfig).
MMRecConfig.register_for_auto_class()
