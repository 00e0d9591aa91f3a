"""MMRecConfig: the hyper-parameters of an MM-Rec model (docs/ARCHITECTURE.md section 6)."""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Optional

from transformers import GenerationConfig, PretrainedConfig
from transformers.activations import ACT2FN
from transformers.utils import logging

logger = logging.get_logger(__name__)

RECURRENCE_GATES = ("input", "state")
MEMORY_LEVELS = ("slots+blocks", "slots", "blocks", "none")
KERNEL_BACKENDS = ("auto", "triton", "torch")
SHORT_CONV_INPUTS = ("all", "recurrence")

# Other names a field is accepted under (model_dim, num_heads, ffn_dim, and scan_backend for the
# backend switch): a config file or a caller that uses one gets the field; it is saved under the field's name.
ALIASES = {"model_dim": "hidden_size", "num_heads": "num_attention_heads", "ffn_dim": "intermediate_size",
           "scan_backend": "kernel_backend"}

# Fields of transformers' PretrainedConfig on some supported version, or written into config.json
# by transformers or its integrations, that a config file or a caller may pass to the constructor.
# (The fields of the installed PretrainedConfig and GenerationConfig are added to these, see
# ``_transformers_fields``; a name that starts with "_" is transformers' bookkeeping.)
TRANSFORMERS_FIELDS = frozenset({
    "transformers_version", "architectures", "auto_map", "model_type", "name_or_path", "dtype", "torch_dtype",
    "output_hidden_states", "output_attentions", "return_dict", "attn_implementation", "experts_implementation",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "tie_encoder_decoder", "id2label", "label2id", "num_labels", "problem_type", "finetuning_task", "tokenizer_class",
    "prefix", "task_specific_params", "sep_token_id", "decoder_start_token_id", "pruned_heads", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "per_layer_config", "tie_last_hidden_states", "quantization_config",
    "custom_pipelines", "gradient_checkpointing",
})


@functools.lru_cache(maxsize=None)
def _transformers_fields() -> frozenset:
    """The names PretrainedConfig's constructor takes on the installed transformers: its arguments
    and attributes, the generation parameters it still accepts from old config files, and
    TRANSFORMERS_FIELDS."""
    base = PretrainedConfig()
    names = set(inspect.signature(PretrainedConfig.__init__).parameters) - {"self", "args", "kwargs"}
    names |= set(vars(base)) | set(base.to_dict()) | set(GenerationConfig().to_dict()) | TRANSFORMERS_FIELDS
    return frozenset(names)


def _with_hints(unknown) -> list:
    """The names, each with the MM-Rec field it most resembles where one is close ("did you mean")."""
    own = sorted(set(inspect.signature(MMRecConfig.__init__).parameters) - {"self", "kwargs"})
    return [f"{name!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(name, own, 1))
            else repr(name) for name in unknown]


