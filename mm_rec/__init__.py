"""MM-Rec: a recurrent language model with a hierarchical memory, as a Hugging Face model."""

from .cache import LayerState, MMRecCache
from .configuration_mmrec import MMRecConfig
from .hem import convert_hem_state_dict
from .modeling_mmrec import CACHE_FIELD, MMRecForCausalLM, MMRecModel, MMRecPreTrainedModel
from .scan import associative_scan_exponential, scan

__all__ = [
    "CACHE_FIELD", "LayerState", "MMRecCache", "MMRecConfig", "MMRecForCausalLM", "MMRecModel", "MMRecPreTrainedModel",
    "associative_scan_exponential", "convert_hem_state_dict", "scan",
]
