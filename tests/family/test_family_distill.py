"""A family's `distill:` section: `inherit` (each grown member learns from the member it grew from,
early in its run; planned, counted, refused when it changes) and the `retro` and `draft` variants."""

import json
import shutil

import pytest

from growfam.config import FamilyConfig
from growfam.errors import ConfigError
from growfam.family import make_plan, run_family
from growfam.family.ledger import read_ledger
from growfam.model import num_params
from growfam.report.tables import format_plan
from growfam.train.metrics import read_metrics

from family.test_family import dataset, spec  # noqa: F401  (dataset: the module fixture)

INHERIT = {"inherit": {"weight": 0.5, "until": 0.5, "ramp": 0.25, "temperature": 2.0}}


def family(**changes) -> FamilyConfig:
    return spec(**{"growth": {"width": "lossless", "depth": "identity"}, "distill": INHERIT, **changes})


@pytest.fixture(scope="module")
def inherited(tmp_path_factory, dataset):
    """The pair family grown losslessly with INHERIT, both modes (copied by each test that writes)."""
    out = tmp_path_factory.mktemp("inherit") / "fam"
    run_family(family(), out, data=dataset, log=lambda s: None)
    return out


def test_a_grown_member_learns_from_the_one_it_grew_from(tmp_path, dataset, inherited):
    shutil.copytree(inherited, tmp_path, dirs_exist_ok=True)
    ledger = read_ledger(tmp_path)
    small, large = ledger.members("progressive")
    assert small.distill is None  # nothing to inherit from
    record = large.distill
    assert record["teacher"] == str(inherited / "progressive" / "small")  # as built, before the copy
    assert (record["weight"], record["until"], record["temperature"]) == (0.5, 0.5, 2.0)
    # the teacher ran while α > 0: the first 75% of the steps (until 0.5 + ramp 0.25)
    steps = large.steps
    taught = sum(1 for s in range(steps) if s < 0.5 * steps + 0.25 * steps)
    tokens_per_step = large.tokens // steps
    assert record["flops"] == 2 * num_params(family().members[0], "nonembedding") * taught * tokens_per_step
    assert large.cum_flops == small.cum_flops + large.flops + record["flops"]
    plan = make_plan(family())
    assert large.cum_flops == pytest.approx(plan.stages[1].cum_flops_progressive, rel=0.02)
    assert plan.stages[1].teacher_flops_progressive == pytest.approx(record["flops"], rel=0.02)
    # a function-preserving growth starts at its teacher's distribution
    lines = read_metrics(tmp_path / "runs" / "progressive" / "large" / "metrics.jsonl", "train")
    assert lines[0]["kl"] < 1e-4 and lines[0]["alpha"] == 0.5
    assert lines[-1]["kl"] is None and lines[-1]["alpha"] == 0  # after the ramp: plain steps
    assert all(m.distill is None for m in ledger.members("independent"))  # the baseline trains as before
    assert json.loads((tmp_path / "family.json").read_text())["distill"] == {"inherit": {**INHERIT["inherit"]}}

    # the same family again: done; with another inherit section: refused before any work
    again = run_family(family(), tmp_path, data=dataset, log=lambda s: None)
    assert again.members("progressive")[1].cum_flops == large.cum_flops
    changed = spec(growth={"width": "lossless", "depth": "identity"}, distill={"inherit": {"weight": 0.9}})
    with pytest.raises(ConfigError, match="made with a different distill"):
        run_family(changed, tmp_path, data=dataset, log=lambda s: None)
    with pytest.raises(ConfigError, match="made with a different distill"):
        run_family(spec(growth={"width": "lossless", "depth": "identity"}), tmp_path, data=dataset, log=lambda s: None)


