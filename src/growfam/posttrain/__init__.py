"""Post-training of a family's members: SFT then DPO through TRL, a chat template, MT-Bench."""

from .config import PosttrainConfig
from .run import run_posttrain

__all__ = ["PosttrainConfig", "run_posttrain"]
