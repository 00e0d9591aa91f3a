"""The Hugging Face face of MM-Rec: MMRecPreTrainedModel, MMRecModel, MMRecForCausalLM.

Reads top to bottom like transformers' own modeling files; the mechanisms live in their
sibling modules (hem, recurrence, scan, memory, block, cache, positions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from safetensors import SafetensorError
from torch import Tensor, nn
from transformers import Cache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .block import FeedForward, MMRecBlock
from .cache import MMRecCache, is_mmrec_cache
from .configuration_mmrec import MMRecConfig
from .conv import ShortConv, identity_kernel
from .graph_decode import GraphDecoder
from .hem import HEMProjection, xavier_uniform_rows
from .hub import write_model_card
from .loading import check_loading_info
from .loss import IGNORE_INDEX, causal_lm_loss
from .memory import MultiMemoryAttention
from .norms import GroupRMSNorm, RMSNorm
from .positions import token_layout
from .recurrence import MDIDecay, init_decay_generator_
from .state_gate import StateGate

# The public name of the cache is `cache` (forward's argument, outputs' field, generate's keyword).
# transformers < 5.24 calls the field and generate's keyword past_key_values: the model accepts
# that name too (transformers passes it), and its outputs answer to `.cache` on every version.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

if _CACHE_FIELD == "cache":
    MMRecModelOutput, MMRecCausalLMOutput = BaseModelOutputWithPast, CausalLMOutputWithPast
else:
    @dataclass
    class MMRecModelOutput(BaseModelOutputWithPast):
        @property
        def cache(self) -> Optional[MMRecCache]:
            return self.past_key_values

    @dataclass
    class MMRecCausalLMOutput(CausalLMOutputWithPast):
        @property
        def cache(self) -> Optional[MMRecCache]:
            return self.past_key_values


ID_DTYPES = (torch.int64, torch.int32)  # what nn.Embedding indexes with


def _eager() -> bool:
    """Whether checks that read tensor values on the host may run: not while torch.compile or
    torch.export traces the model (there a value is symbolic and reading it breaks the graph or
    fails the export), nor while a CUDA graph is captured. Shape checks run always."""
    if torch.compiler.is_compiling():  # first: the capture query below is not traceable
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _pick_cache(cache, past_key_values) -> Optional[MMRecCache]:
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    chosen = cache if cache is not None else past_key_values
    if chosen is not None and not is_mmrec_cache(chosen):
        raise ValueError(f"cache must be an MMRecCache (from a previous forward or MMRecCache.load), got {type(chosen).__name__}")
    return chosen


# Other models' names for their cache (Mamba's cache_params, RWKV's state, XLNet's mems, ...).
# Ignored, such a cache would leave the model starting from an empty state: wrong logits, no error.
FOREIGN_CACHE_KEYWORDS = frozenset({
    "cache_params", "state", "states", "past", "past_state", "past_states", "mems", "past_buckets_states",
    "layer_past", "recurrent_state", "initial_state", "cache_state",
})


def _reject_foreign_cache(kwargs: dict) -> None:
    """Raise ValueError for a cache passed under any keyword but ``cache`` / ``past_key_values``."""
    for name, value in kwargs.items():
        if name in FOREIGN_CACHE_KEYWORDS or is_mmrec_cache(value) or isinstance(value, Cache):
            raise ValueError(f"MM-Rec got a cache-like keyword `{name}=`: pass the cache as `cache=`")


def _select_rows(cache: MMRecCache, rows: Tensor) -> MMRecCache:
    """A new cache holding ``cache``'s rows ``rows`` [B'] (copies: the original stays as it was)."""
    rows = rows.to(cache.position.device)
    return type(cache)([layer.map(lambda t: t.index_select(0, rows.to(t.device))) for layer in cache.layers],
                       cache.position.index_select(0, rows), getattr(cache, "stale_folds", False))


def _unseen_tail(cache: MMRecCache, num_inputs: int, attention_mask: Optional[Tensor]) -> Tuple[int, Tensor]:
    """Which trailing tokens of a full sequence the cache has not seen yet.

    The cache counts the real tokens it has seen per row (``cache.position``); the attention
    mask (None: all real) says how many real tokens the sequence holds. The unseen ones are each
    row's last ``real - seen`` real tokens. Returns (n, mask): feed the last n columns of the
    inputs with ``mask`` [B, n] (the unseen tokens; a row's already seen ones become padding,
    which leaves its state untouched).
    """
    B = cache.batch_size
    if attention_mask is None:
        real = torch.ones(B, num_inputs, dtype=torch.bool, device=cache.position.device)
    else:
        real = attention_mask.bool().to(cache.position.device)
    counts = real.sum(1)
    unseen = counts - cache.position
    # generate() reads the next token's logits at the last column: it must be an unseen token
    # (or padding, as in a prefill chunk that holds none of a left-padded row's tokens).
    stale = (unseen < 0) | (real[:, -1] & (unseen < 1))
    if bool(stale.any()):
        row = int(stale.nonzero()[0, 0])
        raise ValueError(
            f"row {row} of input_ids holds {int(counts[row])} real tokens but the cache has already seen "
            f"{int(cache.position[row])}: with past_key_values, generate() takes the full sequence (every "
            f"token the cache saw plus at least one new one); to continue a saved stream with only its new "
            f"tokens, call model.continue_stream(new_ids, cache)")
    from_right = real.flip(1).long().cumsum(1).flip(1)  # real tokens at or after each column
    fresh = real & (from_right <= unseen[:, None])
    n = real.shape[1] - int(fresh.any(0).long().argmax()) if bool(fresh.any()) else 1
    if n > num_inputs:
        raise ValueError(f"the cache has not seen {int(unseen.max())} tokens of the attention mask's sequence, but "
                         f"input_ids hold only {num_inputs}: pass the full sequence with its attention mask")
    return n, fresh[:, -n:].long()


def _check_embeds(embeds: Tensor, real: Tensor, mask_given: bool, finite: bool) -> Tensor:
    """The input embeddings [B, T, d] with their padded positions (real [B, T] False) set to 0, so
    that no value there (NaN or inf included) reaches the state and a padded position reads the
    same whether the embeddings came from input_ids or inputs_embeds; with ``finite``, ValueError
    for a non-finite value at a real token (in eager mode: the check reads the device)."""
    if mask_given:
        embeds = torch.where(real[..., None], embeds, torch.zeros((), dtype=embeds.dtype, device=embeds.device))
    if finite and _eager():
        bad = ~torch.isfinite(embeds).all(-1) & real
        if bool(bad.any()):
            row, column = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"inputs_embeds must be finite at real tokens (attention_mask = 1): row {row}, column "
                             f"{column} holds NaN or inf")
    return embeds


def _check_position_ids(position_ids: Tensor, real: Tensor, offset: Tensor, B: int, T: int, cached: bool) -> None:
    """ValueError unless position_ids [B, T] is an integer tensor in which every real token is at 0
    (the start of a document) or at the position after the previous real token of its row, the
    row's first real token continuing from ``offset`` [B] (the cache's position; 0 without a cache).
    Other positions would stand for tokens the model never saw, and the memory's layout, sized by
    the largest position, would grow with them. Values are checked in eager mode only."""
    if tuple(position_ids.shape) != (B, T):
        raise ValueError(f"position_ids must be [B, T] = {(B, T)}, got {tuple(position_ids.shape)}")
    if position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool:
        raise ValueError(f"position_ids must be an integer tensor, got dtype {position_ids.dtype}")
    if not _eager():
        return
    position = position_ids.long().to(real.device)
    columns = torch.arange(T, device=real.device)
    last_real = torch.where(real, columns, -1).cummax(1).values  # the last real column at or before t
    before = torch.cat([last_real.new_full((B, 1), -1), last_real[:, :-1]], 1)  # ... strictly before t
    expected = torch.where(before >= 0, position.gather(1, before.clamp(min=0)) + 1, offset.to(real.device)[:, None])
    bad = real & (position != 0) & (position != expected)
    if bool(bad.any()):
        row, column = (int(i) for i in bad.nonzero()[0])
        after = "the cache's position" if cached else "0, as no cache is given"
        raise ValueError(
            f"position_ids must count each document's real tokens: a real token is at 0 (it starts a document) or "
            f"at the previous real token's position + 1, a row's first real token continuing from {after}; row "
            f"{row}, column {column} holds {int(position[row, column])}, expected 0 or {int(expected[row, column])}")


def _check_labels(labels: Tensor, shape: Tuple[int, int], vocab_size: int) -> None:
    """ValueError unless labels is a [B, T] integer tensor of token ids in [0, vocab_size) or
    IGNORE_INDEX (-100), in training and evaluation alike (values: in eager mode)."""
    if tuple(labels.shape) != shape:
        raise ValueError(f"labels must be [B, T] = {shape}, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of token ids, got dtype {labels.dtype}")
    if _eager() and labels.numel():
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
        if bool(bad.any()):
            row, column = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"labels must be token ids in [0, vocab_size={vocab_size}) or {IGNORE_INDEX} (ignored): "
                             f"row {row}, column {column} holds {int(labels[row, column])}")


class MMRecPreTrainedModel(PreTrainedModel):
    """What the MM-Rec models share: their config class, their initialisation (``_init_weights``),
    a strict ``from_pretrained`` and a ``save_pretrained`` that writes a self-contained folder."""

    config_class = MMRecConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MMRecBlock"]
    _is_stateful = True
    _supports_sdpa = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the recurrent state is an MMRecCache, never a KV cache

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, ignore_mismatched_sizes: bool = False,
                        output_loading_info: bool = False, **kwargs):
        """transformers' from_pretrained: a tensor missing from the checkpoint is initialised as in
        ``__init__`` and listed in ``output_loading_info``'s ``missing_keys``. Stricter where a
        checkpoint does not fit the config: other layer counts, layer layouts or (unless
        ``ignore_mismatched_sizes=True``, which re-initialises them) widths raise ValueError naming
        the config field (see ``check_loading_info``); so does a truncated weights file."""
        try:
            model, loading_info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, ignore_mismatched_sizes=True, output_loading_info=True, **kwargs
            )
        except SafetensorError as err:
            raise ValueError(f"cannot load {cls.__name__} from {pretrained_model_name_or_path!r}: "
                             f"a weights file is corrupt or truncated ({err})") from err
        check_loading_info(model, pretrained_model_name_or_path, loading_info, ignore_mismatched_sizes)
        return (model, loading_info) if output_loading_info else model

    def save_pretrained(self, save_directory, is_main_process: bool = True, **kwargs):
        """transformers' save_pretrained (weights, config, generation config, and the model code,
        see mm_rec/hub.py), plus the model card README.md. config.json's ``auto_map`` names every
        Auto class the model supports (AutoConfig, AutoModel, AutoModelForCausalLM), whichever of
        the two models is saved, so each loads the folder with ``trust_remote_code=True`` where
        ``mm_rec`` is not installed."""
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        for model_class in (MMRecModel, MMRecForCausalLM):
            auto_map[model_class._auto_class] = f"{model_class.__module__.rsplit('.', 1)[-1]}.{model_class.__name__}"
        self.config.auto_map = auto_map
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            write_model_card(save_directory, self.config, self.num_parameters())

    def _init_weights(self, module: nn.Module) -> None:
        """Every parameter's initial value, chosen by the mechanism that owns it. transformers calls
        this once per module, and its ``init`` functions skip a tensor loaded from a checkpoint, so
        a partial checkpoint gets exactly its missing tensors initialised."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if "_linear_init_table" not in self.__dict__:  # built once: the model's linears do not change
                self.__dict__["_linear_init_table"] = self._linear_inits()
            self.__dict__["_linear_init_table"].get(module, lambda m: _normal_linear_(m, std))(module)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, 0.0, std)
        elif isinstance(module, (RMSNorm, GroupRMSNorm)):
            init.ones_(module.weight)
        elif isinstance(module, MultiMemoryAttention):  # on the scale of the keys of a unit-RMS input
            init.normal_(module.slot_keys, 0.0, 1.0)
            init.normal_(module.slot_values, 0.0, 1.0)
        elif isinstance(module, ShortConv):  # the identity: a fresh block computes what it would without it
            init.copy_(module.weight, identity_kernel(*module.weight.shape))

    def _linear_inits(self) -> Dict[nn.Linear, Callable[[nn.Linear], None]]:
        """The linears whose init is not N(0, initializer_range), by owner: HEM's stacked projections
        and the state gate are Xavier per projection, the decay generator starts at a spread of
        timescales, and the maps into the residual stream (W_o, FFN down) are scaled by
        1 / sqrt(2 * layers)."""
        residual_std = self.config.initializer_range / math.sqrt(2 * self.config.num_hidden_layers)
        residual = lambda m: _normal_linear_(m, residual_std)  # noqa: E731
        inits = {}
        for owner in self.modules():
            if isinstance(owner, HEMProjection):
                for linear, sizes in owner.row_blocks():
                    inits[linear] = lambda m, sizes=sizes: _xavier_linear_(m, sizes)
            elif isinstance(owner, StateGate):
                inits[owner.W_g] = lambda m: _xavier_linear_(m, [m.out_features])
            elif isinstance(owner, MDIDecay):
                span = (self.config.decay_init_min, self.config.decay_init_max)
                inits[owner.W_E] = lambda m, span=span: init_decay_generator_(m, *span)
            elif isinstance(owner, FeedForward):
                inits[owner.down] = residual
            elif isinstance(owner, MMRecBlock):
                inits[owner.W_o] = residual
        return inits


