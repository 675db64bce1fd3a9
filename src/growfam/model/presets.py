"""Named model shapes: the paper's ladder (Yano et al. 2025, Appendix A), tiny ones for the CPU
demo and tests, and micro ones for one GPU."""

from __future__ import annotations

import dataclasses

from growfam.errors import ConfigError
from growfam.model.config import ModelConfig


def _paper(name: str, nominal: float, d: int, ffn: int, layers: int, heads: int) -> ModelConfig:
    return ModelConfig(d_model=d, n_layers=layers, n_heads=heads, ffn_dim=ffn, vocab_size=50257,
                       max_seq_len=1024, name=name, nominal_params=nominal)


def _tiny(name: str, d: int, layers: int, heads: int) -> ModelConfig:
    # head_dim 16 throughout, FFN 3.5·d like the paper's ladder, a small BPE vocabulary.
    return ModelConfig(d_model=d, n_layers=layers, n_heads=heads, ffn_dim=int(3.5 * d),
                       vocab_size=4096, max_seq_len=256, name=name)


def _micro(name: str, d: int, layers: int, heads: int) -> ModelConfig:
    # head_dim 32, FFN 3.5·d; the tiny presets' 4096-token BPE, so the two share a dataset.
    return ModelConfig(d_model=d, n_layers=layers, n_heads=heads, ffn_dim=int(3.5 * d),
                       vocab_size=4096, max_seq_len=512, name=name)


#: Named model shapes. Paper sizes are Appendix A of Yano et al. 2025 (head_dim 128, MHA).
PRESETS: dict[str, ModelConfig] = {
    cfg.name: cfg
    for cfg in (
        _paper("paper-1b", 1e9, 2048, 7168, 18, 16),
        _paper("paper-2b", 2e9, 2560, 8960, 22, 20),
        _paper("paper-4b", 4e9, 3200, 11200, 27, 25),
        _paper("paper-8b", 8e9, 4096, 14336, 33, 32),
        _tiny("tiny-1", 64, 2, 4),
        _tiny("tiny-2", 96, 3, 6),
        _tiny("tiny-3", 128, 4, 8),
        _tiny("tiny-4", 160, 5, 10),
        _micro("micro-1", 128, 4, 4),
        _micro("micro-2", 160, 5, 5),
        _micro("micro-3", 192, 6, 6),
        _micro("micro-4", 256, 7, 8),
    )
}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset; ConfigError naming the known ones otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {known_presets()}")
    return dataclasses.replace(PRESETS[name])



def known_presets() -> str:
    """The preset names, comma-separated, as error messages list them."""
    return ", ".join(PRESETS)