def test_the_plan_counts_the_teachers_and_the_yaml_round_trips():
    plan = make_plan(family())
    small, large = plan.stages
    assert small.teacher_flops_progressive == 0
    share = 0.75  # until 0.5 + ramp 0.25 of the stage's steps
    assert large.teacher_flops_progressive == pytest.approx(2 * small.params * large.tokens_progressive * share,
                                                            rel=0.05)
    plain = make_plan(spec(growth={"width": "lossless", "depth": "identity"}))
    assert plan.flops_progressive == plain.flops_progressive and plan.teacher_flops == large.teacher_flops_progressive
    assert plan.saving == pytest.approx(plain.saving - large.teacher_flops_progressive / plain.flops_independent)
    assert "teacher_flops_progressive" not in plain.to_dict()["totals"]  # plans without a teacher unchanged
    assert "teachers' forward passes cost" in format_plan(plan, 989, 0.4)
    assert FamilyConfig.from_dict(family().to_dict()).to_dict() == family().to_dict()


@pytest.mark.parametrize("section, message", [
    ({"inherit": {"weight": 1.5}}, r"distill.inherit.weight must be in \[0, 1\], got 1.5"),
    ({"inherit": {"until": 0}}, "distill.inherit.until must be positive"),
    ({"inherit": {"teacher": "x"}}, "distill.inherit takes no teacher"),
    ({"inherit": {"wieght": 0.5}}, "unknown key 'wieght' in distill.inherit"),
    ({"retro": {}}, "distill.retro needs `tokens`"),
    ({"draft": {"tokens": 0.1, "lr": 0}}, "distill.draft.lr must be positive"),
    ({"retro": {"tokens": 0.1, "teacher": "x"}}, "distill.retro takes no teacher"),
    ({"later": {}}, "unknown key 'later' in distill"),
])
def test_a_bad_inherit_section_is_one_line(section, message):
    with pytest.raises(ConfigError, match=message):
        spec(distill=section)


