"""The Hugging Face face of MM-Rec: MMRecPreTrainedModel, MMRecModel, MMRecForCausalLM.

Reads top to bottom like transformers' own modeling files; the mechanisms live in their
sibling modules (hem, mdi, scan, memory, block, cache, positions).
"""

from __future__ import annotations

import copy
import math
from typing import Optional, Tuple, Union

import torch
from safetensors import SafetensorError
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .block import MMRecBlock
from .cache import MMRecCache
from .configuration_mmrec import MMRecConfig
from .hem import xavier_uniform_rows_
from .hub import check_loading_info, write_model_card
from .loss import causal_lm_loss
from .mdi import init_decay_generator_
from .memory import MultiMemoryAttention
from .norms import GroupRMSNorm, RMSNorm
from .positions import token_layout

# transformers 5.24 renamed the cache argument and output field from past_key_values to cache.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


ID_DTYPES = (torch.int64, torch.int32)  # what nn.Embedding indexes with


def _eager() -> bool:
    """Whether checks that read tensor values on the host may run: not while torch.compile or
    torch.export traces the model (there a value is symbolic and reading it breaks the graph or
    fails the export). Shape checks run always."""
    return not torch.compiler.is_compiling()


def _pick_cache(cache, past_key_values) -> Optional[MMRecCache]:
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    chosen = cache if cache is not None else past_key_values
    if chosen is not None and not isinstance(chosen, MMRecCache):
        raise ValueError(f"cache must be an MMRecCache (from a previous forward or MMRecCache.load), got {type(chosen).__name__}")
    return chosen


class MMRecPreTrainedModel(PreTrainedModel):
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
            raise ValueError(f"cannot load {cls.__name__} from {pretrained_model_name_or_path!r}: a weights file is corrupt or truncated ({err})") from err
        check_loading_info(model, pretrained_model_name_or_path, loading_info, ignore_mismatched_sizes)
        return (model, loading_info) if output_loading_info else model

    def save_pretrained(self, save_directory, is_main_process: bool = True, **kwargs):
        """transformers' save_pretrained (weights, config, generation config, and the model code,
        see mm_rec/hub.py), plus the model card README.md."""
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            write_model_card(save_directory, self.config, self.num_parameters())

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise ``module``'s own parameters, except those transformers flagged as loaded from a
        checkpoint (``_is_hf_initialized``): a fresh model initialises all, a partial checkpoint
        only the missing ones."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if hasattr(module, "xavier_rows"):
                _init_unloaded(module, lambda m: xavier_uniform_rows_(m.weight, m.bias, m.xavier_rows))
            elif getattr(module, "decay_generator", False):
                _init_unloaded(module, init_decay_generator_)
            else:
                scale = 1 / math.sqrt(2 * self.config.num_hidden_layers) if getattr(module, "residual_out", False) else 1.0
                _init_unloaded(module, lambda m: _normal_linear_(m, std * scale))
        elif isinstance(module, nn.Embedding):
            _init_unloaded(module, lambda m: m.weight.normal_(0.0, std))
        elif isinstance(module, (RMSNorm, GroupRMSNorm)):
            _init_unloaded(module, lambda m: m.weight.fill_(1.0))
        elif isinstance(module, MultiMemoryAttention):
            # on the scale of the keys of a unit-RMS input
            _init_unloaded(module, lambda m: (m.slot_keys.normal_(0.0, 1.0), m.slot_values.normal_(0.0, 1.0)))


def _normal_linear_(linear: nn.Linear, std: float) -> None:
    linear.weight.normal_(0.0, std)
    if linear.bias is not None:
        linear.bias.zero_()


@torch.no_grad()
def _init_unloaded(module: nn.Module, init) -> None:
    """Run ``init(module)``, which initialises all of the module's own parameters, keeping those
    already loaded: when some are loaded, ``init`` runs on a scratch copy and only the others
    are copied from it."""
    own = dict(module.named_parameters(recurse=False))
    unloaded = [name for name, p in own.items() if not getattr(p, "_is_hf_initialized", False)]
    if len(unloaded) == len(own):
        init(module)
    elif unloaded:
        scratch = copy.copy(module)
        scratch._parameters = {name: nn.Parameter(torch.empty_like(p)) for name, p in own.items()}
        init(scratch)
        for name in unloaded:
            own[name].copy_(scratch._parameters[name])


