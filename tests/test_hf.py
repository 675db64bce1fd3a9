import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from growfam.errors import ConfigError, GrowfamError
from growfam.hf import config_from_hf, load_pretrained, save_pretrained

from conftest import random_model, tiny_config


def test_transformers_loads_our_directory_with_identical_logits(tmp_path, attn_variant):
    model = random_model(attn_variant.replace(rope_theta=5e5))
    save_pretrained(model, tmp_path / "m")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    idx = torch.randint(0, attn_variant.vocab_size, (2, 40))
    with torch.no_grad():
        diff = (theirs(idx).logits - model(idx)).abs().max().item()
    assert diff <= 1e-5
    assert theirs.config.tie_word_embeddings == attn_variant.tie_embeddings


def test_directories_written_by_transformers_load(tmp_path):
    hf_cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                         rope_theta=20000.0, rms_norm_eps=1e-6)
    torch.manual_seed(1)
    theirs = LlamaForCausalLM(hf_cfg).eval()
    theirs.save_pretrained(tmp_path / "t", max_shard_size="50KB")  # sharded on purpose
    assert (tmp_path / "t" / "model.safetensors.index.json").exists()
    ours = load_pretrained(tmp_path / "t")
    assert (ours.cfg.n_kv_heads, ours.cfg.rope_theta, ours.cfg.norm_eps) == (2, 20000.0, 1e-6)
    idx = torch.randint(0, 101, (2, 30))
    with torch.no_grad():
        assert (theirs(idx).logits - ours(idx)).abs().max().item() <= 1e-5


def test_round_trip_keeps_dtype_and_ties(tmp_path):
    model = random_model(tiny_config(tie_embeddings=True), dtype=torch.float64)
    save_pretrained(model, tmp_path / "m")
    back = load_pretrained(tmp_path / "m")
    assert back.lm_head.weight is back.embed_tokens.weight
    assert back.embed_tokens.weight.dtype == torch.float64
    idx = torch.randint(0, 97, (1, 10))
    assert torch.equal(back(idx), model(idx))
    assert load_pretrained(tmp_path / "m", dtype=torch.bfloat16).norm.weight.dtype == torch.bfloat16


def test_saving_over_a_member_replaces_it_atomically(tmp_path, monkeypatch):
    first = random_model(tiny_config(), seed=1)
    save_pretrained(first, tmp_path / "m")
    import growfam.hf as hf

    def broken_save(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf, "save_file", broken_save)
    with pytest.raises(GrowfamError, match="No space left on device"):
        save_pretrained(random_model(tiny_config(), seed=2), tmp_path / "m")
    idx = torch.randint(0, 97, (1, 8))
    assert torch.equal(load_pretrained(tmp_path / "m")(idx), first(idx))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left behind


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1,
         "intermediate_size": 8, "vocab_size": 10}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ConfigError, match="only pickled weights"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "gpt2"}, "growfam reads Llama models"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "unsupported RoPE scaling 'yarn'"),
    ({"attention_bias": True}, "biases are not supported"),
    ({"head_dim": 8}, "growfam needs head_dim = hidden_size / heads"),
])
def test_unsupported_configs_are_refused(change, message):
    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
            "intermediate_size": 8, "vocab_size": 10}
    with pytest.raises(ConfigError, match=message):
        config_from_hf({**base, **change})
