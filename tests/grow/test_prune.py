"""Structured pruning's slicing (grow/prune.py): the identity, exactness when what is dropped is
zero (float64), a hand-sliced reference, transformers loading the result as its own type, and
bad maps."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from growfam.errors import ConfigError
from growfam.grow.prune import PruneMaps, prune
from growfam.model import Llama, ModelConfig, load_pretrained, save_pretrained

GQA = ModelConfig(d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=64, max_seq_len=32)
QWEN2 = GQA.replace(model_type="qwen2", qkv_bias=True, tie_embeddings=True)
MISTRAL = GQA.replace(model_type="mistral")
DROP = dict(hidden=(3, 7, 20), group=1, ffn=range(5, 11), layer=1)


def _model(cfg: ModelConfig, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(cfg).double()
    with torch.no_grad():  # biases and gains away from their defaults, so slicing them is tested
        for name, p in model.named_parameters():
            if name.endswith(".bias") or p.ndim == 1:
                p.normal_(1.0 if p.ndim == 1 and not name.endswith(".bias") else 0.0, 0.1)
    return model


def _kept(cfg: ModelConfig) -> PruneMaps:
    layers = tuple(i for i in range(cfg.n_layers) if i != DROP["layer"])
    return PruneMaps(tuple(c for c in range(cfg.d_model) if c not in DROP["hidden"]), layers,
                     (tuple(g for g in range(cfg.n_kv_heads) if g != DROP["group"]),) * len(layers),
                     (tuple(j for j in range(cfg.ffn_dim) if j not in DROP["ffn"]),) * len(layers))


def _zero_what_is_dropped(model: Llama) -> None:
    """Make the dropped channels, group, neurons and layer contribute nothing."""
    cfg, hidden, hd = model.cfg, list(DROP["hidden"]), model.cfg.head_dim
    heads = slice(DROP["group"] * cfg.n_rep * hd, (DROP["group"] + 1) * cfg.n_rep * hd)
    with torch.no_grad():
        model.embed_tokens.weight[:, hidden] = 0
        for i, block in enumerate(model.layers):
            attn, mlp = block.self_attn, block.mlp
            for t in (attn.o_proj.weight, mlp.down_proj.weight):
                t[hidden] = 0
            attn.o_proj.weight[:, heads] = 0
            mlp.down_proj.weight[:, list(DROP["ffn"])] = 0
            if i == DROP["layer"]:
                attn.o_proj.weight.zero_()
                mlp.down_proj.weight.zero_()
            if cfg.o_bias:
                attn.o_proj.bias[hidden] = 0


@pytest.mark.parametrize("cfg", [GQA, QWEN2, MISTRAL], ids=["llama-gqa", "qwen2", "mistral"])
def test_pruning_to_the_same_shape_is_the_identity(cfg):
    model = _model(cfg)
    pruned = prune(model, PruneMaps.identity(cfg))
    assert pruned.cfg == cfg
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), pruned.state_dict().values()))


@pytest.mark.parametrize("cfg", [GQA, QWEN2, MISTRAL], ids=["llama-gqa", "qwen2", "mistral"])
def test_dropping_what_contributes_nothing_leaves_the_logits_unchanged(cfg):
    model = _model(cfg)
    _zero_what_is_dropped(model)
    maps = _kept(cfg)
    pruned = prune(model, maps)
    assert (pruned.cfg.d_model, pruned.cfg.n_kv_heads, pruned.cfg.n_heads, pruned.cfg.ffn_dim, pruned.cfg.n_layers) == \
        (29, 1, 2, 42, 2)
    assert pruned.cfg.head_dim == cfg.head_dim and pruned.cfg.norm_eps == pytest.approx(cfg.norm_eps * 32 / 29)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert (pruned(idx) - model(idx)).abs().max().item() <= 1e-12
        # without the norms' rescaling the hidden cut is not exact: the rescaling is what makes it so
        assert (prune(model, maps, rescale_norms=False)(idx) - model(idx)).abs().max().item() > 1e-6


def test_the_pruned_tensors_equal_a_hand_sliced_reference():
    cfg = QWEN2
    model = _model(cfg)
    # layer 0 keeps KV group 0 and the even neurons, layer 2 group 1 and the odd ones
    maps = PruneMaps(_kept(cfg).hidden, (0, 2), ((0,), (1,)), (tuple(range(0, 48, 2)), tuple(range(1, 48, 2))))
    pruned = prune(model, maps, rescale_norms=False).state_dict()
    hidden = list(maps.hidden)
    src = model.state_dict()
    assert torch.equal(pruned["embed_tokens.weight"], src["embed_tokens.weight"][:, hidden])
    assert torch.equal(pruned["norm.weight"], src["norm.weight"][hidden])
    for new, old, group in ((0, 0, 0), (1, 2, 1)):
        s, d = f"layers.{old}.", f"layers.{new}."
        ffn = list(range(group, 48, 2))
        # group g = query heads 2g, 2g + 1 (n_rep 2, head_dim 8) and KV head g
        q = [h * 8 + j for h in (2 * group, 2 * group + 1) for j in range(8)]
        kv = [group * 8 + j for j in range(8)]
        assert torch.equal(pruned[d + "self_attn.q_proj.weight"], src[s + "self_attn.q_proj.weight"][q][:, hidden])
        assert torch.equal(pruned[d + "self_attn.q_proj.bias"], src[s + "self_attn.q_proj.bias"][q])
        assert torch.equal(pruned[d + "self_attn.k_proj.weight"], src[s + "self_attn.k_proj.weight"][kv][:, hidden])
        assert torch.equal(pruned[d + "self_attn.v_proj.bias"], src[s + "self_attn.v_proj.bias"][kv])
        assert torch.equal(pruned[d + "self_attn.o_proj.weight"], src[s + "self_attn.o_proj.weight"][hidden][:, q])
        assert torch.equal(pruned[d + "mlp.gate_proj.weight"], src[s + "mlp.gate_proj.weight"][ffn][:, hidden])
        assert torch.equal(pruned[d + "mlp.down_proj.weight"], src[s + "mlp.down_proj.weight"][hidden][:, ffn])
        assert torch.equal(pruned[d + "input_layernorm.weight"], src[s + "input_layernorm.weight"][hidden])
    assert "lm_head.weight" not in pruned or torch.equal(pruned["lm_head.weight"], pruned["embed_tokens.weight"])


@pytest.mark.parametrize("cfg", [QWEN2, MISTRAL], ids=["qwen2", "mistral"])
def test_a_pruned_model_loads_in_transformers_as_its_own_type(tmp_path, cfg):
    pruned = prune(_model(cfg).float(), _kept(cfg))
    save_pretrained(pruned, tmp_path / "m")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert theirs.config.model_type == cfg.model_type
    idx = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        assert (theirs(idx).logits - load_pretrained(tmp_path / "m")(idx)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("maps, message", [
    (PruneMaps((), (0,), ((0,),), ((0,),)), "pruning keeps no hidden"),
    (PruneMaps((1, 0), (0,), ((0,),), ((0,),)), "the kept hidden must be sorted, unique"),
    (PruneMaps((0,), (0,), ((0, 2),), ((0,),)), r"the kept groups must be sorted, unique indices in \[0, 2\)"),
    (PruneMaps((0,), (0,), ((0,),), ((0, 0),)), "the kept ffn must be sorted, unique"),
    (PruneMaps((0,), (-1,), ((0,),), ((0,),)), r"the kept layers must be sorted, unique indices in \[0, 3\)"),
    (PruneMaps((0,), (0, 1), ((0,),), ((0,), (1,))), "pruning keeps 2 layers but gives groups for 1"),
    (PruneMaps((0,), (0, 1), ((0,), (0, 1)), ((0,), (1,))), "every layer must keep as many"),
])
def test_bad_maps_are_one_line(maps, message):
    with pytest.raises(ConfigError, match=message):
        prune(_model(GQA), maps)


# ---- importance and selection ------------------------------------------------------------------


def test_activation_importance_is_order_independent_and_selection_keeps_what_matters():
    from growfam.grow.importance import activation_importance, select

    model = _model(GQA)
    windows = torch.randint(0, GQA.vocab_size, (6, 16))
    a = activation_importance(model, windows)
    b = activation_importance(model, windows[torch.tensor([3, 0, 5, 1, 4, 2])])
    for key in ("hidden", "groups", "ffn", "layers"):
        assert torch.allclose(getattr(a, key), getattr(b, key), rtol=1e-12, atol=0), key
        assert (getattr(a, key) >= 0).all()
    # what is silent scores lowest and is what selection drops: the dropped neurons and KV group
    # produce nothing (up rows, v rows zero), the dropped channels and layer write nothing
    _zero_what_is_dropped(model)
    hd = GQA.head_dim
    with torch.no_grad():
        for block in model.layers:
            block.mlp.up_proj.weight[list(DROP["ffn"])] = 0
            block.self_attn.v_proj.weight[DROP["group"] * hd:(DROP["group"] + 1) * hd] = 0
    imp = activation_importance(model, windows)
    # 1 - cos of a layer's unchanged input and output: zero up to float64 rounding (BLAS-dependent)
    assert imp.layers[DROP["layer"]] < 1e-12 < imp.layers.max() and (imp.hidden[list(DROP["hidden"])] == 0).all()
    target = GQA.replace(d_model=29, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=42, head_dim=8)
    assert select(imp, GQA, target, depth="importance") == _kept(GQA)
    assert select(imp, GQA, target, depth="contiguous").layers == (0, 2)
    idx = torch.randint(0, GQA.vocab_size, (2, 16))
    with torch.no_grad():
        assert (prune(model, select(imp, GQA, target))(idx) - model(idx)).abs().max().item() <= 1e-12


def test_magnitude_and_random_importance_and_bad_targets():
    from growfam.grow.importance import activation_importance, magnitude_importance, random_importance, select

    model = _model(GQA)
    _zero_what_is_dropped(model)
    target = GQA.replace(d_model=29, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=42, head_dim=8)
    assert select(magnitude_importance(model), GQA, target, depth="importance") == _kept(GQA)
    rand = random_importance(GQA, seed=1)
    again, other = random_importance(GQA, seed=1), random_importance(GQA, seed=2)
    assert rand.hidden.tolist() == again.hidden.tolist() != other.hidden.tolist()
    maps = select(rand, GQA, target)
    maps.check(GQA)
    for bad, message in ((GQA.replace(d_model=64, n_heads=8, n_kv_heads=4), "larger than the source's"),
                         (GQA.replace(d_model=16, n_heads=2, n_kv_heads=2, head_dim=8), "keeps whole GQA groups")):
        with pytest.raises(ConfigError, match=message):
            select(rand, GQA, bad)
    with pytest.raises(ConfigError, match="calibration set is empty"):
        activation_importance(model, torch.zeros(0, 16, dtype=torch.long))


def test_adamw_moments_are_sliced_like_the_weights():
    from growfam.grow import prune_adamw

    source, maps = _model(GQA), _kept(GQA)
    decay = [p for n, p in source.named_parameters() if p.ndim == 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": [p for p in source.parameters() if p.ndim == 1], "weight_decay": 0.0}])
    idx = torch.randint(0, GQA.vocab_size, (2, 8))
    for _ in range(2):
        source.loss(idx[:, :-1], idx[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
    pruned = prune(source, maps)
    new = prune_adamw(optimizer, source, pruned, maps)
    params = dict(pruned.named_parameters())
    assert [g["weight_decay"] for g in new.param_groups] == [0.1, 0.0]
    assert {id(p) for p in new.param_groups[1]["params"]} == {id(p) for p in pruned.parameters() if p.ndim == 1}
    hidden, c = list(maps.hidden), (GQA.d_model / len(maps.hidden)) ** 0.5
    old = optimizer.state
    src = dict(source.named_parameters())
    # a weight: plain slicing, both moments; a norm gain ×c: its m / c, its v / c²; the step count kept
    q = new.state[params["layers.1.mlp.down_proj.weight"]]
    ref = old[src["layers.2.mlp.down_proj.weight"]]
    ffn = list(maps.ffn[1])
    assert torch.equal(q["exp_avg"], ref["exp_avg"][hidden][:, ffn])
    assert torch.equal(q["exp_avg_sq"], ref["exp_avg_sq"][hidden][:, ffn])
    assert torch.equal(q["step"], ref["step"])
    norm, ref = new.state[params["layers.0.input_layernorm.weight"]], old[src["layers.0.input_layernorm.weight"]]
    assert torch.allclose(norm["exp_avg"], ref["exp_avg"][hidden] / c, rtol=1e-12, atol=0)
    assert torch.allclose(norm["exp_avg_sq"], ref["exp_avg_sq"][hidden] / c ** 2, rtol=1e-12, atol=0)
    new.step()  # the state is usable as it is
