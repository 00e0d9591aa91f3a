"""MM-Rec: a recurrent language model with a hierarchical memory, as a Hugging Face model."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import LayerState, MMRecCache, is_mmrec_cache
from .configuration_mmrec import MMRecConfig
from .hem import convert_hem_state_dict
from .hub import LORA_TARGET_MODULES, LORA_TARGET_MODULES_UNFUSED
from .memory import MemoryState
from .modeling_mmrec import MMRecForCausalLM, MMRecModel, MMRecPreTrainedModel
from .scan import associative_scan_exponential, scan

__all__ = [
    "LORA_TARGET_MODULES", "LORA_TARGET_MODULES_UNFUSED", "LayerState", "MMRecCache", "MMRecConfig", "MMRecForCausalLM",
    "MMRecModel", "MMRecPreTrainedModel", "MemoryState", "associative_scan_exponential", "convert_hem_state_dict",
    "is_mmrec_cache", "scan",
]

# With the package installed, a folder whose config.json has no auto_map (model_type "mmrec")
# loads through AutoConfig / AutoModel / AutoModelForCausalLM without trust_remote_code.
AutoConfig.register(MMRecConfig.model_type, MMRecConfig, exist_ok=True)
AutoModel.register(MMRecConfig, MMRecModel, exist_ok=True)
AutoModelForCausalLM.register(MMRecConfig, MMRecForCausalLM, exist_ok=True)
