"""Entry point of the model repo: the configuration (defined in mm_rec/configuration_mmrec.py)."""

from mm_rec.configuration_mmrec import MMRecConfig

__all__ = ["MMRecConfig"]
