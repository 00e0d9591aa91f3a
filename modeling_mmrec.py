"""Entry point of the model repo: the model classes (defined in mm_rec/modeling_mmrec.py)."""

from mm_rec.cache import MMRecCache
from mm_rec.modeling_mmrec import MMRecForCausalLM, MMRecModel, MMRecPreTrainedModel

__all__ = ["MMRecCache", "MMRecForCausalLM", "MMRecModel", "MMRecPreTrainedModel"]
