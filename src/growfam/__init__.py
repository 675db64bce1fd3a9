"""growfam: build Llama model families by progressive training with model expansion."""

from growfam.errors import ConfigError, GrowfamError
from growfam.model import KVCache, Llama, ModelConfig, flops_per_token, get_preset, num_params

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "GrowfamError",
    "KVCache",
    "Llama",
    "ModelConfig",
    "flops_per_token",
    "get_preset",
    "num_params",
]
