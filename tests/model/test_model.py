import pytest
import torch

from growfam.errors import ConfigError
from growfam.model import (
    PRESETS, KVCache, Llama, ModelConfig, flops_per_token, get_preset, num_params, resolve_config,
)

from conftest import random_model, tiny_config


def test_num_params_matches_the_built_model(attn_variant):
    model = Llama(attn_variant)
    assert num_params(attn_variant, "total") == sum(p.numel() for p in model.parameters())
    embed = attn_variant.vocab_size * attn_variant.d_model
    head = 0 if attn_variant.tie_embeddings else embed
    assert num_params(attn_variant, "nonembedding") == num_params(attn_variant) - embed - head


@pytest.mark.parametrize("name,expected", [("paper-1b", 1.09e9), ("paper-2b", 2.09e9),
                                           ("paper-4b", 4.01e9), ("paper-8b", 8.03e9)])
def test_paper_presets_have_the_papers_nonembedding_sizes(name, expected):
    assert round(num_params(get_preset(name), "nonembedding") / 1e9, 2) == expected / 1e9


def test_8b_builds_on_the_meta_device():
    # No memory is allocated, so this takes well under a second once torch is warm (README).
    with torch.device("meta"):
        model = Llama(get_preset("paper-8b"))
    assert round(model.num_params("nonembedding") / 1e9, 2) == 8.03
    nonemb = sum(p.numel() for name, p in model.named_parameters()
                 if not name.startswith(("embed_tokens", "lm_head")))
    assert nonemb == num_params(model.cfg, "nonembedding") == 8_028_172_288
    assert sum(p.numel() for p in model.parameters()) == num_params(model.cfg)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_flops_per_token_formula():
    cfg = get_preset("paper-1b")
    n_matmul = num_params(cfg, "nonembedding") + cfg.vocab_size * cfg.d_model
    assert flops_per_token(cfg) == 6 * n_matmul + 12 * 18 * 2048 * 1024
    assert flops_per_token(cfg, 512) - flops_per_token(cfg, 256) == 12 * 18 * 2048 * 256


def test_presets_keep_head_dim_constant_along_each_ladder():
    assert {PRESETS[f"paper-{s}b"].head_dim for s in (1, 2, 4, 8)} == {128}
    assert len({PRESETS[f"tiny-{i}"].head_dim for i in (1, 2, 3, 4)}) == 1


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_round_trips_through_files(tmp_path, suffix):
    cfg = tiny_config(n_kv_heads=2, tie_embeddings=True, rope_theta=5e5, name="x", nominal_params=3e6)
    cfg.save(tmp_path / f"c{suffix}")
    assert ModelConfig.load(tmp_path / f"c{suffix}") == cfg
    assert resolve_config(tmp_path / f"c{suffix}") == cfg


@pytest.mark.parametrize("changes,message", [
    (dict(d_model=60, n_heads=8), "n_heads=8 does not divide d_model=60"),
    (dict(n_kv_heads=3), "n_kv_heads=3 does not divide n_heads=4"),
    (dict(n_layers=0), "n_layers must be a positive integer"),
    (dict(d_model=12, n_heads=4), "head_dim=3 must be even"),
])
def test_invalid_configs_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**changes)


def test_unknown_keys_and_presets_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'hidden' in the model config"):
        ModelConfig.from_dict(dict(d_model=8, n_layers=1, n_heads=2, ffn_dim=8, hidden=3))
    with pytest.raises(ConfigError, match="unknown preset 'paper-3b'"):
        get_preset("paper-3b")
    (tmp_path / "eps.yaml").write_text("{d_model: 8, n_layers: 1, n_heads: 2, ffn_dim: 8, norm_eps: 1e-5}")
    assert ModelConfig.load(tmp_path / "eps.yaml").norm_eps == 1e-5
    (tmp_path / "bad.yaml").write_text("d_model: [1, 2\n")
    with pytest.raises(ConfigError, match="malformed YAML at line"):
        ModelConfig.load(tmp_path / "bad.yaml")


