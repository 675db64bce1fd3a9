"""Growth operators (growfam.grow): exactness in float64, shapes, training, optimizer state,
masks, several sources, the paper chain on meta, and refusals."""

import json

import pytest
import torch

from conftest import random_model
from growfam.errors import ConfigError
from growfam.grow import (DEPTH_OPS, WIDTH_OPS, GrowthPlan, MaskState, advance_masks, expand,
                          expand_from, mask_state)
from growfam.grow.masks import applied_masks, attach_masks
from growfam.grow.maps import spread_map, stack_map
from growfam.model import Llama, ModelConfig, get_preset

VOCAB = 61

#: (KV heads, tied, q/k/v and o biases: a Llama with attention_bias, the superset of Qwen2's)
VARIANTS = {"mha-untied": (4, False, False), "gqa-untied": (2, False, False), "mha-tied": (4, True, False),
            "gqa-tied": (2, True, False), "gqa-biased": (2, False, True)}


def source_config(n_kv: int, tied: bool, biased: bool = False) -> ModelConfig:
    return ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=n_kv, ffn_dim=64,
                       vocab_size=VOCAB, max_seq_len=32, tie_embeddings=tied, qkv_bias=biased,
                       o_bias=biased, name="src")


def integer_target(src: ModelConfig) -> ModelConfig:
    """Every dimension doubled."""
    return src.replace(d_model=64, n_heads=8, n_kv_heads=2 * src.n_kv_heads, ffn_dim=128,
                       n_layers=4, name="x2")


def ragged_target(src: ModelConfig) -> ModelConfig:
    """Non-integer ratios: d 32->48, heads 4->6, ffn 64->100, layers 2->3."""
    return src.replace(d_model=48, n_heads=6, n_kv_heads=6 // src.n_rep, ffn_dim=100,
                       n_layers=3, name="x1.5")


@pytest.fixture(params=list(VARIANTS), scope="module")
def source(request) -> Llama:
    return random_model(source_config(*VARIANTS[request.param]), dtype=torch.float64)


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model: Llama, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)


def assert_shapes(model: Llama, cfg: ModelConfig) -> None:
    with torch.device("meta"):
        want = {n: p.shape for n, p in Llama(cfg).named_parameters()}
    assert {n: p.shape for n, p in model.named_parameters()} == want
    assert model.cfg.d_model == cfg.d_model and model.cfg.n_layers == cfg.n_layers


# --------------------------------------------------------------------------------------------
# Exactness
# --------------------------------------------------------------------------------------------

EXACT = [("fpi", "identity", integer_target), ("hypercloning", "redundant", integer_target),
         ("hypercloning", "identity", integer_target), ("lossless", "redundant", ragged_target),
         ("lossless", "identity", integer_target), ("masked", "identity", ragged_target),
         ("masked", "redundant", integer_target), ("fpi", "redundant", integer_target)]


@pytest.mark.parametrize("width,depth,target", EXACT, ids=[f"{w}-{d}-{t.__name__.split('_')[0]}"
                                                            for w, d, t in EXACT])
def test_exact_operators_preserve_logits(source, probe, width, depth, target):
    grown, _, report = expand(source, target(source.cfg), width, depth, probe=probe)
    assert_shapes(grown, target(source.cfg))
    before, after = logits(source, probe), logits(grown, probe)
    rel = (after - before).abs().max() / before.abs().max()
    assert rel <= 1e-9
    assert report.probe.rel_dlogits <= 1e-9 and abs(report.probe.dloss) <= 1e-9


def test_lossless_rescales_norm_eps(source):
    tgt = ragged_target(source.cfg)
    grown, _, report = expand(source, tgt, "lossless", "identity")
    assert grown.cfg.norm_eps == pytest.approx(source.cfg.norm_eps * 32 / 48, rel=1e-15)
    assert all(m.eps == grown.cfg.norm_eps for m in grown.modules() if hasattr(m, "eps"))
    assert report.target["norm_eps"] == grown.cfg.norm_eps


@pytest.mark.parametrize("width,target", [("aki", integer_target), ("aki", ragged_target),
                                          ("fpi", ragged_target)])
