"""A family built downward (`direction: shrink`): the plan's budgets and FLOPs, the largest
trained and each smaller member pruned from its source and recovered, the ledger's FLOPs
exact, a rerun that skips everything, and bad sections refused before any work."""

import json

import pytest
from conftest import documents
import yaml

from growfam.cli import main
from growfam.config import FamilyConfig
from growfam.data import prepare
from growfam.errors import ConfigError
from growfam.family import make_plan, run_family
from growfam.model import load_pretrained
from growfam.text import sci

TEXT = documents()
SHAPES = [dict(name="s", d_model=32, n_heads=2, n_kv_heads=1, n_layers=1, ffn_dim=48),
          dict(name="m", d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, ffn_dim=64),
          dict(name="l", d_model=96, n_heads=6, n_kv_heads=3, n_layers=3, ffn_dim=96)]


def spec(**changes) -> dict:
    data = dict(name="down", members=[dict(s, vocab_size=300, max_seq_len=32) for s in SHAPES],
                tokens={"explicit": [2000, 4000, 8000]}, batch_size=4, seq_len=32, direction="shrink",
                shrink={"tokens": 0.5, "calibration": 4},
                train={"eval_every": 4, "eval_batches": 2, "ckpt_every": 4, "log_every": 4, "tensorboard": False})
    data.update(changes)
    return data


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("down")
    prepare(TEXT, "train:300", root / "ds", val_fraction=0.05, progress=False)
    return root / "ds"


def test_the_plan_counts_the_largest_and_every_recovery_with_its_teacher():
    for source in ("previous", "largest"):
        plan = make_plan(FamilyConfig.from_dict(spec(shrink={"tokens": 0.5, "from": source})))
        s, m, l = plan.stages
        assert (l.tokens_shrink, l.teacher_flops_shrink, l.cum_flops_shrink) == (8000, 0, 6 * l.params * 8000)
        assert (m.tokens_shrink, s.tokens_shrink) == (2000, 1000)
        assert m.teacher_flops_shrink == 2 * l.params * 2000
        t = m if source == "previous" else l
        assert s.teacher_flops_shrink == 2 * t.params * 1000
        assert s.cum_flops_shrink == t.cum_flops_shrink + 6 * s.params * 1000 + s.teacher_flops_shrink
        assert plan.flops_shrink == pytest.approx(sum(st.flops_shrink + st.teacher_flops_shrink for st in plan.stages))
        assert plan.to_dict()["totals"]["flops_shrink"] == plan.flops_shrink
    ce = make_plan(FamilyConfig.from_dict(spec(shrink={"recover": "ce"})))
    assert all(st.teacher_flops_shrink == 0 for st in ce.stages)
    grow = make_plan(FamilyConfig.from_dict(spec(direction="grow", shrink=None)))
    assert "tokens_shrink" not in grow.to_dict()["stages"][0] and grow.flops_shrink is None


