import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from growfam.errors import ConfigError, GrowfamError
from growfam.model import config_from_hf, load_pretrained, save_pretrained

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
    import growfam.model.hf as hf

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
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "unsupported RoPE scaling 'dynamic'"),
    ({"mlp_bias": True}, "MLP biases are not supported"),
    ({"model_type": "mistral", "attention_bias": True}, "attention_bias is not supported in a mistral"),
    ({"num_local_experts": 8}, "mixture-of-experts models are not supported"),
    ({"model_type": "mistral", "sliding_window": 16}, "sliding window attention .16 tokens < context"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16},
     "sliding window attention"),
])
def test_unsupported_configs_are_refused(change, message):
    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
            "intermediate_size": 8, "vocab_size": 10}
    with pytest.raises(ConfigError, match=message):
        config_from_hf({**base, **change})


@pytest.fixture
def saved(tmp_path):
    """A small saved member (2 heads of KV, untied) whose files the tests below damage."""
    return save_pretrained(random_model(tiny_config(d_model=32, n_heads=4, n_kv_heads=2, ffn_dim=32,
                                                    vocab_size=31)), tmp_path / "m")


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("text,message", [
    ("[1, 2]", "config.json must hold a JSON object, got list"),
    ('"abc"', "config.json must hold a JSON object, got str"),
], ids=["list", "string"])
def test_a_config_json_of_the_wrong_shape_is_one_clear_line(saved, text, message):
    (saved / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_pretrained(saved)


@pytest.mark.parametrize("changes,message", [
    ({"hidden_size": "abc"}, "hidden_size must be a number, got 'abc'"),
    ({"num_hidden_layers": -1}, "num_hidden_layers must be an integer >= 1, got -1"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be an integer >= 1, got 0"),
    ({"num_hidden_layers": 2.5}, "num_hidden_layers must be an integer >= 1, got 2.5"),
    ({"num_hidden_layers": True}, "num_hidden_layers must be a number, got True"),
    ({"vocab_size": None}, "vocab_size must be a number, got None"),
    ({"vocab_size": False}, "vocab_size must be a number, got False"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be an integer >= 1"),
    ({"num_attention_heads": 3, "head_dim": None}, "n_heads=3 does not divide d_model=32"),
    ({"num_key_value_heads": 3}, "n_kv_heads=3 does not divide n_heads=4"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be positive"),
    ({"rms_norm_eps": "x"}, "rms_norm_eps must be a number"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ({"rope_parameters": [1]}, "rope_parameters must be an object"),
    ({"growfam": [1]}, "growfam must be an object"),
    ({"growfam": {"name": "x", "nominal_params": "abc"}}, "nominal_params must be a number"),
])
def test_config_json_values_of_the_wrong_type_are_one_clear_line(saved, changes, message):
    _edit_config(saved, **changes)
    with pytest.raises(ConfigError, match=message) as err:
        load_pretrained(saved)
    assert "\n" not in str(err.value)


def test_a_nan_in_config_json_is_refused(saved):
    text = (saved / "config.json").read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN')
    (saved / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="rms_norm_eps must be a number, got nan"):
        load_pretrained(saved)


@pytest.mark.parametrize("damage", ["random", "truncated", "empty"])
def test_unreadable_weights_are_one_clear_line(saved, damage):
    weights = saved / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"random": bytes(range(256)) * 8, "truncated": data[: len(data) // 2],
                         "empty": b""}[damage])
    with pytest.raises(ConfigError, match="model.safetensors: not a readable safetensors file"):
        load_pretrained(saved)


def _write_index(path, weight_map):
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_an_index_pointing_at_pickled_weights_is_refused_without_unpickling(saved, tmp_path):
    class Bomb:  # unpickling this would create the marker file
        def __reduce__(self):
            return (open, (str(tmp_path / "unpickled"), "w"))

    import pickle
    (saved / "pytorch_model.bin").write_bytes(pickle.dumps(Bomb()))
    _write_index(saved, {"model.embed_tokens.weight": "pytorch_model.bin"})
    with pytest.raises(ConfigError, match="pytorch_model.bin.*safetensors"):
        load_pretrained(saved)
    assert not (tmp_path / "unpickled").exists()


@pytest.mark.parametrize("shard,message", [
    ("missing.safetensors", "shard 'missing.safetensors' .*not found"),
    ("../m/model.safetensors", "shard '../m/model.safetensors' lies outside"),
    ("/etc/passwd", "shard '/etc/passwd' lies outside"),
    (3, "malformed index"),
], ids=["missing", "escaping", "absolute", "not-text"])
def test_an_index_naming_a_bad_shard_is_refused(saved, shard, message):
    _write_index(saved, {"model.embed_tokens.weight": shard})
    with pytest.raises(ConfigError, match=message):
        load_pretrained(saved)


@pytest.mark.parametrize("text", ["[1]", '{"weight_map": [1]}', '{"weight_map": {}}', "{"])
def test_a_malformed_index_is_refused(saved, text):
    (saved / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ConfigError, match="index.json"):
        load_pretrained(saved)


def _store_norm_as(saved, dtype) -> None:
    """Rewrite the saved final-norm gain in `dtype`."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(saved / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(dtype)
    save_file(tensors, saved / "model.safetensors")


def test_integer_weights_are_refused(saved):
    _store_norm_as(saved, torch.int64)
    with pytest.raises(ConfigError, match="model.norm.weight is I64; growfam reads floating-point"):
        load_pretrained(saved)


def test_mixed_float_dtypes_load_as_one_dtype(saved):
    _store_norm_as(saved, torch.float16)
    model = load_pretrained(saved)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model(torch.randint(0, 31, (1, 4)))  # runs