def test_inexact_operators_report_the_change(source, probe, width, target):
    grown, _, report = expand(source, target(source.cfg), width, "interleave", probe=probe)
    before, after = logits(source, probe), logits(grown, probe)
    diff = (after - before).abs().max().item()
    assert diff / before.abs().max().item() > 1e-6
    assert report.probe.max_abs_dlogits == pytest.approx(diff, rel=1e-12)
    assert report.probe.loss_grown == pytest.approx(grown.loss(probe[:, :-1], probe[:, 1:]).item())
    lo, hi = report.rms_factor
    if target is ragged_target:  # 32 -> 48: half the dims doubled, RMS no longer matches
        assert lo < 1 < hi
    else:
        assert lo == pytest.approx(1, abs=1e-12) and hi == pytest.approx(1, abs=1e-12)


def test_aki_takes_new_heads_biases_from_the_next_layer():
    """A new head's q/k/v bias comes from layer l+1 with its weight rows; the o bias writes the
    residual, whose new dimensions come from layer l itself (as o_proj's new rows do)."""
    src = random_model(source_config(2, False, biased=True), dtype=torch.float64)
    tgt = integer_target(src.cfg)
    grown, _, _ = expand(src, tgt, "aki", "stack")
    plan = GrowthPlan.make(src.cfg, tgt, "aki", "stack")
    checked = 0
    for j in range(tgt.n_layers):
        if plan.layers.new[j]:
            continue
        l = plan.layers.src[j]
        for proj, space in (("q_proj", "q"), ("k_proj", "kv"), ("v_proj", "kv"), ("o_proj", "d")):
            def bias(layer):
                return layer.self_attn.get_parameter(f"{proj}.bias")
            n = bias(src.layers[l]).numel()
            donor = src.layers[l if space == "d" else min(l + 1, src.cfg.n_layers - 1)]
            assert torch.equal(bias(grown.layers[j])[:n], bias(src.layers[l]))
            assert torch.equal(bias(grown.layers[j])[n:], bias(donor)[plan.spaces[space].src[n:]]), (j, proj)
            checked += 1
    assert checked >= 8 and not torch.equal(src.layers[0].self_attn.q_proj.bias, src.layers[1].self_attn.q_proj.bias)


def test_fpi_is_exact_where_the_rms_factor_is_one(probe):
    """Ragged d with an integer-ratio RMS: only d grows 32->64, heads/ffn/layers ragged."""
    src = random_model(source_config(2, False), dtype=torch.float64)
    tgt = src.cfg.replace(d_model=64, n_heads=8, n_kv_heads=4, ffn_dim=100, n_layers=3)
    _, _, report = expand(src, tgt, "fpi", "identity", probe=probe)
    assert report.probe.rel_dlogits <= 1e-9


# --------------------------------------------------------------------------------------------
# Every operator: shapes, training
# --------------------------------------------------------------------------------------------

COMBOS = [(w, "stack") for w in WIDTH_OPS] + [("fpi", d) for d in DEPTH_OPS]


def train_losses(model: Llama, optimizer, tokens: torch.Tensor, steps: int = 6) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        advance_masks(model)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("width,depth", COMBOS, ids=[f"{w}-{d}" for w, d in COMBOS])
def test_every_operator_grows_a_trainable_model(width, depth, probe):
    src = random_model(source_config(2, False), dtype=torch.float64)
    tgt = (integer_target if WIDTH_OPS[width].integer else ragged_target)(src.cfg)
    grown, _, report = expand(src, tgt, width, depth, seed=3, probe=probe, mask_steps=3)
    assert_shapes(grown, tgt)
    assert sum(p.copied + p.split + p.new for p in report.params) == grown.num_params()
    grown.train()
    losses = train_losses(grown, torch.optim.AdamW(grown.parameters(), lr=3e-3), probe)
    assert losses[-1] < losses[0] - 1e-3
    assert mask_state(grown) is None  # masks folded after mask_steps optimizer steps