def default_intermediate_size(hidden_size: int, ffn_gate: bool) -> int:
    """The feed-forward width when none is given: 4 x hidden_size, or for a gated FFN (three matrices
    instead of two) 8/3 x hidden_size rounded up to a multiple of 32, the same parameter count."""
    if not ffn_gate:
        return 4 * hidden_size
    return 32 * -(-8 * hidden_size // (3 * 32))


class MMRecConfig(PretrainedConfig):
    r"""Configuration of an MM-Rec causal language model: its size, its memory, and how it runs.

    The defaults are the architecture the quality study measured best (docs/ARCHITECTURE.md section 7);
    a model of another size changes only the size fields. Every field has a default; a field the
    model does not know raises ``ValueError`` naming it, and so does a value out of range.
    ``MMRecConfig.from_pretrained(folder)`` reads a saved one; ``save_pretrained`` writes every field,
    so a checkpoint means the same model whatever defaults the loading code has.

    Size (what a user sets for a bigger or smaller model):
        vocab_size: number of token ids (the tokenizer's vocabulary, special tokens included).
        hidden_size: width of the model (the residual stream and the recurrent state per layer).
        num_hidden_layers: number of MM-Rec blocks.
        num_attention_heads: heads of the memory attention and of the state's read-out norm; must
            divide ``hidden_size``.
        intermediate_size: inner width of each block's feed-forward network; default 8/3 x
            ``hidden_size`` rounded up to a multiple of 32 (4 x without ``ffn_gate``).
        tie_word_embeddings: the output layer shares the input embeddings' weights.

    The recurrence (how long the model remembers):
        pe_dim: width of the input that sets each token's forgetting rate (the decay); default
            ``hidden_size``. A narrower one (e.g. ``hidden_size // 4``) saves parameters for
            coarser control over what the model forgets.
        decay_init_min, decay_init_max: the range of forgetting rates a fresh model starts with,
            spread over the state's channels: a channel with rate r remembers about 1 / r tokens.
            The default 1e-3 .. 0.5 spans memories of about 2 to 1000 tokens; training moves them.
        recurrence_gate: "input" (the default) gates what enters the state by the current token
            alone, so a sequence is computed in parallel; "state" (the design note's original
            recurrence, mm_rec/state_gate.py) gates by the previous state too, which runs one
            token after another: slower to train, for studying that recurrence.
        output_gate: gate what each token reads from the state by the token itself (on by
            default; off saves one d x d projection per layer for some quality).
        gate_memory: with ``output_gate``, the same gate also covers what the memory attention
            returns, so a token can shut off the memory's answer (on by default; without an
            output gate or a memory it changes nothing).
        short_conv_size: K, a short causal convolution over each token and the K - 1 real tokens
            before it in its document (default 4). 0 leaves it out (a little faster, a little
            worse on bytes); 1 is refused (it would only rescale channels).
        short_conv_inputs: what the short convolution reads (ignored when ``short_conv_size`` is
            0): "recurrence" (the default), only the inputs of the recurrence and its decay, which
            leaves the memory's queries, keys and values per token and so keeps in-context recall
            sharp; "all", the input of every projection.
        hidden_act, ffn_gate: the feed-forward network: down(act(gate x) * up x) with ``ffn_gate``
            (the default; SwiGLU with the default ``hidden_act="silu"``), or down(act(up x))
            without. ``hidden_act`` is a name in ``transformers.activations.ACT2FN``.

    The memory (what the model can look up):
        memory_block_size: tokens per block summary the memory attention reads. The default 1
            makes the attention exact over the current segment's earlier tokens; larger blocks
            cost less compute and recall less precisely.
        memory_segment_length: tokens per memory segment, a multiple of ``memory_block_size``.
            At the end of each segment its block summaries fold into the long-term slots.
        num_memory_slots: long-term memory slots per layer.
        memory_decay: how slowly a slot forgets, in (0, 1): a block summary folds into the slot
            whose key is most like its own, and the slot keeps this fraction of what it held,
            taking the rest from the block.
        memory_levels: what the memory attention reads: "slots+blocks" (the default, the whole
            design); "blocks" (the current segment and the learned slots, never folded: no
            sequential step at all, for speed on long rows); "slots" (the long-term slots only);
            "none" (no memory attention: a pure recurrence, the fastest).

    Training:
        dropout: dropout probability on each block's two residual branches (the mixer's and the
            feed-forward network's outputs); 0 turns it off.
        initializer_range: standard deviation of the initial embeddings and feed-forward weights
            (the projections back into the residual stream start smaller, by 1 / sqrt(2 x layers)).
        rms_norm_eps: epsilon of every RMS norm.
        use_hem: compute a block's projections with one fused matrix (True, faster) or with
            separate, separately named ones (False: the same function, for tools that address
            each projection, e.g. LoRA on the queries alone).

    Running:
        kernel_backend: which implementation runs the model's sequence kernels (the scan, the
            recurrence's inputs, the state gate's walk over tokens and the memory's routing):
            "auto" (the default) Triton on CUDA tensors when Triton is importable, PyTorch
            otherwise; "triton" Triton always (CUDA, or CPU under ``TRITON_INTERPRET=1``), an
            error where it cannot run; "torch" the PyTorch reference everywhere. They give the
            same results within float tolerance. Config files that name ``scan_backend`` (its
            former name) load with that value here.
        use_cache: whether an evaluation-mode forward returns the ``MMRecCache`` when the call does
            not say (training-mode forwards return none unless asked).
        inference_chunk_size: in eval mode without labels, ``MMRecForCausalLM`` runs longer inputs
            in chunks of this many tokens carrying the cache (the same logits), so a long prompt's
            peak memory is set by the chunk; None runs every input in one pass.
        decode_cuda_graph: on CUDA, generate() replays its one-token decode steps from a captured
            CUDA graph (the same logits as the eager step, less host time); False runs every step
            eagerly.
        bos_token_id, eos_token_id, pad_token_id: the tokenizer's special tokens, for generate().
    """

    model_type = "mmrec"
    attribute_map = {"scan_backend": "kernel_backend"}  # code that reads the former name reads the field
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
        decay_init_max: float = 0.5,
        hidden_act: str = "silu",
        ffn_gate: bool = True,
        rms_norm_eps: float = 1e-6,
        memory_block_size: int = 1,
        memory_segment_length: int = 512,
        num_memory_slots: int = 16,
        memory_decay: float = 0.99,
        recurrence_gate: str = "input",
        memory_levels: str = "slots+blocks",
        output_gate: bool = True,
        gate_memory: bool = True,
        short_conv_size: int = 4,
        short_conv_inputs: str = "recurrence",
        use_hem: bool = True,
        kernel_backend: str = "auto",
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
                 "intermediate_size": intermediate_size, "kernel_backend": kernel_backend}
        for alias, name in ALIASES.items():
            if alias in kwargs:
                value = kwargs.pop(alias)
                default = inspect.signature(MMRecConfig.__init__).parameters[name].default
                if given[name] != default and given[name] != value:
                    raise ValueError(f"MMRecConfig got {name}={given[name]!r} and its alias {alias}={value!r}: "
                                     f"pass one of them")
                given[name] = value
        hidden_size, num_attention_heads, intermediate_size, kernel_backend = (
            given["hidden_size"], given["num_attention_heads"], given["intermediate_size"], given["kernel_backend"])
        unknown = sorted(name for name in kwargs if not name.startswith("_") and name not in _transformers_fields())
        if unknown:
            raise ValueError(f"MMRecConfig got unknown field(s) {', '.join(_with_hints(unknown))}: neither an MM-Rec field (see "
                             f"MMRecConfig's docstring) nor one of PretrainedConfig's")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size if intermediate_size is not None else default_intermediate_size(
            hidden_size, ffn_gate)
        self.pe_dim = pe_dim if pe_dim is not None else hidden_size
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
        self.kernel_backend = kernel_backend
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
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"MMRecConfig.kernel_backend must be one of {KERNEL_BACKENDS}, got {self.kernel_backend!r}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACT2FN:
            raise ValueError(f"MMRecConfig.hidden_act must be one of {tuple(sorted(ACT2FN))}, got {self.hidden_act!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"MMRecConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not float(self.rms_norm_eps) > 0.0:
            raise ValueError(f"MMRecConfig.rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        for name in ("use_hem", "use_cache", "decode_cuda_graph", "output_gate", "gate_memory", "ffn_gate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MMRecConfig.{name} must be a bool, got {getattr(self, name)!r}")
        conv = self.short_conv_size
        if isinstance(conv, bool) or not isinstance(conv, int) or conv < 0 or conv == 1:
            raise ValueError(f"MMRecConfig.short_conv_size must be an integer, 0 (no convolution) or at least 2 "
                             f"(1 would only scale each channel, which the projection after it already does), "
                             f"got {conv!r}")
        if self.short_conv_inputs not in SHORT_CONV_INPUTS:
            raise ValueError(f"MMRecConfig.short_conv_inputs must be one of {SHORT_CONV_INPUTS}, "
                             f"got {self.short_conv_inputs!r}")
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
        # A saved config may carry attributes set after construction (by a tool, or by hand): they
        # load back as attributes, with a warning, so that what save_pretrained wrote always loads.
        extra = {k: v for k, v in config_dict.items()
                 if not k.startswith("_") and k not in _transformers_fields() and k in cls.unknown_fields(config_dict)}
        if extra:
            logger.warning("the config holds field(s) MM-Rec does not use, kept as attributes: %s",
                           ", ".join(_with_hints(sorted(extra))))
        loaded = super().from_dict({k: v for k, v in config_dict.items() if k not in extra}, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        for name, value in extra.items():
            setattr(config, name, value)
        return loaded

    @classmethod
    def unknown_fields(cls, fields) -> list:
        """The names in ``fields`` that are not MMRecConfig's own fields (or their aliases), sorted:
        for tools that take model fields only (the constructor also accepts PretrainedConfig's)."""
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"} | set(ALIASES)
        return sorted(name for name in fields if name not in accepted)

    def to_diff_dict(self) -> dict:
        """What ``save_pretrained`` writes to config.json: transformers' diff against the defaults,
        plus every MM-Rec field whatever its value, so a checkpoint never depends on the defaults of
        the code that loads it."""
        saved = super().to_diff_dict()
        full = self.to_dict()
        for name in inspect.signature(MMRecConfig.__init__).parameters:
            if name in full and name not in saved:
                saved[name] = full[name]
        return dict(sorted(saved.items()))

    @property
    def blocks_per_segment(self) -> int:
        return self.memory_segment_length // self.memory_block_size


# save_pretrained copies this file next to config.json and names it in auto_map (AutoConfig).
MMRecConfig.register_for_auto_class()