def _normal_linear_(linear: nn.Linear, std: float) -> None:
    init.normal_(linear.weight, 0.0, std)
    if linear.bias is not None:
        init.zeros_(linear.bias)


def _xavier_linear_(linear: nn.Linear, sizes) -> None:
    init.copy_(linear.weight, xavier_uniform_rows(linear.weight, sizes))
    if linear.bias is not None:
        init.zeros_(linear.bias)


class MMRecModel(MMRecPreTrainedModel):
    """The MM-Rec stack without a language-model head: token embeddings, ``num_hidden_layers``
    blocks (each a recurrence with a memory attention, then a feed-forward network) and a final
    norm. Use it for the hidden states (features, a head of your own); ``MMRecForCausalLM`` adds
    the head that predicts the next token.

    Example::

        model = MMRecModel(MMRecConfig(vocab_size=8192))
        out = model(input_ids, attention_mask=attention_mask)
        out.last_hidden_state  # [B, T, hidden_size]
        out.cache              # MMRecCache: pass it back as cache= to continue the stream

    The state it carries from token to token (``MMRecCache``) has a fixed size, so a token costs
    the same at any context length, and a sequence gives the same outputs fed whole, in chunks
    with the cache, token by token or left-padded in a batch. See ``forward`` for the inputs."""

    def __init__(self, config: MMRecConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MMRecBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False  # set by gradient_checkpointing_enable; the blocks act on it
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _embed(self, input_ids: Optional[Tensor], inputs_embeds: Optional[Tensor]) -> Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(f"inputs_embeds must be [B, T, {self.config.hidden_size}], got {tuple(inputs_embeds.shape)}")
            if not inputs_embeds.is_floating_point():
                raise ValueError(f"inputs_embeds must be a floating-point tensor, got dtype {inputs_embeds.dtype}")
            hidden = inputs_embeds
        else:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
            if input_ids.dtype not in ID_DTYPES:
                raise ValueError(f"input_ids must have dtype torch.int64 or torch.int32, got {input_ids.dtype}")
            if input_ids.numel() and _eager():
                lo, hi = int(input_ids.min()), int(input_ids.max())
                if lo < 0 or hi >= self.config.vocab_size:
                    raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), "
                                     f"got values in [{lo}, {hi}]")
            hidden = self.embed_tokens(input_ids)
        if hidden.shape[0] == 0:
            raise ValueError(f"the input has an empty batch (batch size 0, shape {tuple(hidden.shape[:2])})")
        if hidden.shape[1] == 0:
            raise ValueError("input has no tokens (seq_len 0)")
        return hidden

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        cache: Optional[MMRecCache] = None,
        past_key_values: Optional[MMRecCache] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> Union[Tuple, BaseModelOutputWithPast]:
        """input_ids: [B, T]; inputs_embeds: [B, T, d] instead of input_ids, finite at real tokens
        (a padded position's values are never read); attention_mask: [B, T] (or [B, T_past + T], HF
        style), 1 = real token; position_ids: [B, T] for packed rows: each real token is at 0 (it starts
        a document) or at the previous real token's position + 1 (the first continuing from
        ``cache.position``, or 0 without a cache); cache / past_key_values: an MMRecCache to continue
        from (updated in place and returned)."""
        _reject_foreign_cache(kwargs)
        hidden = self._embed(input_ids, inputs_embeds)
        B, T = hidden.shape[:2]
        cache = _pick_cache(cache, past_key_values)
        if use_cache is None:  # a cache passed in is continued and returned; training keeps none
            use_cache = cache is not None or (not self.training and self.config.use_cache)
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        if cache is not None:
            cache.check_compatible(self.config, B)
            if getattr(cache, "stale_folds", False):  # read from an older file without a config
                cache.refresh_folds(self.config)
        mask_given = attention_mask is not None
        attention_mask = self._check_mask(attention_mask, B, T, hidden.device)
        offset = cache.position if cache is not None else torch.zeros(B, dtype=torch.long, device=hidden.device)
        if mask_given or inputs_embeds is not None:
            hidden = _check_embeds(hidden, attention_mask, mask_given, finite=inputs_embeds is not None)
        if position_ids is not None:
            _check_position_ids(position_ids, attention_mask, offset, B, T, cache is not None)
        # Every token real: the short conv needs no gathers, and a fresh row sits in the memory's segment
        # layout as it is. Asked of the device in eager mode only (traced, only a missing mask says so).
        dense = not mask_given or (_eager() and bool(attention_mask.all()))
        layout = token_layout(attention_mask, position_ids, offset, fresh=cache is None, dense=dense,
                              keeps_state=bool(use_cache))

        all_hidden = [hidden] if output_hidden_states else None
        new_states = []
        for i, layer in enumerate(self.layers):
            state = cache.layers[i] if cache is not None else None
            hidden, new_state = layer(hidden, layout, state)
            new_states.append(new_state)
            if output_hidden_states:
                all_hidden.append(hidden)
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden[-1] = hidden

        out_cache = None
        if use_cache:
            position = layout.next_position(offset)
            out_cache = cache if cache is not None else MMRecCache(new_states, position)
            out_cache.layers, out_cache.position = new_states, position
        if not return_dict:
            return tuple(v for v in (hidden, out_cache, all_hidden) if v is not None)
        return MMRecModelOutput(
            last_hidden_state=hidden, hidden_states=tuple(all_hidden) if all_hidden else None, **{_CACHE_FIELD: out_cache}
        )

    @staticmethod
    def _check_mask(attention_mask: Optional[Tensor], B: int, T: int, device) -> Tensor:
        if attention_mask is None:
            return torch.ones(B, T, dtype=torch.bool, device=device)
        if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
            raise ValueError(f"attention_mask must be [B, T] = {(B, T)} (or [B, past + T]), got {tuple(attention_mask.shape)}")
        mask = attention_mask[:, -T:]  # exporters pass [B, past + T] on every decode step
        if _eager() and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
        return mask.bool()