def test_seed_makes_growth_reproducible(source):
    tgt = ragged_target(source.cfg)
    a, _, _ = expand(source, tgt, "random", "random", seed=5)
    b, _, _ = expand(source, tgt, "random", "random", seed=5)
    c, _, _ = expand(source, tgt, "random", "random", seed=6)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_free_source_releases_tensors_and_grows_the_same(source):
    tgt = ragged_target(source.cfg)
    kept, _, _ = expand(source, tgt, "aki", "stack")
    copy = random_model(source.cfg, dtype=torch.float64)
    copy.load_state_dict(source.state_dict())
    freed, _, _ = expand(copy, tgt, "aki", "stack", free_source=True)
    assert all(torch.equal(p, q) for p, q in zip(kept.parameters(), freed.parameters()))
    assert all(p.numel() == 0 for p in copy.parameters())


def test_source_model_is_left_intact(source):
    before = {n: p.clone() for n, p in source.named_parameters()}
    expand(source, integer_target(source.cfg), "fpi", "stack")
    assert all(torch.equal(p, before[n]) for n, p in source.named_parameters())


# --------------------------------------------------------------------------------------------
# Index maps and placements
# --------------------------------------------------------------------------------------------


def test_depth_placements():
    assert stack_map(18, 22).src == tuple(range(18)) + (14, 15, 16, 17)
    assert stack_map(2, 5).src == (0, 1, 0, 1, 1)
    spread = spread_map(4, 6)
    assert spread.src == (0, 0, 1, 2, 2, 3)
    assert spread.new == (False, True, False, False, True, False)


def test_gqa_query_heads_follow_their_kv_group():
    src = source_config(2, False)  # 4 query heads, 2 KV heads, head_dim 8
    tgt = src.replace(d_model=80, n_heads=10, n_kv_heads=5)
    plan = GrowthPlan.make(src, tgt, "fpi", "stack", seed=0)
    q = plan.spaces["q"].src.view(10, 8)[:, 0] // 8  # source query head of each target head
    kv = plan.spaces["kv"].src.view(5, 8)[:, 0] // 8
    assert torch.equal(q, kv.repeat_interleave(2) * 2 + torch.arange(10) % 2)
    counts = torch.bincount(kv, minlength=2)
    assert counts.max() - counts.min() <= 1  # balanced copies


def test_report_table_and_json(source, probe):
    grown, _, report = expand(source, ragged_target(source.cfg), "aki", "stack", probe=probe)
    text = str(report)
    for needle in ("width aki", "depth stack", "layers.*.mlp.up_proj.weight", "max |Δlogits|",
                   "RMS mismatch"):
        assert needle in text
    data = json.loads(json.dumps(report.to_dict()))
    assert sum(data["totals"].values()) == grown.num_params()
    assert data["probe"]["dloss"] == pytest.approx(report.probe.dloss)


def test_counts_per_tensor():
    src = random_model(source_config(4, False), dtype=torch.float64)
    _, _, report = expand(src, integer_target(src.cfg), "fpi", "identity")
    by_name = {p.name: p for p in report.params}
    q = by_name["layers.0.self_attn.q_proj.weight"]  # every column split (each d unit x2)
    assert (q.copied, q.split, q.new) == (0, 64 * 64, 0)
    emb = by_name["embed_tokens.weight"]  # columns copied undivided
    assert (emb.copied, emb.split, emb.new) == (VOCAB * 64, 0, 0)
    o_new = by_name["layers.1.self_attn.o_proj.weight"]  # inserted identity layer: zero o_proj
    assert (o_new.copied, o_new.split, o_new.new) == (0, 0, 64 * 64)
    _, _, report = expand(src, ragged_target(src.cfg), "lossless", "stack")
    up = {p.name: p for p in report.params}["layers.0.mlp.up_proj.weight"]
    assert (up.copied, up.split, up.new) == (100 * 32, 0, 100 * 16)  # new d columns random


# --------------------------------------------------------------------------------------------
# Optimizer state
# --------------------------------------------------------------------------------------------


def trained_source(probe, tied=False, biased=False):
    src = random_model(source_config(2, tied, biased), dtype=torch.float64).train()
    opt = torch.optim.AdamW([
        {"params": [p for p in src.parameters() if p.ndim == 2], "weight_decay": 0.1},
        {"params": [p for p in src.parameters() if p.ndim == 1], "weight_decay": 0.0},
    ], lr=1e-3, betas=(0.9, 0.95))
    train_losses(src, opt, probe, steps=3)
    return src, opt


