"""The family YAML's eval: section, `growfam family run --eval` and `growfam demo`'s evaluation,
and a rerun of run_family keeping what `growfam eval` / `consistency` recorded."""

import inspect
import json

import pytest

import growfam.config
import growfam.cli.posttrain
import growfam.eval.harness
from growfam.cli import main
from growfam.config import EvalConfig, load_family_config
from growfam.errors import ConfigError, GrowfamError
from growfam.eval import PAPER_TASKS
from growfam.eval.run import FamilyEval, family_consistency, resolved
from growfam.family import read_ledger, run_family, write_ledger
from growfam.family.ledger import ConsistencySection, EvalRecord
from family.test_family import TEXT, dataset, spec  # noqa: F401  (dataset: the module fixture)

QUIET = {"log": lambda s: None}
TOKENS = {"explicit": [1000, 2000]}
SECTION = {"tasks": "none", "ppl": ["val"], "windows": 2, "batch_size": 4}


def test_the_eval_section_is_read_checked_and_written_back():
    family = spec(eval={"tasks": ["piqa", "arc_easy"], "limit": "1e2", "windows": 8, "pairs": "all"})
    assert family.eval == EvalConfig(tasks=["piqa", "arc_easy"], limit=100, windows=8, pairs="all")
    assert type(family).from_dict(family.to_dict()).eval == family.eval
    assert spec().eval == EvalConfig()  # no section: the commands' defaults
    tiny = load_family_config("tiny").eval
    assert tiny.tasks == "paper" and tiny.limit == 50  # the demo scores a few examples of each task
    for bad, message in (({"limits": 5}, "limits"), ({"limit": 0}, "eval.limit"), ({"pairs": "some"}, "eval.pairs"),
                         ({"tasks": [1]}, "eval.tasks"), ({"windows": 1.5}, "eval.windows")):
        with pytest.raises(ConfigError, match=message):
            spec(eval=bad)


def test_the_section_keeps_eval_options_defaults_and_checks_task_names(tmp_path, monkeypatch):
    monkeypatch.setattr("growfam.eval.run.check_harness", lambda: None)  # wiki's lm_eval need not be here
    opts = FamilyEval(EvalConfig(tasks="none"), tmp_path).opts
    assert opts.ppl == ["val", "wiki"] and opts.tasks == []
    assert (opts.batch_size, opts.ppl_tokens, opts.limit) == (8, 1_000_000, None)
    # one class holds the section and the commands' options: consistency's defaults are its own
    given = inspect.signature(family_consistency).parameters
    assert {k: given[k].default for k in ("pairs", "windows", "batch_size", "device")} == \
        {"pairs": "adjacent", "windows": 64, "batch_size": 8, "device": "auto"}
    # resolving expands "paper", drops "none" and repeats, and is idempotent
    paper = resolved(EvalConfig(tasks="paper", ppl=["val", "none", "val", "notes.txt"]))
    assert paper.tasks == list(PAPER_TASKS) and paper.ppl == ["val", "notes.txt"] and resolved(paper) == paper
    with pytest.raises(GrowfamError, match="unknown task 'piqaa'"):
        FamilyEval(EvalConfig(tasks=["piqa", "piqaa"]), tmp_path)


def test_without_lm_eval_the_demo_drops_the_tasks_and_family_run_refuses(tmp_path, monkeypatch):
    def missing():
        raise GrowfamError("zero-shot evaluation needs lm-evaluation-harness: pip install ...")

    monkeypatch.setattr(growfam.eval.harness, "lm_eval_version", missing)
    demo = FamilyEval(EvalConfig(tasks="paper"), tmp_path, optional_harness=True).opts
    assert demo.tasks == [] and demo.ppl == ["val"]
    with pytest.raises(GrowfamError, match="lm-evaluation-harness"):
        FamilyEval(EvalConfig(tasks="paper"), tmp_path)
    with pytest.raises(GrowfamError, match="lm-evaluation-harness"):
        FamilyEval(EvalConfig(tasks="none", ppl="wiki"), tmp_path)  # wiki runs through lm_eval too