def test_a_shrink_family_builds_downward_and_a_rerun_skips_it(dataset, tmp_path, capsys):
    (tmp_path / "down.yaml").write_text(yaml.safe_dump(spec()))
    assert main(["family", "run", str(tmp_path / "down.yaml"), "--data", str(dataset), "--out",
                 str(tmp_path / "fam")]) == 0
    ledger = json.loads((tmp_path / "fam" / "family.json").read_text())
    assert set(ledger["modes"]) == {"shrink"}
    s, m, l = ledger["modes"]["shrink"]
    plan = make_plan(FamilyConfig.from_dict(spec()))
    assert (l["tokens"], l["flops"], l["cum_flops"]) == (8064, 6 * plan.stages[2].params * 8064, l["flops"])
    for entry, teacher, stage in ((m, l, plan.stages[1]), (s, m, plan.stages[0])):
        assert entry["shrink"]["from"] == teacher["name"] and entry["distill"]["flops"] > 0
        # the recovery's own distill settings (kd: forward KL, weight 1), not a copy written by hand
        assert (entry["distill"]["kind"], entry["distill"]["weight"], entry["distill"]["temperature"]) == \
            ("forward", 1.0, 1.0)
        assert entry["cum_flops"] == pytest.approx(teacher["cum_flops"] + entry["flops"] + entry["distill"]["flops"])
        assert entry["flops"] == 6 * stage.params * entry["tokens"]
        model = load_pretrained(tmp_path / "fam" / "shrink" / entry["name"])
        assert model.cfg.d_model == stage_shape(stage.name)["d_model"]
        run = tmp_path / "fam" / "runs" / "shrink" / entry["name"]
        assert (run / "shrink.json").is_file() and (run / "importance.json").is_file()
        # pruned from its source's last checkpoint: the AdamW moments were pruned too and start the recovery
        assert "checkpoints" in json.loads((run / "shrink.json").read_text())["settings"]["source"]
        assert (run / "pruned" / "optimizer.pt").is_file()
    out = capsys.readouterr().out
    assert "pruning l -> m" in out and "pruning m -> s" in out
    assert main(["family", "run", str(tmp_path / "down.yaml"), "--data", str(dataset), "--out",
                 str(tmp_path / "fam")]) == 0
    out = capsys.readouterr().out
    assert "pruning" not in out and "[shrink] s: done" in out
    # the commands that read a family follow its direction
    assert main(["consistency", str(tmp_path / "fam"), "--windows", "4"]) == 0
    table = capsys.readouterr().out
    assert "shrink" in table and "s -> m" in table and "m -> l" in table
    assert main(["report", str(tmp_path / "fam"), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "REPORT.md").read_text()
    assert "## Pruning steps" in report and "| l -> m | importance / contiguous |" in report
    assert f"family FLOPs (6ND): shrink {sci(s['flops'] + m['flops'] + l['flops'] + s['distill']['flops'] + m['distill']['flops'])}" in report


def stage_shape(name):
    return next(s for s in SHAPES if s["name"] == name)


@pytest.mark.parametrize("changes, message", [
    (dict(direction="sideways"), "direction must be grow or shrink"),
    (dict(direction="grow"), "a shrink: section is for direction: shrink"),
    (dict(shrink={"from": "above"}), "shrink.from must be previous or largest"),
    (dict(shrink={"recover": "none"}), "shrink.recover must be kd or ce"),
    (dict(shrink={"tokens": 0}), "shrink.tokens"),
    (dict(shrink={"speed": 1}), "speed"),
    (dict(distill={"inherit": {}}), "distill.inherit teaches grown members"),
])
def test_bad_shrink_sections_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        FamilyConfig.from_dict(spec(**changes))


def test_modes_follow_the_direction_and_shapes_are_checked_before_any_work(dataset, tmp_path):
    family = FamilyConfig.from_dict(spec())
    with pytest.raises(ConfigError, match="unknown mode 'progressive' .*direction: shrink"):
        run_family(family, tmp_path / "a", data=str(dataset), modes="progressive")
    grow = FamilyConfig.from_dict(spec(direction="grow", shrink=None))
    with pytest.raises(ConfigError, match="unknown mode 'shrink'"):
        run_family(grow, tmp_path / "b", data=str(dataset), modes="shrink")
    bad = [dict(SHAPES[0], vocab_size=300, max_seq_len=32), dict(SHAPES[1], n_kv_heads=1, vocab_size=300,
                                                                  max_seq_len=32), SHAPES[2] | dict(vocab_size=300,
                                                                                                     max_seq_len=32)]
    with pytest.raises(ConfigError, match="shrink m -> s: pruning keeps whole GQA groups"):
        run_family(FamilyConfig.from_dict(spec(members=bad)), tmp_path / "c", data=str(dataset))
    assert not any((tmp_path / d).exists() for d in "abc")


def test_a_released_qwen2_model_is_the_largest_and_its_family_is_pruned_from_it(dataset, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from growfam.model import copy_tokenizer_files

    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=96, intermediate_size=96, num_hidden_layers=3,
                                 num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=32,
                                 tie_word_embeddings=True, use_sliding_window=False)).save_pretrained(tmp_path / "rel")
    copy_tokenizer_files(dataset / "tokenizer", tmp_path / "rel")
    members = [dict(s, vocab_size=300, max_seq_len=32) for s in SHAPES[:2]] + [str(tmp_path / "rel")]
    family = FamilyConfig.from_dict(spec(members=members, start_from=str(tmp_path / "rel")))
    assert [m.model_type for m in family.members] == ["qwen2"] * 3 and family.members[0].qkv_bias
    plan = make_plan(family)
    largest = plan.stages[-1]
    assert (largest.tokens_shrink, largest.given_tokens) == (0, 8000)
    assert largest.cum_flops_shrink == largest.given_flops and plan.stages[1].tokens_shrink == 2000
    ledger = run_family(family, tmp_path / "fam", data=str(dataset), modes="both", log=lambda s: None)
    given = load_pretrained(tmp_path / "rel")
    for mode in ("shrink", "independent"):
        published = load_pretrained(tmp_path / "fam" / mode / "rel")
        assert all(torch.equal(a, b) for a, b in zip(published.state_dict().values(), given.state_dict().values()))
    entry = ledger.member("shrink", "rel")
    assert (entry.tokens, entry.flops, entry.cum_flops, entry.given["tokens"]) == (0, 0, largest.given_flops, 8000)
    m = ledger.member("shrink", "m")
    assert m.shrink["source"] == str(tmp_path / "fam" / "shrink" / "rel")  # no run, no moments: the member itself
    assert m.cum_flops == pytest.approx(largest.given_flops + m.flops + m.distill["flops"])
    for mode in ("shrink", "independent"):
        for name in ("s", "m"):
            theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "fam" / mode / name)
            assert type(theirs) is Qwen2ForCausalLM