@pytest.mark.parametrize("tied,biased", [(False, False), (True, False), (False, True)],
                         ids=["untied", "tied", "biased"])
def test_optimizer_transfer_copies_moments(probe, tied, biased):
    src, opt = trained_source(probe, tied, biased)
    grown, new_opt, report = expand(src, ragged_target(src.cfg), "lossless", "stack",
                                    optimizer=opt)
    assert report.optimizer == "transfer"
    assert [g["weight_decay"] for g in new_opt.param_groups] == [0.1, 0.0]
    assert new_opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert sum(len(g["params"]) for g in new_opt.param_groups) == len(list(grown.parameters()))
    for name, p in grown.named_parameters():
        state, source = new_opt.state[p], opt.state[src.get_parameter(GrowthPlan.make(
            src.cfg, ragged_target(src.cfg), "lossless", "stack").source_name(name))]
        assert state["step"] == source["step"] == 3
        for kind in ("exp_avg", "exp_avg_sq"):
            old = source[kind]
            block = tuple(slice(0, n) for n in old.shape)
            assert torch.equal(state[kind][block], old), (name, kind)  # copied units inherit
            rest = state[kind].clone()
            rest[block] = 0
            assert not rest.any(), (name, kind)  # new units start at zero
    train_losses(grown, new_opt, probe, steps=2)  # the grown optimizer steps


def test_optimizer_transfer_scales_replicated_units(probe):
    """fpi x2: every unit is read with 1/2, so its copies see half the gradient: m/2, v/4
    (a bias with its weight's rows)."""
    src, opt = trained_source(probe, biased=True)
    grown, new_opt, _ = expand(src, integer_target(src.cfg), "fpi", "interleave", optimizer=opt)
    for name in ("layers.0.self_attn.q_proj.weight", "layers.0.mlp.down_proj.weight",
                 "embed_tokens.weight", "layers.0.input_layernorm.weight",
                 "layers.0.self_attn.k_proj.bias", "layers.0.self_attn.o_proj.bias"):
        old = opt.state[src.get_parameter(name)]
        new = new_opt.state[grown.get_parameter(name)]
        block = tuple(slice(0, n) for n in old["exp_avg"].shape)
        torch.testing.assert_close(new["exp_avg"][block], old["exp_avg"] / 2, rtol=0, atol=0)
        torch.testing.assert_close(new["exp_avg_sq"][block], old["exp_avg_sq"] / 4, rtol=0, atol=0)
    # interleave: the inserted copy of layer 0 (target layer 1) inherits the same moments
    a = new_opt.state[grown.get_parameter("layers.0.mlp.up_proj.weight")]["exp_avg"]
    b = new_opt.state[grown.get_parameter("layers.1.mlp.up_proj.weight")]["exp_avg"]
    assert torch.equal(a, b)
    # the final norm carries the split in its value, not in its gradient
    old = opt.state[src.norm.weight]["exp_avg"]
    assert torch.equal(new_opt.state[grown.norm.weight]["exp_avg"][:32], old)


def test_optimizer_reset_and_bad_optimizer(probe):
    src, opt = trained_source(probe)
    grown, new_opt, report = expand(src, ragged_target(src.cfg), optimizer=opt,
                                    optimizer_mode="reset")
    assert report.optimizer == "reset" and not new_opt.state
    assert new_opt.param_groups[1]["weight_decay"] == 0.0
    with pytest.raises(ConfigError, match="AdamW"):
        expand(src, ragged_target(src.cfg), optimizer=torch.optim.SGD(src.parameters(), lr=0.1))
    with pytest.raises(ConfigError, match="optimizer mode"):
        expand(src, ragged_target(src.cfg), optimizer=opt, optimizer_mode="keep")


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def test_masks_ramp_and_fold(source, probe):
    tgt = ragged_target(source.cfg)
    grown, _, report = expand(source, tgt, "masked", "identity", mask_steps=4)
    assert report.mask_steps == 4
    state = mask_state(grown)
    ramps = []
    for step in range(1, 4):
        advance_masks(grown)
        assert state.step == step
        ramps.append(applied_masks(grown)["d"][32:].clone())
        assert torch.all(applied_masks(grown)["d"][:32] == 1)
    assert torch.all(ramps[0] <= ramps[1]) and torch.all(ramps[1] <= ramps[2])
    assert ramps[0][0] == 1 and ramps[0][-1] == 0  # units switch on one after another
    assert 0 < ramps[1].mean() < 1
    # at mask 1 the masked model computes what the folded model computes
    attach_masks(grown, MaskState(4, state.sizes, step=4))
    at_one = logits(grown, probe)
    advance_masks(grown)
    assert mask_state(grown) is None
    assert applied_masks(grown) is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in grown.modules())
    torch.testing.assert_close(logits(grown, probe), at_one, rtol=1e-12, atol=1e-12)
    assert "mask" not in " ".join(grown.state_dict())