def test_kv_cache_decoding_equals_the_full_pass(attn_variant):
    model = random_model(attn_variant)
    idx = torch.randint(0, attn_variant.vocab_size, (3, 20))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.empty(attn_variant, batch=3, max_len=32)
        # a prompt, a multi-token chunk (as when verifying drafted tokens), then one at a time
        pieces = [model(idx[:, :7], cache), model(idx[:, 7:12], cache)]
        pieces += [model(idx[:, t:t + 1], cache) for t in range(12, 20)]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=2e-5)


def test_kv_cache_rollback_recomputes_the_same_logits():
    cfg = tiny_config(n_kv_heads=2)
    model = random_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (1, 12))
    other = torch.randint(0, cfg.vocab_size, (1, 4))
    with torch.no_grad():
        cache = KVCache.empty(cfg, batch=1, max_len=16)
        model(idx[:, :8], cache)
        model(other, cache)  # drafted tokens, then rejected
        cache.truncate(8)
        resumed = model(idx[:, 8:], cache)
        full = model(idx)
    torch.testing.assert_close(resumed, full[:, 8:], rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(13)
    with pytest.raises(ValueError, match="KV cache holds 16 tokens"):
        model(torch.zeros(1, 5, dtype=torch.long), cache)


def test_float64_model_is_float64_throughout():
    model = random_model(tiny_config(), dtype=torch.float64)
    logits = model(torch.randint(0, 97, (1, 5)))
    assert logits.dtype == torch.float64


def test_loss_is_cross_entropy_of_the_logits():
    model = random_model(tiny_config())
    idx, tgt = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 9))
    expected = torch.nn.functional.cross_entropy(model(idx).reshape(-1, 97), tgt.reshape(-1))
    torch.testing.assert_close(model.loss(idx, tgt), expected)


@pytest.mark.parametrize("changes,message", [
    (dict(norm_eps=0.0), "norm_eps must be positive"),
    (dict(norm_eps=float("nan")), "norm_eps must be a number"),
    (dict(norm_eps=float("inf")), "norm_eps must be a number"),
    (dict(rope_theta=-1.0), "rope_theta must be positive"),
    (dict(init_std=0.0), "init_std must be positive"),
    (dict(init_std=float("nan")), "init_std must be a number"),
    (dict(nominal_params=-3.0), "nominal_params must be positive"),
    (dict(d_model=64.5), "d_model must be a positive integer"),
    (dict(ffn_dim=True), "ffn_dim must be a positive integer"),
    (dict(vocab_size=None), "vocab_size must be a positive integer"),
    (dict(max_seq_len=-8), "max_seq_len must be a positive integer"),
    (dict(tie_embeddings="yes"), "tie_embeddings must be true or false"),
    (dict(name=3), "name must be text"),
])
def test_config_values_of_the_wrong_type_or_range_are_refused_naming_the_key(changes, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**changes)


def test_config_numbers_are_normalised():
    cfg = tiny_config(d_model=64.0, rope_theta=10000, norm_eps="1e-6")
    assert (type(cfg.d_model), cfg.rope_theta, cfg.norm_eps) == (int, 10000.0, 1e-6)


@pytest.mark.parametrize("text,message", [
    ("[1, 2]", "must be a mapping, got list"),
    ("", "must be a mapping, got NoneType"),
    ("{d_model: 8, n_layers: -1, n_heads: 2, ffn_dim: 8}", "n_layers must be a positive integer"),
    ("{d_model: abc, n_layers: 1, n_heads: 2, ffn_dim: 8}", "d_model must be a positive integer, got 'abc'"),
    ("{d_model: 8, n_layers: 1, n_heads: 2, ffn_dim: 8, norm_eps: .nan}", "norm_eps must be a number"),
    ("{d_model: 8, n_layers: 1, n_heads: 2, ffn_dim: 8, init_std: [1]}", "init_std must be a number"),
    ("{d_model: 8, n_layers: 1, n_heads: 2, ffn_dim: 8, widht: 3}", "unknown key 'widht'"),
])
def test_malformed_config_files_are_one_clear_line(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        resolve_config(tmp_path / "c.yaml")
    assert "\n" not in str(err.value) and str(err.value).startswith(str(tmp_path / "c.yaml"))


def test_a_model_directory_with_a_broken_config_json_is_refused_clearly(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_config(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="malformed JSON"):
        resolve_config(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("[1]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        resolve_config(tmp_path / "m")
