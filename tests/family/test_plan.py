"""Family planner: the paper's numbers, Eq. 4, LR policies, steps, GPU-hours, JSON, CLI errors."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from growfam.cli import main
from growfam.errors import ConfigError
from growfam.model import ModelConfig, flops_per_token, get_preset, num_params
from growfam.train import DEFAULT_MAX_LR, DEFAULT_MIN_LR_RATIO, ParallelConfig, TrainConfig
from growfam.config import (DataConfig, FamilyConfig, GrowthConfig, LRPolicy, TrainSection, load_family_config,
                            shipped_families)
from growfam.family import make_plan

B = 1e9
PAPER = ["paper-1b", "paper-2b", "paper-4b", "paper-8b"]
PAPER_BATCH = [960, 1920, 3840, 7680]


def tokens(plan, mode: str) -> list[float]:
    return [getattr(s, f"tokens_{mode}") for s in plan.stages]


# ---- the paper (Appendix B, Tables 7-8) ------------------------------------------------------


def test_paper_2x_chinchilla():
    plan = make_plan(load_family_config("paper-r2"))
    assert tokens(plan, "progressive") == pytest.approx([40 * B, 60 * B, 120 * B, 240 * B])
    assert tokens(plan, "independent") == pytest.approx([40 * B, 80 * B, 160 * B, 320 * B])
    assert plan.flops_progressive == pytest.approx(6 * 2560e18)
    assert plan.flops_independent == pytest.approx(6 * 3400e18)
    assert round(100 * plan.saving, 1) == 24.7


def test_paper_1x_chinchilla():
    plan = make_plan(load_family_config("paper-r1"))
    assert tokens(plan, "progressive") == pytest.approx([20 * B, 30 * B, 60 * B, 120 * B])
    assert tokens(plan, "independent") == pytest.approx([20 * B, 40 * B, 80 * B, 160 * B])
    assert round(100 * plan.saving, 1) == 24.7


def test_paper_steps_match_table_6():
    # Table 6 reports ~40700 updates for every size at 2x Chinchilla (Independent).
    plan = make_plan(load_family_config("paper-r2"))
    assert [s.steps_independent for s in plan.stages] == [40691] * 4  # ceil(40e9 / (960·1024))
    assert [s.steps_progressive for s in plan.stages] == [40691, 30518, 30518, 30518]
    assert plan.stages[1].tokens_per_step == 1920 * 1024


def test_steps_round_up_and_ignore_float_noise():
    spec = FamilyConfig(members=["tiny-1", "tiny-2"], tokens=[1000, 5000], batch_size=[2, 3], seq_len=100)
    plan = make_plan(spec)
    assert [s.steps_independent for s in plan.stages] == [5, 17]  # 1000/200, ceil(5000/300)
    # 40e9 tokens at a million tokens per step is exactly 40000 steps, not 40001.
    spec = FamilyConfig(members=["paper-1b"], tokens=[0.1 * 4e11], batch_size=1000, seq_len=1000)
    assert make_plan(spec).stages[0].steps_independent == 40000


def test_counts():
    nonemb = make_plan(load_family_config("paper-r2").replace(count="nonembedding"))
    total = make_plan(load_family_config("paper-r2").replace(count="total"))
    cfgs = [get_preset(n) for n in PAPER]
    assert [s.params for s in nonemb.stages] == [num_params(c, "nonembedding") for c in cfgs]
    assert [s.params for s in total.stages] == [num_params(c, "total") for c in cfgs]
    assert [round(s.params / B, 2) for s in nonemb.stages] == [1.09, 2.09, 4.01, 8.03]
    assert nonemb.stages[0].tokens_independent == pytest.approx(40 * num_params(cfgs[0], "nonembedding"))
    # explicit nominal sizes override the configs' own
    spec = FamilyConfig(members=["tiny-1", "tiny-2"], chinchilla=1, count="nominal", nominal=["1e6", 3e6],
                      batch_size=8)
    assert [s.params for s in make_plan(spec).stages] == [1e6, 3e6]
    assert spec.replace(tokens=[1e6, 5e6]).chinchilla is None  # a new token rule replaces the old


def test_nominal_count_needs_nominal_sizes():
    with pytest.raises(ConfigError, match="missing for: tiny-1, tiny-2 "):
        FamilyConfig(members=["tiny-1", "tiny-2"], chinchilla=1, count="nominal", batch_size=8)


def random_family(rng: random.Random) -> FamilyConfig:
    """A family of 2-6 members with head_dim 16 and strictly growing layer counts and widths."""
    k = rng.randint(2, 6)
    layers = sorted(rng.sample(range(1, 30), k))
    members = [ModelConfig(d_model=16 * h, n_heads=h, n_layers=n, ffn_dim=rng.randint(16, 512),
                           vocab_size=300, name=f"m{i}")
               for i, (h, n) in enumerate(zip(sorted(rng.sample(range(2, 40), k)), layers))]
    # Random FFN widths can reorder the sizes: sort so the family grows.
    members.sort(key=lambda m: num_params(m, "nonembedding"))
    return FamilyConfig(members=members, chinchilla=rng.uniform(0.1, 4), count="nonembedding",
                      batch_size=rng.randint(1, 64), seq_len=rng.choice([128, 256, 1024]))


@pytest.mark.parametrize("seed", range(20))
def test_eq4_cumulative_progressive_equals_from_scratch(seed):
    rng = random.Random(seed)
    try:
        spec = random_family(rng)
    except ConfigError:  # two members of equal size
        pytest.skip("degenerate draw")
    plan = make_plan(spec)
    for s in plan.stages:
        # after stage i the family has cost exactly what training N_i from scratch costs
        assert s.cum_flops_progressive == pytest.approx(6 * s.params * s.tokens_independent, rel=1e-12)
        assert s.tokens_progressive > 0
    assert plan.stages[0].tokens_progressive == plan.stages[0].tokens_independent
    assert plan.flops_progressive == pytest.approx(plan.stages[-1].flops_independent, rel=1e-12)


def test_attention_inclusive_flops():
    plan = make_plan(load_family_config("paper-r2"))
    s = plan.stages[3]
    assert s.attn_flops_independent == flops_per_token(get_preset("paper-8b"), 1024) * 320 * B


# ---- learning rates ----------------------------------------------------------------------------


def test_lr_fixed_default():
    plan = make_plan(load_family_config("paper-r2"))
    assert [s.max_lr for s in plan.stages] == [3e-4] * 4
    assert [s.min_lr for s in plan.stages] == pytest.approx([3e-5] * 4)


def test_lr_linear_by_index_and_by_params():
    plan = make_plan(load_family_config("paper-r2-lr"))
    assert [s.max_lr for s in plan.stages] == pytest.approx([6e-4, 5e-4, 4e-4, 3e-4])
    spec = load_family_config("paper-r2").replace(lr=LRPolicy("linear", start=6e-4, end=3e-4, by="params"))
    # nominal 1/2/4/8B: the LR falls by 3e-4 · (N - 1B) / 7B
    expected = [6e-4 - 3e-4 * (n - 1) / 7 for n in (1, 2, 4, 8)]
    assert [s.max_lr for s in make_plan(spec).stages] == pytest.approx(expected)
    assert LRPolicy("linear", start=1e-3, end=1e-4).max_lrs([5.0]) == [1e-3]


@pytest.mark.parametrize("data, message", [
    ({"policy": "cosine"}, "lr.policy must be fixed or linear, got 'cosine'"),
    ({"policy": "linear", "start": 1e-3}, "lr.end must be a number, got None"),
    ({"policy": "linear", "start": 1e-3, "end": 1e-4, "max": 1e-3}, "lr: policy linear takes start/end, not `max`"),
    ({"policy": "fixed", "start": 1e-3}, "lr: policy fixed takes `max`, not start/end"),
    ({"policy": "linear", "start": 1e-3, "end": 1e-4, "by": "size"}, "lr.by must be index or params, got 'size'"),
    ({"max": "fast"}, "lr.max must be a number, got 'fast'"),
    ({"maxlr": 1e-3}, "unknown key 'maxlr' in lr (did you mean 'max'?)"),
])
def test_lr_errors(data, message):
    with pytest.raises(ConfigError) as err:
        LRPolicy.from_dict(data)
    assert str(err.value).startswith(message)


def test_yaml_exponents_without_a_dot_are_numbers():
    # YAML 1.1 reads `3e-4` and `40e9` as strings; the spec accepts them as numbers.
    spec = FamilyConfig.from_dict({"members": PAPER[:2], "tokens": {"explicit": ["40e9", "80e9"]},
                                 "batch_size": 960, "lr": {"max": "3e-4"}})
    assert spec.tokens == [40e9, 80e9] and spec.lr.max == 3e-4


# ---- GPU-hours and output ----------------------------------------------------------------------


def test_gpu_hours():
    plan = make_plan(load_family_config("paper-r2"))
    hours = plan.gpu_hours(peak_tflops=1000, mfu=0.5)
    flops = flops_per_token(get_preset("paper-1b"), 1024) * 40 * B
    assert hours.independent[0] == pytest.approx(flops / (1000e12 * 0.5) / 3600)
    assert hours.total_independent == pytest.approx(
        sum(s.attn_flops_independent for s in plan.stages) / 5e14 / 3600)
    assert hours.total_progressive < hours.total_independent
    assert plan.gpu_hours(500, 0.5).total_progressive == pytest.approx(2 * hours.total_progressive)
    with pytest.raises(ConfigError, match="MFU is a fraction"):
        plan.gpu_hours(1000, 40)
    with pytest.raises(ConfigError, match="peak TFLOPs must be positive"):
        plan.gpu_hours(0, 0.4)


def test_json_output(capsys):
    assert main(["plan", "--json", "--peak-tflops", "1000", "--mfu", "0.5"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["tokens_progressive"] for s in data["stages"]] == [40 * B, 60 * B, 120 * B, 240 * B]
    assert [s["name"] for s in data["stages"]] == PAPER
    assert round(data["totals"]["saving_pct"], 1) == 24.7
    assert data["totals"]["flops_progressive"] == pytest.approx(6 * 2560e18)
    assert data["gpu_hours"]["peak_tflops"] == 1000 and len(data["gpu_hours"]["progressive"]) == 4


def test_table_output(capsys):
    assert main(["plan"]) == 0
    out = capsys.readouterr().out
    assert "family paper-r2" in out and "saving: 24.7%" in out
    row = next(line for line in out.splitlines() if line.startswith("paper-8b"))
    assert row.split()[:6] == ["paper-8b", "8B", "7680", "1024", "320B", "240B"]


def test_cli_overrides(capsys):
    assert main(["plan", "--chinchilla", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["tokens_progressive"] for s in data["stages"]] == [20 * B, 30 * B, 60 * B, 120 * B]
    assert main(["plan", "tiny", "--members", "tiny-2", "tiny-4", "--batch-size", "4", "--count", "total", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(s["name"], s["batch_size"], s["seq_len"]) for s in data["stages"]] == [("tiny-2", 4, 128), ("tiny-4", 4, 128)]
    assert data["stages"][0]["params"] == num_params(get_preset("tiny-2"), "total")


# ---- specs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["paper-r1", "paper-r2", "paper-r2-lr", "tiny", "tiny-inherit"])
def test_shipped_families(name):
    assert name in shipped_families()
    spec = load_family_config(name)
    assert spec.name == name
    plan = make_plan(spec)
    again = make_plan(FamilyConfig.from_dict(spec.to_dict()))  # to_dict round-trips
    assert again.to_dict() == plan.to_dict()


def test_tiny_family_is_a_cpu_demo():
    plan = make_plan(load_family_config("tiny"))
    totals = plan.to_dict()["totals"]
    assert 1e6 < totals["tokens_progressive"] < totals["tokens_independent"] < 5e6
    assert [s.name for s in plan.stages] == ["tiny-1", "tiny-2", "tiny-3", "tiny-4"]


def test_sections_are_parsed_when_the_yaml_is_loaded(tmp_path):
    path = tmp_path / "fam.yaml"
    path.write_text("members: [tiny-1, tiny-2]\nbatch_size: 8\ntrain: {warmup_frac: 0.02}\n"
                    "growth: {width: masked, slope: 1e-5}\ndata: {dir: shards/}\n")
    config = FamilyConfig.from_yaml(path)
    assert config.name == "fam" and config.chinchilla == 1  # defaults: file stem, D = 20·N
    assert (config.growth.width, config.growth.depth, config.growth.slope) == ("masked", "stack", 1e-5)
    assert (config.data.dir, config.data.tokenizer) == ("shards/", "gpt2")
    assert config.train.given == {"warmup_frac": 0.02} and config.to_dict()["train"] == {"warmup_frac": 0.02}
    # the train section reads as a TrainConfig would: what it sets, else TrainConfig's default
    assert (config.train.warmup_frac, config.train.weight_decay) == (0.02, TrainConfig(max_steps=1).weight_decay)
    assert config.train.parallel == ParallelConfig() and config.train.micro_batch_size is None
    for planned_or_unknown in ("max_lr", "batch_size", "warmup"):  # the plan sets these; no such field
        with pytest.raises(AttributeError):
            getattr(config.train, planned_or_unknown)
    assert config.to_dict()["growth"]["width"] == "masked"
    assert FamilyConfig.from_dict(config.to_dict()) == config  # every section round-trips
    # no section means every default
    bare = FamilyConfig(members=["tiny-1", "tiny-2"], chinchilla=1, batch_size=8)
    assert (bare.growth, bare.data, bare.train) == (GrowthConfig(), DataConfig(), TrainSection())
    assert bare.lr.max == TrainConfig(max_steps=1).max_lr == DEFAULT_MAX_LR  # one default, written once
    assert bare.lr.min_ratio == DEFAULT_MIN_LR_RATIO


def test_member_config_paths_resolve_next_to_the_family_yaml(tmp_path):
    (tmp_path / "configs").mkdir()
    get_preset("tiny-3").replace(name="mine").save(tmp_path / "configs" / "mine.yaml")
    (tmp_path / "fam.yaml").write_text("members: [tiny-1, configs/mine.yaml]\nbatch_size: 8\n")
    spec = load_family_config(str(tmp_path / "fam.yaml"))
    assert [m.name for m in spec.members] == ["tiny-1", "mine"]


# ---- bad input: one line on stderr, exit status 2, no traceback ----------------------------------


TINY_DICT = "{d_model: %d, n_layers: 4, n_heads: %d, n_kv_heads: %d, ffn_dim: 448, vocab_size: 4096, max_seq_len: 256, name: %s}"

BAD_FAMILIES = {
    "not-increasing": (
        "members: [tiny-2, tiny-1]\nbatch_size: 8\n",
        "member sizes must strictly increase (nonembedding parameters): tiny-1 (119K) is not larger than tiny-2 (402K)",
    ),
    "head-dim": (
        f"members: [tiny-1, {TINY_DICT % (256, 8, 8, 'wide')}]\nbatch_size: 8\n",
        "head_dim must be constant across the family: tiny-1 has 16, wide has 32",
    ),
    "vocab": (
        "members: [tiny-4, paper-8b]\nbatch_size: 8\nseq_len: 256\n",
        "head_dim must be constant across the family: tiny-4 has 16, paper-8b has 128",
    ),
    "heads-divide-d-model": (
        f"members: [tiny-1, {TINY_DICT % (100, 3, 3, 'odd')}]\nbatch_size: 8\n",
        "members[1]: odd: n_heads=3 does not divide d_model=100",
    ),
    "kv-heads-divide-heads": (
        f"members: [tiny-1, {TINY_DICT % (128, 8, 3, 'gqa')}]\nbatch_size: 8\n",
        "members[1]: gqa: n_kv_heads=3 does not divide n_heads=8",
    ),
    "progressive-budget": (
        "members: [tiny-1, tiny-2, tiny-3]\nbatch_size: 8\ntokens: {explicit: [4e6, 1e6, 4e6]}\n",
        "stage 2 (tiny-2): progressive budget D'_2 = 1e+06 - 1.186e+06 = -1.864e+05 tokens <= 0; "
        "the earlier stages already cost as much as training tiny-2 from scratch",
    ),
    "unknown-preset": (
        "members: [tiny-1, tiny-9]\nbatch_size: 8\n",
        "members[1]: unknown preset 'tiny-9'; known presets: paper-1b, paper-2b",
    ),
    "malformed-yaml": (
        "members: [tiny-1, tiny-2\nbatch_size: 8\n",
        "malformed YAML at line 2, column 11: expected ',' or ']', but got ':'",
    ),
    "unknown-key": (
        "members: [tiny-1, tiny-2]\nbatchsize: 8\n",
        "unknown key 'batchsize' in the family spec (did you mean 'batch_size'?)",
    ),
    "batch-length": (
        "members: [tiny-1, tiny-2]\nbatch_size: [8, 16, 32]\n",
        "batch_size has 3 entries for 2 members",
    ),
    "two-token-rules": (
        "members: [tiny-1, tiny-2]\nbatch_size: 8\ntokens: {chinchilla: 1, explicit: [1, 2]}\n",
        "give exactly one token rule",
    ),
    "seq-too-long": (
        "members: [tiny-1, tiny-2]\nbatch_size: 8\nseq_len: 512\n",
        "seq_len 512 exceeds tiny-1's max_seq_len 256",
    ),
    # every section is checked when the YAML is loaded, so `growfam plan` refuses it too
    "growth-key": (
        "members: [tiny-1, tiny-2]\nbatch_size: 8\ngrowth: {widht: aki}\n",
        "unknown key 'widht' in growth (did you mean 'width'?)",
    ),
    "growth-value": (
        "members: [tiny-1, tiny-2]\nbatch_size: 8\ngrowth: {optimizer: keep}\n",
        "growth.optimizer must be transfer or reset, got 'keep'",
    ),
    "data-value": (
        "members: [tiny-1, tiny-2]\nbatch_size: 8\ndata: {val_fraction: 0.9}\n",
        "data.val_fraction must be in [0, 0.5], got 0.9",
    ),
    "train-planned": (
        "members: [tiny-1, tiny-2]\nbatch_size: 8\ntrain: {max_lr: 1.0}\n",
        "train.max_lr is set by the family plan; remove it from the train section",
    ),
    "train-key": (
        "members: [tiny-1, tiny-2]\nbatch_size: 8\ntrain: {warmup: 0.01}\n",
        "unknown key 'warmup' in train (did you mean 'warmup_frac'?)",
    ),
    "train-mapping": (
        "members: [tiny-1, tiny-2]\nbatch_size: 8\ntrain: [1, 2]\n",
        "train must be a mapping, got list",
    ),
}


@pytest.mark.parametrize("case", BAD_FAMILIES)
def test_bad_family_is_one_clear_line(case, tmp_path, capsys):
    text, message = BAD_FAMILIES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    assert main(["plan", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    # the spec loads but cannot be planned: the error names the family (the file's stem)
    where = f"family {case}" if case == "progressive-budget" else str(path)
    assert captured.err.startswith(f"growfam plan: error: {where}: {message}")
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_vocab_must_match(tmp_path, capsys):
    path = tmp_path / "fam.yaml"
    path.write_text(f"members: [tiny-1, {TINY_DICT.replace('4096', '500') % (128, 8, 8, 'v500')}]\nbatch_size: 8\n")
    assert main(["plan", str(path)]) == 2
    assert "vocab_size must be equal across the family: tiny-1 has 4096, v500 has 500" in capsys.readouterr().err


def test_unknown_family_and_cli_member(capsys):
    assert main(["plan", "paper-r3"]) == 2
    err = capsys.readouterr().err
    assert err == ("growfam plan: error: unknown family 'paper-r3'; shipped families: micro, micro-lr, paper-r1, paper-r2, "
                   "paper-r2-lr, tiny, tiny-inherit (or give the path of a family YAML)\n")
    assert main(["plan", "--members", "paper-1b", "paper-16b", "--batch-size", "8"]) == 2
    assert capsys.readouterr().err.startswith("growfam plan: error: members[1]: unknown preset 'paper-16b'")


@pytest.mark.slow  # several processes
def test_cli_process_exits_2_without_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("members: [tiny-1\n")
    proc = subprocess.run([sys.executable, "-m", "growfam.cli", "plan", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(f"growfam plan: error: {path}: malformed YAML")
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_the_micro_family_keeps_its_stated_limits():
    """micro.yaml: 2 tokens per non-embedding parameter, no member's budget over ~4 passes over
    the embedded corpus (3.38M training tokens with the 4096-token BPE), micro-lr the same but
    the max LR falling 4e-3 -> 2e-3."""
    corpus_tokens = 3.38e6
    for name in ("micro", "micro-lr"):
        plan = make_plan(load_family_config(name))
        for stage in plan.stages:
            assert stage.tokens_independent == pytest.approx(2 * stage.params)
            assert stage.tokens_independent < 4 * corpus_tokens
    lrs = [s.max_lr for s in make_plan(load_family_config("micro-lr")).stages]
    assert lrs[0] == pytest.approx(4e-3) and lrs[-1] == pytest.approx(2e-3) and lrs == sorted(lrs, reverse=True)