def test_advance_masks_is_a_noop_without_masks(source, probe):
    before = logits(source, probe)
    advance_masks(source)
    assert torch.equal(logits(source, probe), before)


def test_attaching_masks_again_replaces_them(source, probe):
    grown, _, _ = expand(source, ragged_target(source.cfg), "masked", "identity", mask_steps=4)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in grown.modules())
    assert hooks == 4 * grown.cfg.n_layers + 1  # two RMSNorms, o_proj and down_proj per block; the final norm
    at_zero = logits(grown, probe)
    attach_masks(grown, MaskState(4, mask_state(grown).sizes))
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in grown.modules()) == hooks
    assert torch.equal(logits(grown, probe), at_zero)


def test_masked_model_cannot_grow_again(source):
    grown, _, _ = expand(source, ragged_target(source.cfg), "masked", "stack")
    with pytest.raises(ConfigError, match="masks"):
        expand(grown, grown.cfg.replace(n_layers=5))


# --------------------------------------------------------------------------------------------
# Several sources
# --------------------------------------------------------------------------------------------


def test_expand_from_interleaves_layers(probe):
    a = random_model(source_config(2, False, biased=True), seed=1, dtype=torch.float64)
    b = random_model(source_config(2, False, biased=True), seed=2, dtype=torch.float64)
    grown, report = expand_from([a, b], a.cfg.replace(n_layers=4), "fpi", "stack", probe=probe)
    order = [(a, 0), (b, 0), (a, 1), (b, 1)]
    for j, (m, l) in enumerate(order):
        assert torch.equal(grown.layers[j].mlp.up_proj.weight, m.layers[l].mlp.up_proj.weight)
        for proj in ("q_proj", "o_proj"):  # a layer's biases travel with it
            assert torch.equal(grown.layers[j].self_attn.get_parameter(f"{proj}.bias"),
                               m.layers[l].self_attn.get_parameter(f"{proj}.bias"))
    assert torch.equal(grown.embed_tokens.weight, a.embed_tokens.weight)  # primary source
    assert report.probe is not None and "combined from 2 sources" in str(report)


def test_expand_from_concatenates_units():
    a = random_model(source_config(2, True, biased=True), seed=1, dtype=torch.float64)
    b = random_model(source_config(2, True, biased=True), seed=2, dtype=torch.float64)
    tgt = a.cfg.replace(d_model=80, n_heads=10, n_kv_heads=5, ffn_dim=150, n_layers=3)
    grown, _ = expand_from([a, b], tgt, "fpi", "identity", combine="width")
    assert_shapes(grown, tgt)
    # growing exactly to the combined shape shows the block-diagonal combination
    grown, _ = expand_from([a, b], tgt.replace(d_model=64, n_heads=8, n_kv_heads=4, ffn_dim=128),
                           "fpi", "identity", combine="width")
    q = grown.layers[0].self_attn.q_proj.weight
    assert torch.equal(q[:32, :32], a.layers[0].self_attn.q_proj.weight)
    assert torch.equal(q[32:64, 32:64], b.layers[0].self_attn.q_proj.weight)
    assert torch.all(q[:32, 32:64] == 0) and torch.all(q[32:64, :32] == 0)
    for proj in ("k_proj", "o_proj"):  # biases are concatenated like their weights' rows
        bias = grown.layers[0].self_attn.get_parameter(f"{proj}.bias")
        parts = [m.layers[0].self_attn.get_parameter(f"{proj}.bias") for m in (a, b)]
        assert torch.equal(bias, torch.cat(parts))


