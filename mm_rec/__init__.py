"""MM-Rec: a recurrent language model with a hierarchical memory, as a Hugging Face model."""

from .cache import LayerState, MMRecCache, is_mmrec_cache
from .configuration_mmrec import MMRecConfig
from .hem import convert_hem_state_dict
from .hub import register_auto_classes
from .modeling_mmrec import CACHE_FIELD, MMRecForCausalLM, MMRecModel, MMRecPreTrainedModel
from .scan import associative_scan_exponential, scan

__all__ = [
    "CACHE_FIELD", "LayerState", "MMRecCache", "MMRecConfig", "MMRecForCausalLM", "MMRecModel", "MMRecPreTrainedModel",
    "associative_scan_exponential", "convert_hem_state_dict", "is_mmrec_cache", "scan",
]

# With the package installed, a folder whose config.json has no auto_map (model_type "mmrec")
# loads through AutoConfig / AutoModel / AutoModelForCausalLM without trust_remote_code.
register_auto_classes()