def test_a_rerun_keeps_eval_records_and_consistency_but_not_a_retrained_members(tmp_path, dataset):
    family = spec(tokens=TOKENS)
    run_family(family, tmp_path, data=dataset, modes="progressive", **QUIET)
    ledger = read_ledger(tmp_path)
    for entry in ledger.members("progressive"):
        entry.eval = EvalRecord(perplexity={"val": {"perplexity": 9.0}})
    pair = {"small": "small", "large": "large", "kl_small_large": 0.5, "kl_large_small": 0.6, "tv": 0.2,
            "acceptance": 0.8}
    ledger.consistency = ConsistencySection(modes={"progressive": [pair]}, windows=2)
    write_ledger(tmp_path, ledger)
    assert run_family(family, tmp_path, data=dataset, modes="progressive", **QUIET) == ledger
    assert read_ledger(tmp_path) == ledger
    ledger.member("progressive", "large").done = False  # as if killed: `large` is trained again
    write_ledger(tmp_path, ledger)
    again = run_family(family, tmp_path, data=dataset, modes="progressive", **QUIET)
    small, large = again.members("progressive")
    assert small.eval == ledger.member("progressive", "small").eval and large.eval is None and large.done
    assert again.consistency.modes["progressive"] == [] and again.consistency.windows == 2
    assert read_ledger(tmp_path) == again


def _yaml(tmp_path, **changes) -> str:
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for i, text in enumerate(TEXT[:200]):
        (corpus / f"doc{i}.txt").write_text(text)
    data = spec().to_dict()
    data.update({"tokens": TOKENS, "eval": SECTION,
                 "data": {"source": str(corpus), "tokenizer": "train:300", "val_fraction": 0.05}, **changes})
    path = tmp_path / "fam.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    return str(path)


def test_family_run_eval_records_each_member_then_consistency_and_prints_the_tables(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(["family", "run", _yaml(tmp_path), "--mode", "both", "--out", str(out), "--eval"]) == 0
    printed = capsys.readouterr().out
    assert "val ppl" in printed and "KL(small‖large)" in printed
    ledger = read_ledger(out)
    for mode in ("progressive", "independent"):
        for entry in ledger.members(mode):
            assert entry.eval.perplexity["val"]["perplexity"] > 1
        assert [(r["small"], r["large"]) for r in ledger.consistency.modes[mode]] == [("small", "large")]
    assert ledger.consistency.windows == 2
    # a repeated run evaluates nothing again: every member has what the section asks for
    monkeypatch.setattr("growfam.eval.run.evaluate_target", lambda *a: pytest.fail("evaluated twice"))
    monkeypatch.setattr("growfam.eval.run.family_consistency", lambda *a, **k: pytest.fail("measured twice"))
    assert main(["family", "run", _yaml(tmp_path), "--mode", "both", "--out", str(out), "--eval"]) == 0
    assert "val ppl" in capsys.readouterr().out and read_ledger(out) == ledger


def test_family_run_eval_refuses_an_unknown_task_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    path = _yaml(tmp_path, eval={"tasks": ["piqa", "nope"]})
    assert main(["family", "run", path, "--out", str(out), "--eval"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown task 'nope'" in err and len(err.splitlines()) == 1 and not out.exists()
    assert main(["family", "run", path, "--out", str(out), "--eval", "--mode", "independent"]) == 2
    assert not out.exists()


def test_demo_evaluates_its_members_and_prints_the_tables(tmp_path, capsys, monkeypatch):
    family = load_family_config(_yaml(tmp_path))
    monkeypatch.setattr(growfam.config, "load_family_config", lambda name: family if name == "tiny" else None)
    posttrained = []  # post-training has tests of its own (tests/posttrain); here only that the demo calls it
    monkeypatch.setattr(growfam.cli.posttrain, "demo_posttrain", posttrained.append)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    assert posttrained == [str(out)]
    printed = capsys.readouterr().out
    assert printed.count("val ppl") == 2 and "KL(small‖large)" in printed  # a block per member
    assert set(read_ledger(out).consistency.modes) == {"progressive", "independent"}
    # it ends with the report in OUT/report, its path and the headline numbers
    assert f"report: {out / 'report' / 'REPORT.md'}" in printed and "FLOPs to equal loss" in printed
    report = (out / "report" / "REPORT.md").read_text()
    assert "| val ppl |" in report and "| small -> large |" in report and "growfam consistency" not in report
    assert main(["demo", "--out", str(out)]) == 0  # a rerun replaces its own report