class MMRecModel(MMRecPreTrainedModel):
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
                    raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), got values in [{lo}, {hi}]")
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
        """input_ids: [B, T]; attention_mask: [B, T] (or [B, T_past + T], HF style), 1 = real token;
        position_ids: [B, T] for packed rows (a real token at position 0 starts a document);
        cache / past_key_values: an MMRecCache to continue from (updated in place and returned)."""
        hidden = self._embed(input_ids, inputs_embeds)
        B, T = hidden.shape[:2]
        cache = _pick_cache(cache, past_key_values)
        if use_cache is None:  # a cache passed in is continued and returned; training keeps none
            use_cache = cache is not None or (not self.training and self.config.use_cache)
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        if cache is not None:
            cache.check_compatible(self.config, B)
        attention_mask = self._check_mask(attention_mask, B, T, hidden.device)
        if position_ids is not None and tuple(position_ids.shape) != (B, T):
            raise ValueError(f"position_ids must be [B, T] = {(B, T)}, got {tuple(position_ids.shape)}")
        offset = cache.position if cache is not None else torch.zeros(B, dtype=torch.long, device=hidden.device)
        layout = token_layout(attention_mask, position_ids, offset, fresh=cache is None)

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
        return BaseModelOutputWithPast(
            last_hidden_state=hidden, hidden_states=tuple(all_hidden) if all_hidden else None, **{CACHE_FIELD: out_cache}
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
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MMRecConfig):
        super().__init__(config)
        self.model = MMRecModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
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
        Returns CausalLMOutputWithPast with logits [B, T, vocab] (float32) and the cache. When
        the loss needs gradients (training with labels), the loss is computed chunk by chunk
        from the hidden states and ``logits`` is None: the [B, T, vocab] logits are never built."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, cache=cache, past_key_values=past_key_values,
            use_cache=use_cache, output_hidden_states=output_hidden_states, return_dict=True,
        )
        hidden = outputs.last_hidden_state
        if labels is not None and labels.shape != hidden.shape[:2]:
            raise ValueError(f"labels must be [B, T] = {tuple(hidden.shape[:2])}, got {tuple(labels.shape)}")
        logits = loss = None
        if labels is not None and torch.is_grad_enabled() and hidden.requires_grad:
            # training: the loss and its gradients chunk by chunk, never [B, T, vocab] logits
            loss = causal_lm_loss(hidden, self.lm_head.weight, labels, kwargs.get("num_items_in_batch"))
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep]).float()
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        out_cache = getattr(outputs, CACHE_FIELD)
        if not return_dict:
            return tuple(v for v in (loss, logits, out_cache, outputs.hidden_states) if v is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states, **{CACHE_FIELD: out_cache})

    def prepare_inputs_for_generation(
        self, input_ids, attention_mask=None, inputs_embeds=None, use_cache=True, is_first_iteration=False, **kwargs
    ):
        """The first step feeds the whole prompt (continuing a cache the caller passed, if any);
        later steps feed only the newest token: the state already holds the rest."""
        cache = _pick_cache(kwargs.get("cache"), kwargs.get("past_key_values"))
        first = is_first_iteration or cache is None
        inputs = {"use_cache": use_cache, CACHE_FIELD: cache}
        if first and inputs_embeds is not None:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids if first else input_ids[:, -1:]
        if attention_mask is not None:
            T = inputs["inputs_embeds"].shape[1] if "inputs_embeds" in inputs else inputs["input_ids"].shape[1]
            inputs["attention_mask"] = attention_mask[:, -T:]
        return inputs


# save_pretrained copies this file and its relative imports into the checkpoint folder and
# names the classes in config.json's auto_map, so trust_remote_code loads them without mm_rec.
MMRecModel.register_for_auto_class("AutoModel")
MMRecForCausalLM.register_for_auto_class("AutoModelForCausalLM")