class MMRecForCausalLM(MMRecPreTrainedModel, GenerationMixin):
    """MM-Rec as a causal language model: ``MMRecModel`` plus a head over the vocabulary (tied to
    the input embeddings by default). It trains with transformers' ``Trainer`` (``labels`` give the
    loss; the model shifts them itself), generates with ``generate()``, and continues a saved stream
    with ``continue_stream``.

    Example::

        model = MMRecForCausalLM(MMRecConfig(vocab_size=8192))
        loss = model(input_ids, labels=input_ids).loss
        out = model.generate(prompt, max_new_tokens=20, return_dict_in_generate=True)
        more = model.generate(out.sequences, max_new_tokens=20, cache=out.cache)  # continues exactly

    Its cache (``MMRecCache``) is a fixed-size recurrent state, not a KV cache: it does not grow with
    the context, and it can be saved (``cache.save``) and loaded to continue a stream later. A folder
    written by ``save_pretrained`` carries the model's code, so ``AutoModelForCausalLM.from_pretrained(
    folder, trust_remote_code=True)`` loads it without this package."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MMRecConfig):
        super().__init__(config)
        self.model = MMRecModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._graph_decoder: Optional[GraphDecoder] = None  # made on the first CUDA decode step
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        cache: Optional[MMRecCache] = None,
        past_key_values: Optional[MMRecCache] = None,
        labels: Optional[Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: Union[int, Tensor] = 0,
        **kwargs,
    ) -> Union[Tuple, CausalLMOutputWithPast]:
        """labels: [B, T] token ids, -100 = ignored; shifted inside (predict token t+1 at t).
        logits_to_keep: k > 0 keeps the logits of the last k positions, 0 of all; a 1-D tensor
        keeps those positions (generate() passes 1). Labels need every position's logits.
        kwargs: passed to the loss (e.g. num_items_in_batch).

        In eval mode without labels, an input longer than ``config.inference_chunk_size`` runs in
        chunks of that many tokens carrying the cache (exact), keeping only the positions whose
        logits are asked for, so a long prompt's peak memory is set by the chunk.
        Returns CausalLMOutputWithPast with logits [B, kept, vocab] (float32) and the cache. When
        training with labels (train mode, gradients on), the loss is computed chunk by chunk from
        the hidden states and ``logits`` is None: the [B, T, vocab] logits are never built."""
        graph_decode = kwargs.pop("_graph_decode", False)
        _reject_foreign_cache(kwargs)
        if graph_decode and self._graph_decodes(input_ids, labels, output_hidden_states, return_dict):
            cache = _pick_cache(cache, past_key_values)
            mask = None if attention_mask is None else attention_mask[:, -1:]
            logits = self._graph_decoder.step(self, input_ids, mask, cache, _CACHE_FIELD)
            return MMRecCausalLMOutput(logits=logits, **{_CACHE_FIELD: cache})
        if labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError(f"labels need the logits of every position: pass logits_to_keep=0 (the default) with labels, "
                             f"got logits_to_keep={logits_to_keep!r}")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        model_inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds, cache=cache, past_key_values=past_key_values,
                            use_cache=use_cache, output_hidden_states=output_hidden_states)
        source = input_ids if input_ids is not None else inputs_embeds
        T = source.shape[1] if source is not None and source.dim() >= 2 else 0  # malformed inputs: the model raises
        if labels is not None and T:
            # before the forward: the check's device read then waits for no model work
            _check_labels(labels, tuple(source.shape[:2]), self.config.vocab_size)
        chunk = self.config.inference_chunk_size
        if chunk is not None and T > chunk and labels is None and not self.training:
            hidden, out_cache, hidden_states = self._forward_in_chunks(chunk, keep, **model_inputs)
        else:
            outputs = self.model(**model_inputs, return_dict=True)
            hidden, out_cache, hidden_states = outputs.last_hidden_state[:, keep], outputs.cache, outputs.hidden_states
        logits = loss = None
        if labels is not None and self.training and torch.is_grad_enabled():
            # training: the loss and its gradients chunk by chunk, never [B, T, vocab] logits (traced, one opaque op)
            loss = causal_lm_loss(hidden, self.lm_head.weight, labels, kwargs.get("num_items_in_batch"),
                                  backend=self.config.kernel_backend)
        else:
            logits = self.lm_head(hidden).float()
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if not return_dict:
            return tuple(v for v in (loss, logits, out_cache, hidden_states) if v is not None)
        return MMRecCausalLMOutput(loss=loss, logits=logits, hidden_states=hidden_states, **{_CACHE_FIELD: out_cache})

    def _graph_decodes(self, input_ids, labels, output_hidden_states, return_dict) -> bool:
        """Whether a generate() decode step runs from the captured CUDA graph (see graph_decode.py):
        on CUDA, in eval mode, with ``config.decode_cuda_graph``, for a step that asks for nothing
        but the logits and the cache."""
        if not (self.config.decode_cuda_graph and input_ids is not None and input_ids.is_cuda and not self.training):
            return False
        if labels is not None or output_hidden_states or return_dict is False:
            return False
        if self._graph_decoder is None:
            self._graph_decoder = GraphDecoder()
        return True

    def _forward_in_chunks(self, chunk: int, keep: Union[slice, Tensor], input_ids, attention_mask, position_ids,
                           inputs_embeds, cache, past_key_values, use_cache, output_hidden_states):
        """The model over [B, T] inputs, ``chunk`` tokens at a time, carrying the cache. Exact, since a
        cache continues a stream exactly; only the positions ``keep`` selects outlive their chunk.
        Returns (final hidden states at those positions [B, K, d], the cache or None, every layer's
        hidden states [B, T, d] when output_hidden_states)."""
        source = input_ids if input_ids is not None else inputs_embeds
        T = source.shape[1]
        if attention_mask is not None:
            attention_mask = attention_mask[:, -T:]  # HF style [B, past + T]: only the last T are these tokens'
        wanted = torch.arange(T, device=source.device)[keep]
        order = wanted.argsort(stable=True)
        ascending = wanted[order]
        state = _pick_cache(cache, past_key_values)
        if state is not None and use_cache is False:
            state = _select_rows(state, torch.arange(state.batch_size))  # chunks update it; the caller's must not change
        kept, layers = [], []
        for start in range(0, T, chunk):
            part = slice(start, start + chunk)
            out = self.model(
                input_ids=None if input_ids is None else input_ids[:, part],
                attention_mask=None if attention_mask is None else attention_mask[:, part],
                position_ids=None if position_ids is None else position_ids[:, part],
                inputs_embeds=None if inputs_embeds is None else inputs_embeds[:, part],
                cache=state, use_cache=True, output_hidden_states=output_hidden_states, return_dict=True,
            )
            state = out.cache
            here = ascending[(ascending >= start) & (ascending < start + chunk)] - start
            kept.append(out.last_hidden_state[:, here])
            if output_hidden_states:
                layers.append(out.hidden_states)
        hidden = torch.cat(kept, 1)[:, order.argsort()]
        hidden_states = tuple(torch.cat(per_layer, 1) for per_layer in zip(*layers)) if output_hidden_states else None
        return hidden, (None if use_cache is False else state), hidden_states

    def generate(self, *args, **kwargs):
        """transformers' generate(), refusing a cache passed under another model's keyword
        (``cache_params=``, ``state=``, ...) instead of silently starting from an empty state.

        With ``cache=cache``, the inputs are the FULL sequence, as for every transformers model
        (whose cache is a KV cache): the cache's history plus the new tokens; only the tokens the
        cache has not seen are fed. The cache returned with ``return_dict_in_generate=True``
        (``out.cache``) has seen every token of ``sequences`` but the last, so
        ``generate(out.sequences, cache=out.cache, ...)`` continues exactly.
        To continue a saved stream with only its new tokens, use ``continue_stream``.

        ``prefill_chunk_size`` (a generate / GenerationConfig option) runs the prompt through the
        model's own chunked forward (see ``config.inference_chunk_size``): transformers' chunked
        prefill would need a cache before the first forward."""
        _reject_foreign_cache({k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache")})
        if "cache" in kwargs and _CACHE_FIELD != "cache":
            if kwargs.get("past_key_values") is not None:
                raise ValueError("pass the cache as `cache`, not also as `past_key_values`")
            kwargs["past_key_values"] = kwargs.pop("cache")
        generation_config = kwargs.get("generation_config") or self.generation_config
        chunk = kwargs.pop("prefill_chunk_size", None) or getattr(generation_config, "prefill_chunk_size", None)
        own = self.config.inference_chunk_size
        if chunk is not None:
            self.config.inference_chunk_size = chunk
            kwargs["prefill_chunk_size"] = None
        try:
            out = super().generate(*args, **kwargs)
        finally:
            self.config.inference_chunk_size = own
        if _CACHE_FIELD != "cache" and hasattr(out, "past_key_values"):
            out.cache = out.past_key_values  # the public name on every transformers version
        return out

    def continue_stream(self, input_ids: Tensor, cache: MMRecCache, **generate_kwargs):
        """generate() from a stream's saved state, given only the tokens that follow it.

        input_ids: [B, T] the new tokens only (e.g. a chat's next turn); cache: an MMRecCache of B
        rows (from a forward with use_cache=True, a previous generate, or MMRecCache.load) that
        has seen everything before them. The other keywords are generate()'s (attention_mask
        covers the new tokens). Returns what generate() returns: ``sequences`` are the new tokens
        plus the generated ones; the cache in the output (return_dict_in_generate=True) has seen
        all of them but the last generated token, so the next turn is
        ``continue_stream(torch.cat([out.sequences[:, -1:], next_turn], 1), out.cache)``.
        The cache passed in may be updated in place: keep a saved copy to branch a stream."""
        if _pick_cache(cache, None) is None:
            raise ValueError("continue_stream needs the stream's cache (an MMRecCache), got None")
        for name in ("past_key_values", "cache"):
            if name in generate_kwargs:
                raise ValueError(f"continue_stream takes the cache as its second argument, not as `{name}=`")
        return self.generate(input_ids, **{_CACHE_FIELD: cache}, _new_tokens_only=True, **generate_kwargs)

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        """None: MM-Rec counts positions itself, from the cache and the attention mask. The positions
        generate would make restart at 0 for the new tokens of a continued stream, which MM-Rec
        reads as a new document (a state reset). Position ids passed to generate still reach forward."""
        return None

    def prepare_inputs_for_generation(
        self, input_ids, next_sequence_length=None, attention_mask=None, inputs_embeds=None, is_first_iteration=False,
        _new_tokens_only=False, **kwargs
    ):
        """The forward arguments of one generate() step. The first step (the prefill) feeds the
        prompt; with a cache passed in, only the tokens of the full sequence it has not seen (or,
        from continue_stream, all of them). Later steps feed the newest token. Every other keyword
        generate passes (logits_to_keep, output_hidden_states, use_cache, ...) reaches forward."""
        cache = _pick_cache(kwargs.pop("cache", None), kwargs.pop("past_key_values", None))
        position_ids = kwargs.pop("position_ids", None)
        source = inputs_embeds if inputs_embeds is not None and is_first_iteration else input_ids
        if cache is None:
            n, mask = source.shape[1], attention_mask
        elif not is_first_iteration:
            n = next_sequence_length or 1
            mask = attention_mask
        else:
            if cache.batch_size != source.shape[0]:  # generate repeated each row for beams / num_return_sequences
                if source.shape[0] % cache.batch_size:
                    raise ValueError(f"the cache holds {cache.batch_size} rows, the inputs {source.shape[0]}")
                rows = torch.arange(cache.batch_size).repeat_interleave(source.shape[0] // cache.batch_size)
                cache = _select_rows(cache, rows)
            if _new_tokens_only:
                n, mask = source.shape[1], attention_mask
            else:
                if position_ids is not None:
                    raise ValueError("position_ids with a cache in generate(): the cache counts positions, not tokens, "
                                     "so the full sequence cannot be matched to it; use model.continue_stream")
                n, mask = _unseen_tail(cache, source.shape[1], attention_mask)
        inputs = {"inputs_embeds" if source is inputs_embeds else "input_ids": source[:, -n:], _CACHE_FIELD: cache}
        if mask is not None:  # a decode step passes the whole [B, past + 1] mask, as transformers' models do
            inputs["attention_mask"] = mask if cache is not None and not is_first_iteration else mask[:, -n:]
        if position_ids is not None:
            inputs["position_ids"] = position_ids[:, -n:]
        inputs.update(kwargs)
        if cache is not None and not is_first_iteration and n == 1 and source is input_ids and position_ids is None:
            inputs["_graph_decode"] = True  # a plain decode step: forward may replay it from a CUDA graph
        return inputs


# save_pretrained copies this file and its relative imports into the checkpoint folder and
# names the classes in config.json's auto_map, so trust_remote_code loads them without mm_rec.
MMRecModel.register_for_auto_class("AutoModel")
MMRecForCausalLM.register_for_auto_class("AutoModelForCausalLM")