def test_expand_from_refuses_mismatched_sources():
    a = random_model(source_config(2, False), dtype=torch.float64)
    b = random_model(source_config(2, False).replace(d_model=48, n_heads=6, n_kv_heads=3))
    with pytest.raises(ConfigError, match="differ in d_model"):
        expand_from([a, b], a.cfg.replace(n_layers=4))
    with pytest.raises(ConfigError, match="combine mode"):
        expand_from([a, a], a.cfg.replace(n_layers=4), combine="sideways")
    with pytest.raises(ConfigError, match="at least one"):
        expand_from([], a.cfg)


# --------------------------------------------------------------------------------------------
# The paper chain on meta
# --------------------------------------------------------------------------------------------


def test_paper_chain_on_meta_lands_on_presets():
    with torch.device("meta"):
        model = Llama(get_preset("paper-1b"))
    for name in ("paper-2b", "paper-4b", "paper-8b"):
        model, _, report = expand(model, name, "aki", "stack")
        assert model.cfg == get_preset(name)
        assert_shapes(model, get_preset(name))
        assert model.embed_tokens.weight.device.type == "meta"
        assert report.probe is None and report.seconds < 10


# --------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# --------------------------------------------------------------------------------------------

CUDA_COMBOS = [("fpi", "identity"), ("aki", "stack"), ("lossless", "redundant"),
               ("masked", "identity"), ("random", "random")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("width,depth", CUDA_COMBOS, ids=[f"{w}-{d}" for w, d in CUDA_COMBOS])
def test_growth_on_cuda(width, depth, probe):
    src, opt = trained_source(probe, tied=True)
    src = src.cuda()
    opt = torch.optim.AdamW(src.parameters(), lr=1e-3)
    train_losses(src, opt, probe.cuda(), steps=2)
    target = integer_target(src.cfg) if width == "fpi" else ragged_target(src.cfg)
    grown, new_opt, report = expand(src, target, width, depth, optimizer=opt, probe=probe,
                                    mask_steps=2)
    assert all(t.device.type == "cuda" for t in grown.state_dict().values())
    assert all(t.device.type == "cuda" for s in new_opt.state.values() for k, t in s.items()
               if k != "step")
    if width != "aki" and width != "random":
        assert report.probe.rel_dlogits <= 1e-9
    losses = train_losses(grown, new_opt, probe.cuda(), steps=4)
    assert losses[-1] < losses[0] and mask_state(grown) is None


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------

BAD = [
    (dict(d_model=16, n_heads=2, n_kv_heads=1), "cannot shrink d_model"),
    (dict(n_layers=1), "cannot shrink n_layers"),
    (dict(d_model=64, n_heads=4, n_kv_heads=2), "head_dim"),
    (dict(d_model=64, n_heads=8, n_kv_heads=2), "query heads per KV head"),
    (dict(vocab_size=VOCAB + 1), "vocab_size differs"),
    (dict(tie_embeddings=True), "tie_embeddings differs"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m for _, m in BAD])
def test_bad_targets_are_refused(change, message):
    src = random_model(source_config(2, False))
    with pytest.raises(ConfigError, match=message):
        expand(src, src.cfg.replace(**change))


def test_bad_operator_requests_are_refused():
    src = random_model(source_config(2, False))
    with pytest.raises(ConfigError, match="unknown width operator 'fip'; known: fpi, aki"):
        expand(src, integer_target(src.cfg), width="fip")
    with pytest.raises(ConfigError, match="unknown depth operator"):
        expand(src, integer_target(src.cfg), depth="stacked")
    with pytest.raises(ConfigError, match="integer ratios; d_model grows 32 -> 48"):
        expand(src, ragged_target(src.cfg), width="hypercloning")
    with pytest.raises(ConfigError, match="mask_steps"):
        expand(src, ragged_target(src.cfg), width="masked", mask_steps=0)
    with pytest.raises(ConfigError, match="unknown preset"):
        expand(src, "paper-3b")