def test_inherit_and_a_train_teacher_together_are_refused(tmp_path, dataset):
    both = spec(distill=INHERIT, train={"distill": {"teacher": str(tmp_path)}})
    with pytest.raises(ConfigError, match="train.distill and distill.inherit both give a grown member a teacher"):
        run_family(both, tmp_path / "out", data=dataset, log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_retro_and_draft_variants_learn_from_their_teachers_in_both_modes(tmp_path, dataset):
    from growfam.eval.consistency import divergence
    from growfam.data import TokenDataset
    from growfam.model import load_pretrained

    retro = {"retro": {"tokens": 0.5, "lr": 0.5}}
    ledger = run_family(spec(distill=retro), tmp_path, data=dataset, log=lambda s: None)
    val = TokenDataset.open(dataset).tokens("val")
    for mode in ("progressive", "independent"):
        (entry,) = ledger.variants[mode]
        small, large = ledger.members(mode)
        assert (entry.name, entry.extra["of"], entry.extra["kind"], entry.extra["teacher_member"]) == \
            ("small+retro", "small", "retro", "large")
        assert entry.distill["teacher"] == str(tmp_path / mode / "large") and entry.distill["weight"] == 1.0
        assert entry.distill["flops"] == 2 * large.nonembedding_params * entry.tokens
        assert entry.cum_flops == small.cum_flops + entry.flops + entry.distill["flops"]
        assert entry.planned_tokens == round(0.5 * 6000) and entry.max_lr == pytest.approx(0.5 * small.max_lr)
        teacher = load_pretrained(tmp_path / mode / "large")
        before = divergence(load_pretrained(tmp_path / mode / "small"), teacher, val, 32, windows=16)
        after = divergence(load_pretrained(tmp_path / mode / "small+retro"), teacher, val, 32, windows=16)
        assert after.kl_large_small < before.kl_large_small  # KL(teacher ‖ student) fell
        assert after.acceptance > before.acceptance
    assert "variants" in json.loads((tmp_path / "family.json").read_text())

    # adding draft builds only it; retro is skipped as done; the members are untouched
    both = spec(distill={**retro, "draft": {"tokens": 0.25}})
    again = run_family(both, tmp_path, data=dataset, log=lambda s: None)
    assert [e.name for e in again.variants["progressive"]] == ["small+retro", "small+draft"]
    assert again.variants["progressive"][0].cum_flops == ledger.variants["progressive"][0].cum_flops
    assert (tmp_path / "independent" / "small+draft" / "model.safetensors").is_file()
    # other retro settings: refused before any work, naming what to remove
    with pytest.raises(ConfigError, match=r"progressive/small\+retro was built with other distill.retro settings"):
        run_family(spec(distill={"retro": {"tokens": 0.25}}), tmp_path, data=dataset, log=lambda s: None)


def test_the_report_shows_inherit_and_the_variants(tmp_path, dataset, inherited):
    from growfam.cli import main
    from growfam.eval.run import family_consistency
    from growfam.family.members import resolve_target
    from growfam.report.run import write_report

    shutil.copytree(inherited, tmp_path / "fam")
    run_family(family(distill={**INHERIT, "draft": {"tokens": 0.25}}), tmp_path / "fam", data=dataset,
               log=lambda s: None)  # the members are done: only the draft variants train
    report = write_report([tmp_path / "fam"], tmp_path / "report").path.read_text()
    section = report[report.index("Distillation"):]
    assert "Grown members learned from the member they grew from" in section
    assert "| progressive | small+draft | large |" in section and "| independent | small+draft | large |" in section
    assert "Not measured yet: run `growfam consistency" in section and "run `growfam speculate" in section

    # growfam consistency measures each variant and its member against the teacher; the report shows it
    assert main(["consistency", str(tmp_path / "fam"), "--windows", "8"]) == 0
    measured = read_ledger(tmp_path / "fam").consistency.extra["variants"]
    (row,) = measured["progressive"]
    assert (row["variant"], row["of"], row["teacher"]) == ("small+draft", "small", "large")
    assert row["after"]["kl_large_small"] < row["before"]["kl_large_small"]
    # growfam speculate decodes with each draft variant and its member against the variant's teacher
    assert main(["speculate", str(tmp_path / "fam"), "--prompts", "2", "--prompt-tokens", "8",
                 "--max-new-tokens", "8", "--temperature", "0", "1"]) == 0
    decoded = read_ledger(tmp_path / "fam").speculative.extra["variants"]
    assert {(r["draft_mode"], r["draft"], r["target"], r["temperature"]) for r in decoded} == {
        (mode, draft, "large", t) for mode in ("progressive", "independent") for draft in ("small", "small+draft")
        for t in (0, 1)}
    after = next(r for r in decoded if (r["draft_mode"], r["draft"], r["temperature"]) == ("progressive", "small+draft", 1))
    report = write_report([tmp_path / "fam"], tmp_path / "report", force=True).path.read_text()
    line = next(x for x in report.splitlines() if x.startswith("| progressive | small+draft |"))
    assert f"{row['after']['kl_large_small']:.4f}" in line and f"{row['before']['acceptance']:.4f}" in line
    assert f"→ {after['alpha']:.3f}" in line and "Not measured yet" not in report
    # a variant's directory gone: one line, before any model is loaded; the recorded section stays
    shutil.rmtree(tmp_path / "fam" / "independent" / "small+draft")
    with pytest.raises(ConfigError, match=r"small\+draft: not a directory"):
        family_consistency(resolve_target(tmp_path / "fam"))
    assert read_ledger(tmp_path / "fam").consistency.extra["variants"] == measured
    # a hand-edited ledger whose variant lost its teacher: one line, nothing measured
    ledger_path = tmp_path / "fam" / "family.json"
    data = json.loads(ledger_path.read_text())
    del data["variants"]["progressive"][0]["teacher_member"]
    ledger_path.write_text(json.dumps(data))
    assert main(["speculate", str(tmp_path / "fam")]) == 2
    assert json.loads(ledger_path.read_text()) == data
