"""The model: its config, exact counts, named presets, the Llama modules and Hugging Face I/O.

- `config`: ModelConfig (validated, to/from dict, YAML, JSON), num_params, flops_per_token.
- `presets`: the named shapes (PRESETS, get_preset).
- `llama`: the nn.Modules (RMSNorm, RoPE, Attention, FeedForward, Block), Llama, KVCache.
- `loss`: head_cross_entropy, the output head and cross-entropy fused, chunk by chunk.
- `hf`: config.json <-> ModelConfig, tensor names, save_pretrained / load_pretrained (and
  check_pretrained: its checks from the headers alone), the tokenizer files that travel with a member.
- `resolve`: resolve_config (a preset name, a config file, a dict or a model directory).

Imports point one way: presets and llama import config (llama also loss); hf imports config and llama; resolve
imports config, presets and hf. model/ may import errors, checks and io; nothing of data/,
grow/, train/, growfam.config or family/.
"""

from growfam.model.config import ModelConfig, flops_per_token, num_params
from growfam.model.hf import (
    TOKENIZER_FILES,
    check_pretrained,
    check_same_tokenizer,
    config_from_hf,
    config_to_hf,
    copy_tokenizer_files,
    hf_state_dict,
    load_pretrained,
    read_hf_config,
    save_pretrained,
)
from growfam.model.llama import (
    Attention,
    Block,
    FeedForward,
    KVCache,
    Llama,
    RMSNorm,
    apply_rope,
    rope_cos_sin,
    rope_inv_freq,
    weight_std,
)
from growfam.model.loss import head_cross_entropy
from growfam.model.presets import PRESETS, get_preset, known_presets
from growfam.model.resolve import resolve_config

__all__ = [
    "PRESETS",
    "TOKENIZER_FILES",
    "Attention",
    "Block",
    "FeedForward",
    "KVCache",
    "Llama",
    "ModelConfig",
    "RMSNorm",
    "apply_rope",
    "check_pretrained",
    "check_same_tokenizer",
    "config_from_hf",
    "config_to_hf",
    "copy_tokenizer_files",
    "flops_per_token",
    "get_preset",
    "head_cross_entropy",
    "hf_state_dict",
    "known_presets",
    "load_pretrained",
    "num_params",
    "read_hf_config",
    "resolve_config",
    "rope_cos_sin",
    "rope_inv_freq",
    "save_pretrained",
    "weight_std",
]
