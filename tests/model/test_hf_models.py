"""Released-checkpoint features (head_dim apart, RoPE scaling, attention biases, Mistral and
Qwen2 directories): parity with transformers' own models in float64, and exact growth."""

import json

import pytest
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from growfam.grow import expand
from growfam.model import config_from_hf, load_pretrained, read_hf_config, rope_inv_freq, save_pretrained

SHAPE = dict(vocab_size=89, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rms_norm_eps=1e-6)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

#: name -> (transformers class, config) of each supported kind of checkpoint.
KINDS = {
    "llama-head-dim": (LlamaForCausalLM, LlamaConfig(**SHAPE, head_dim=16)),
    "llama-llama3": (LlamaForCausalLM, LlamaConfig(**SHAPE, rope_parameters=LLAMA3)),
    "llama-linear-bias": (LlamaForCausalLM, LlamaConfig(
        **SHAPE, attention_bias=True, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0})),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**SHAPE, head_dim=8, tie_word_embeddings=True,
                                            sliding_window=16, use_sliding_window=False)),
    "mistral": (MistralForCausalLM, MistralConfig(**SHAPE, head_dim=16, sliding_window=None,
                                                  rope_parameters=LLAMA3)),
}


def _float64_internals(theirs, cfg):
    """Make transformers' RoPE and RMSNorm compute in float64 (they always work in float32), the
    RoPE from growfam's float64 frequencies, so the logits can be compared to 1e-9; the
    frequencies themselves are checked against transformers' bit for bit in float32
    (test_inv_freq_...)."""
    inv_freq = rope_inv_freq(cfg, torch.float64)
    for module in theirs.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = lambda x, m=module: m.weight * x * torch.rsqrt(
                x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon)

    def forward(x, position_ids):
        emb = position_ids[..., None].double() * inv_freq
        emb = torch.cat((emb, emb), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    theirs.model.rotary_emb.forward = forward


def _transformers_model(kind, tmp_path):
    """A random transformers model of `kind` with random biases, saved; (model in float64, dir)."""
    cls, hf_cfg = KINDS[kind]
    torch.manual_seed(0)
    theirs = cls(hf_cfg).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.endswith(("bias", "norm.weight")):
                p.uniform_(0.5, 1.5)
    theirs.save_pretrained(tmp_path / kind)
    return theirs.double(), tmp_path / kind


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("kind", KINDS)
def test_inv_freq_equals_transformers_bit_for_bit(kind):
    hf_cfg = KINDS[kind][1]
    rope_type = hf_cfg.rope_parameters["rope_type"]
    if rope_type == "default":
        pytest.skip("default RoPE: covered by test_hf")
    theirs, _ = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg, "cpu")
    ours = rope_inv_freq(config_from_hf(hf_cfg.to_dict()), torch.float32)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("kind", KINDS)
def test_transformers_checkpoints_load_with_equal_logits(kind, tmp_path):
    theirs, path = _transformers_model(kind, tmp_path)
    ours = load_pretrained(path, dtype=torch.float64)
    assert ours.cfg.model_type == theirs.config.model_type
    assert ours.cfg.head_dim == KINDS[kind][1].head_dim
    _float64_internals(theirs, ours.cfg)
    idx = torch.randint(0, 89, (2, 40))
    with torch.no_grad():
        assert _rel(ours(idx), theirs(idx).logits) <= 1e-9


@pytest.mark.parametrize("kind", KINDS)
def test_grown_checkpoints_load_in_transformers_as_their_type(kind, tmp_path):
    theirs, path = _transformers_model(kind, tmp_path)
    source = load_pretrained(path, dtype=torch.float64)
    cfg = source.cfg
    target = cfg.replace(d_model=96, n_heads=2 * cfg.n_heads, n_kv_heads=2 * cfg.n_kv_heads,
                         ffn_dim=112, n_layers=3)
    grown, _, _ = expand(source, target, "lossless", "identity")
    idx = torch.randint(0, 89, (2, 40))
    with torch.no_grad():
        assert _rel(grown(idx), source(idx)) <= 1e-9  # exact growth in float64
    out = save_pretrained(grown, tmp_path / "grown", dtype=torch.float32)
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == cfg.model_type and written["head_dim"] == cfg.head_dim
    assert read_hf_config(out).rope_scaling == cfg.rope_scaling
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(theirs) and back.config.model_type == cfg.model_type
    assert back.config.rope_parameters == theirs.config.rope_parameters
    with torch.no_grad():
        assert _rel(back(idx).logits.double(), theirs.float()(idx).logits.double()) <= 1e-6


@pytest.mark.parametrize("scaling, expected", [
    ({"type": "linear", "factor": 2.0}, "linear"),  # transformers 4's key
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 32}, "llama3"),
    ({"rope_type": "yarn", "factor": 4.0}, "refused"),
])
def test_a_legacy_rope_scaling_beside_rope_parameters_is_read_as_transformers_reads_it(scaling, expected):
    """transformers 5 lets `rope_scaling` override a default `rope_parameters`; growfam must not
    read the default instead (and so run other positions than transformers)."""
    from transformers import AutoConfig

    from growfam.errors import ConfigError

    hf = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 97, "max_position_embeddings": 64,
          "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "rope_scaling": scaling}
    theirs = AutoConfig.for_model(**hf).rope_parameters["rope_type"]
    if expected == "refused":
        assert theirs == "yarn"
        with pytest.raises(ConfigError, match="unsupported RoPE scaling 'yarn'"):
            config_from_hf(hf)
    else:
        assert config_from_hf(hf).rope_scaling["rope_type"] == theirs == expected


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported RoPE scaling 'yarn'"),
    ({"num_local_experts": 8}, "mixture-of-experts models are not supported"),
    ({"mlp_bias": True}, "MLP biases are not supported"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 16}, "sliding"),
])
def test_unsupported_checkpoints_are_one_line_and_exit_2(tmp_path, capsys, change, message):
    from conftest import random_model, tiny_config

    from growfam.cli import main

    save_pretrained(random_model(tiny_config()), tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, **change}))
    assert main(["expand", str(tmp_path / "src"), "--to", "tiny-2", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
