"""resolve_config: a ModelConfig from whatever names one (preset, file, dict, model directory).

It sits above config, presets and hf so that none of them imports another back.
"""

from __future__ import annotations

from pathlib import Path

from growfam.errors import ConfigError
from growfam.model.config import ModelConfig
from growfam.model.hf import read_hf_config
from growfam.model.presets import PRESETS, get_preset, known_presets


def resolve_config(spec: str | Path | dict | ModelConfig) -> ModelConfig:
    """A ModelConfig from a preset name, a YAML/JSON path, a dict, or a config."""
    if isinstance(spec, ModelConfig):
        return spec
    if isinstance(spec, dict):
        return ModelConfig.from_dict(spec)
    if str(spec) in PRESETS:
        return get_preset(str(spec))
    path = Path(spec)
    if path.is_dir():  # a Hugging Face model directory
        return read_hf_config(path)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        return ModelConfig.load(path)
    raise ConfigError(f"unknown preset {str(spec)!r}; known presets: {known_presets()}")

