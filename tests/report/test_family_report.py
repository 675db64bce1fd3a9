"""`growfam report`: REPORT.md and its figures from a family directory (or several), the
FLOPs-to-equal-loss numbers against hand computations, the "how to produce it" lines of
missing sections, Table 5 from a speculative section, and bad input."""

import json
import shutil

import pytest
from matplotlib.image import imread

from conftest import checksums
from growfam.cli import main
from growfam.family import run_family
from growfam.report.curves import run_points
from growfam.report.equal_flops import first_crossing
from growfam.text import sci
from growfam.report.markdown import headline
from growfam.report.run import write_report
from growfam.report.source import load_family
from family.test_family import TEXT, dataset, spec  # noqa: F401  (dataset: the module fixture)


@pytest.fixture(scope="module")
def family(tmp_path_factory, dataset):  # noqa: F811
    """A two-member family built both ways (a few seconds), never evaluated."""
    out = tmp_path_factory.mktemp("family") / "pair"
    run_family(spec(tokens={"explicit": [600, 1200]}), out, data=dataset, modes=("progressive", "independent"),
               log=lambda s: None)
    return out


def _evals(path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in records if r["event"] == "eval"]


def _hand_equal_loss(family_dir) -> tuple[float, float | None, float]:
    """(target loss, progressive FLOPs where it is first reached or None, independent family
    FLOPs), straight from family.json and the metrics files."""
    ledger = json.loads((family_dir / "family.json").read_text())
    (small_p, large_p), (small_i, large_i) = ledger["modes"]["progressive"], ledger["modes"]["independent"]
    target = _evals(family_dir / "runs/independent/large/metrics.jsonl")[-1][1]
    per_token = 6 * large_p["nonembedding_params"]  # the family counts non-embedding parameters
    per_step = 4 * 32  # batch_size × seq_len of spec()
    start = small_p["cum_flops"]
    points = [(start, small_p["val_loss"] + large_p["growth"]["probe"]["dloss"])]
    points += [(start + per_token * per_step * step, loss)
               for step, loss in _evals(family_dir / "runs/progressive/large/metrics.jsonl")]
    reached = None
    for (x0, y0), (x1, y1) in zip([points[0]] + points, points):
        if y1 <= target:
            reached = x1 if (x0, y0) == (x1, y1) else x0 + (y0 - target) / (y0 - y1) * (x1 - x0)
            break
    return target, reached, small_i["flops"] + large_i["flops"]


def test_a_report_of_a_family_without_evaluation_writes_and_says_how_to_fill_it(family, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(family), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'REPORT.md'}" in printed and "large FLOPs to equal loss" in printed
    for name in ("figure2.png", "training-curves.png", "equal-flops.png"):
        height, width, _ = imread(out / name).shape  # a real PNG
        assert height > 300 and width > 400
    text = (out / "REPORT.md").read_text()
    assert text.startswith("# growfam report: pair")
    for line in (f"run `growfam eval {family}`", f"run `growfam consistency {family}`",
                 f"run `growfam speculate {family}`"):
        assert line in text
    assert "![Figure 2](figure2.png)" in text and "| small -> large | aki / stack |" in text
    assert "| small | " in text and "Planned saving:" in text


def test_flops_to_equal_loss_matches_a_hand_computation_from_the_metrics(family):
    small, large = load_family(family).equal_loss()
    target, reached, independent = _hand_equal_loss(family)
    assert (large.member, large.target_loss, large.independent_flops) == ("large", target, independent)
    if reached is None:
        ledger = json.loads((family / "family.json").read_text())
        assert large.progressive_flops is None
        assert large.gap == pytest.approx(ledger["modes"]["progressive"][1]["val_loss"] - target)
    else:
        assert large.progressive_flops == pytest.approx(reached, rel=1e-12)
    # stage 1 is one run in both modes: reached at its last evaluation, no saving
    assert small.progressive_flops == small.independent_flops and small.saving == 0


def _member(name, params, tokens, steps, cum_flops, val_loss, growth=None):
    return {"name": name, "done": True, "params": params, "tokens": tokens, "steps": steps,
            "flops": 6 * params * tokens, "cum_flops": cum_flops, "wall_s": 1.0, "val_loss": val_loss,
            "growth": growth}


def _metrics(path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"time": 0, **r}) + "\n" for r in records))


def _eval(step, loss):
    return {"event": "eval", "step": step, "val_loss": loss}


def hand_family(root, **ledger_changes):
    """small (N = 1000, 10 steps of 100 tokens) and large (N = 4000): independent large ends at
    4.5; progressive large starts at 5.0 + 0.2 (growth) and passes 4.5 three quarters of the way
    from step 5 (4.8) to step 10 (4.4), i.e. after 875 tokens: 6e6 + 24000·875 = 2.7e7 FLOPs,
    half the independent family's 6e6 + 4.8e7."""
    growth = {"source": {"name": "small"}, "target": {"name": "large"}, "width": "aki", "depth": "stack",
              "probe": {"loss_source": 5.1, "loss_grown": 5.3, "dloss": 0.2, "max_abs_dlogits": 0.5}}
    ledger = {"plan": {"name": "hand"}, "data_fingerprint": "x", "growth": {"width": "aki", "depth": "stack"},
              "fixed_data": False, "data": str(root / "data"),
              "modes": {"progressive": [_member("small", 1000, 1000, 10, 6e6, 5.0),
                                        _member("large", 4000, 1500, 15, 4.2e7, 4.3, growth)],
                        "independent": [_member("small", 1000, 1000, 10, 6e6, 5.0),
                                        _member("large", 4000, 2000, 20, 4.8e7, 4.5)]},
              **ledger_changes}
    root.mkdir(parents=True, exist_ok=True)
    (root / "family.json").write_text(json.dumps(ledger))
    small = [{"event": "train", "step": 5, "loss": 6.1}, _eval(5, 6.0), _eval(10, 5.0)]
    for mode in ("progressive", "independent"):
        _metrics(root / "runs" / mode / "small" / "metrics.jsonl", small)
    _metrics(root / "runs/independent/large/metrics.jsonl", [_eval(10, 5.0), _eval(20, 4.5)])
    _metrics(root / "runs/progressive/large/metrics.jsonl", [_eval(5, 4.8), _eval(10, 4.4), _eval(15, 4.3)])
    return root


def test_flops_to_equal_loss_interpolates_between_evaluations(tmp_path):
    small, large = load_family(hand_family(tmp_path / "hand")).equal_loss()
    assert large.progressive_flops == pytest.approx(2.7e7) and large.independent_flops == pytest.approx(5.4e7)
    assert large.saving == pytest.approx(0.5) and large.saving_at_end == pytest.approx(1 - 4.2e7 / 5.4e7)
    assert small.saving == 0
    out = write_report([tmp_path / "hand"], tmp_path / "report")
    text = out.path.read_text()
    assert f"| large | 4.5000 | {sci(5.4e7)} | {sci(2.7e7)} | 50.0% | 22.2% |" in text
    assert "50.0% fewer than the independent family's" in "\n".join(out.headlines[0][1])


def test_averaged_members_are_compared_by_their_published_models(tmp_path):
    """Members published as a mean of checkpoints (train `average:`): the target is the
    independent mean's loss, the progressive curve ends at its own mean, and the next stage's
    growth point is the last state's loss + Δloss (it grows from that state, not the mean)."""
    root = hand_family(tmp_path / "hand")
    ledger = json.loads((root / "family.json").read_text())
    ledger["modes"]["progressive"][0]["val_loss"] = 4.9  # small's mean; its last evaluation is 5.0
    ledger["modes"]["independent"][1]["val_loss"] = 4.35  # large's mean; its last evaluation is 4.5
    ledger["modes"]["progressive"][1]["val_loss"] = 4.25  # after the last evaluation, 4.3
    (root / "family.json").write_text(json.dumps(ledger))
    source = load_family(root)
    prog = source.curves["progressive"]
    assert prog[1].start == (6e6, pytest.approx(5.2))  # 5.0 + 0.2, not the mean's 4.9 + 0.2
    assert prog[0].final_loss == 4.9 and prog[0].val_by_flops()[-1] == (6e6, 4.9)
    _, large = source.equal_loss()
    # 4.35 is halfway from step 10 (4.4) to step 15 (4.3): 1250 tokens, 6e6 + 24000·1250 FLOPs
    assert large.target_loss == 4.35 and large.progressive_flops == pytest.approx(3.6e7)
    ledger["modes"]["independent"][1]["val_loss"] = 4.2  # below the progressive mean: not reached
    (root / "family.json").write_text(json.dumps(ledger))
    _, large = load_family(root).equal_loss()
    assert large.progressive_flops is None and large.gap == pytest.approx(0.05)


def test_a_family_built_downward_counts_the_independent_cost_from_the_largest_down(tmp_path):
    """Built downward, the largest trains first (the same run in both modes): the independent
    family's cost of having a member is Σ over it and the members above it, so the largest saves
    nothing, and the headline compares the member built last (the smallest)."""
    root = tmp_path / "down"
    hand_family(root)
    ledger = json.loads((root / "family.json").read_text())
    large = dict(ledger["modes"]["independent"][1])
    # small: pruned from large, recovered over 5 steps of 100 tokens with large as teacher
    small = _member("small", 1000, 500, 5, 4.8e7 + 3e6 + 4e6, 4.75)
    small.update(shrink={"from": "large"}, distill={"flops": 4e6})
    ledger["plan"] = {"name": "down", "direction": "shrink"}
    ledger["modes"] = {"shrink": [small, large], "independent": ledger["modes"]["independent"]}
    (root / "family.json").write_text(json.dumps(ledger))
    shutil.copytree(root / "runs/independent/large", root / "runs/shrink/large")
    _metrics(root / "runs/shrink/small/recovery/metrics.jsonl", [_eval(2, 5.2), _eval(4, 4.9), _eval(5, 4.75)])
    source = load_family(root)
    small_r, large_r = source.equal_loss()
    assert large_r.independent_flops == pytest.approx(4.8e7) and large_r.saving == pytest.approx(0)
    # independent small's 5.0 is reached two thirds of the way from step 2 (5.2) to step 4 (4.9):
    # 4.8e7 + (2 + 4/3)·100 tokens · 14000 FLOPs per token, against 4.8e7 + 6e6
    assert small_r.independent_flops == pytest.approx(5.4e7)
    assert small_r.progressive_flops == pytest.approx(4.8e7 + 1000 / 3 * 14000)
    lines = headline(source)
    assert lines[1] == "small val loss: shrink 4.7500, independent 5.0000 (Δ -0.2500)"
    assert lines[2].startswith("small FLOPs to equal loss")


def test_first_crossing():
    points = [(0.0, 5.0), (10.0, 4.0), (20.0, 3.0)]
    assert first_crossing(points, 4.5) == 5.0  # halfway down the first segment
    assert first_crossing(points, 5.5) == 0.0  # at the first point
    assert first_crossing(points, 3.0) == 20.0
    assert first_crossing(points, 2.9) is None
    assert first_crossing([(0.0, 4.0), (10.0, 5.0), (20.0, 3.0)], 4.0) == 0.0  # the first time, not the last


def test_a_resumed_run_keeps_the_records_logged_after_it_went_back(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _metrics(path, [_eval(4, 5.0), {"event": "train", "step": 6, "loss": 9.0}, _eval(6, 9.9), _eval(8, 9.8),
                    {"event": "resume", "step": 4}, {"event": "train", "step": 5, "loss": 4.9},
                    _eval(5, 4.8), {"event": "eval", "step": 7, "val_loss": None}, _eval(8, 4.5)])
    train, val = run_points(path, tokens_per_step=10)
    assert train == [(50, 4.9)]
    assert val == [(40, 5.0), (50, 4.8), (80, 4.5)]  # 6's and the first 8's records were replaced; NaN left out


def test_missing_metrics_and_a_missing_mode_say_how_to_produce_them(tmp_path):
    root = hand_family(tmp_path / "hand")
    (root / "runs/progressive/large/metrics.jsonl").unlink()
    text = write_report([root], tmp_path / "r1").path.read_text()
    assert "Not drawn: progressive/large: no runs/progressive/large/metrics.jsonl." in text
    ledger = json.loads((root / "family.json").read_text())
    ledger["modes"].pop("independent")
    (root / "family.json").write_text(json.dumps(ledger))
    report = write_report([root], tmp_path / "r2")
    text = report.path.read_text()
    assert (f"Needs both modes. No independent member built: run `growfam family run hand --mode independent "
            f"--out {root}`") in text
    assert "equal-flops.png" not in report.files and not (tmp_path / "r2" / "equal-flops.png").exists()


SPECULATIVE = {
    "growfam": "0.1.0", "k": 4, "prompts": 8, "prompt_tokens": 32, "max_new_tokens": 64, "pairs": "adjacent",
    "device": "cpu", "dtype": "float32",
    "rows": [{"temperature": t, "draft_mode": dm, "draft": "small", "target_mode": tm, "target": "large",
              "drafted": 100, "accepted": int(100 * a), "acceptance": a, "tokens": 120, "target_calls": 30,
              "tokens_per_target_call": 4.0, "tokens_per_s": 50.0, "target_only_tokens_per_s": 40.0,
              "speedup": s, "expected_acceptance": a}
             for t, dm, tm, a, s in ((0.0, "progressive", "progressive", 0.81, 1.5),
                                     (0.0, "independent", "progressive", 0.62, 1.2),
                                     (0.0, "independent", "independent", 0.7, 1.3),
                                     (1.0, "progressive", "progressive", 0.55, 1.1))],
}


def test_table_5_is_rendered_from_the_speculative_section(tmp_path):
    root = hand_family(tmp_path / "hand", speculative=SPECULATIVE)
    text = write_report([root], tmp_path / "report").path.read_text()
    header = ("| draft -> target | prog→prog accept | prog→prog speed-up | ind→prog accept | ind→prog speed-up | "
              "ind→ind accept | ind→ind speed-up | prog→ind accept | prog→ind speed-up |")
    assert text.count(header) == 2  # a table per temperature
    assert "Temperature 0:" in text and "Temperature 1:" in text
    assert "| small -> large | 0.810 | 1.50× | 0.620 | 1.20× | 0.700 | 1.30× | - | - |" in text
    assert "| small -> large | 0.550 | 1.10× | - | - | - | - | - | - |" in text
    assert "k = 4 drafted tokens per target call; 8 prompts of 32 tokens, 64 new tokens each; cpu, float32" in text
    assert "growfam speculate" not in text


def test_several_families_are_overlaid_and_compared_side_by_side(family, tmp_path, capsys):
    hand = hand_family(tmp_path / "hand")
    out = tmp_path / "both"
    assert main(["report", str(family), str(hand), "--out", str(out)]) == 0
    assert "pair:" in capsys.readouterr().out
    for name in ("figure2.png", "equal-flops.png", "pair-figure2.png", "hand-figure2.png",
                 "hand-training-curves.png", "hand-equal-flops.png"):
        assert imread(out / name).shape[0] > 300
    text = (out / "REPORT.md").read_text()
    assert text.startswith("# growfam report: pair vs hand")
    assert "|  | pair | hand |" in text and "| its FLOPs to equal loss |" in text
    assert "\n## pair\n" in text and "\n### Figure 2: validation loss against cumulative FLOPs\n" in text


def _one_line_error(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_bad_input_is_one_line_and_writes_nothing(family, tmp_path, capsys):
    empty, afile = tmp_path / "empty", tmp_path / "file"
    empty.mkdir()
    afile.write_text("x")
    _one_line_error(capsys, ["report", str(empty)], "not a family directory (no family.json")
    _one_line_error(capsys, ["report", str(afile)], "not a family directory (a file)")
    _one_line_error(capsys, ["report", str(tmp_path / "nope")], "not a family directory (no such directory)")
    _one_line_error(capsys, ["report", str(family), str(family), "--out", str(tmp_path / "o")], "given twice")
    hand = hand_family(tmp_path / "hand")
    _one_line_error(capsys, ["report", str(family), str(hand)], "several families needs --out DIR")
    for out in (family, family / "runs" / "x", family / "progressive", hand.parent):  # even with --force
        _one_line_error(capsys, ["report", str(family), str(hand), "--out", str(out), "--force"],
                        "growfam never writes there")
    assert json.loads((family / "family.json").read_text())["modes"]  # untouched
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    for force in ([], ["--force"]):  # --force replaces only a growfam report
        _one_line_error(capsys, ["report", str(hand), "--out", str(taken), *force],
                        "is a folder growfam did not make; growfam replaces only a growfam report there, even with --force")
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    assert not (hand / "report").exists() and not (tmp_path / "o").exists()


def test_report_force_never_replaces_another_familys_members_runs_or_data(family, tmp_path, capsys):
    """Once, `report FAMILY --out OTHER/progressive --force` deleted the other
    family's members. --force replaces a report only; every other file is as it was."""
    other = tmp_path / "other"
    shutil.copytree(family, other)
    before = checksums(other)
    for out in (other, other / "progressive", other / "progressive" / "large", other / "runs"):
        _one_line_error(capsys, ["report", str(family), "--out", str(out), "--force"],
                        "growfam replaces only a growfam report there, even with --force")
    assert checksums(other) == before
    assert main(["report", str(family), "--out", str(other / "report")]) == 0  # a new folder is fine
    assert main(["report", str(family), "--out", str(other / "report"), "--force"]) == 0  # a report is replaced
    assert {k: v for k, v in checksums(other).items() if not k.startswith("report/")} == before


def test_malformed_inputs_are_one_line_naming_the_file(tmp_path, capsys):
    hand = hand_family(tmp_path / "hand", speculative={"rows": [{"temperature": 0.0}]})
    _one_line_error(capsys, ["report", str(hand)], f"{hand / 'family.json'}: speculative.rows[0].draft must be a string, got None")
    hand = hand_family(tmp_path / "hand2")
    (hand / "runs/independent/large/metrics.jsonl").write_text("{not json\n")
    _one_line_error(capsys, ["report", str(hand)], "runs/independent/large/metrics.jsonl: not a readable metrics file")
    assert not (hand / "report").exists() and not (tmp_path / "hand" / "report").exists()


def test_the_default_out_is_the_family_report_folder(tmp_path, capsys):
    hand = hand_family(tmp_path / "hand")
    assert main(["report", str(hand)]) == 0
    assert (hand / "report" / "REPORT.md").exists()
    _one_line_error(capsys, ["report", str(hand)], "pass --force")  # a second report needs --force


def test_the_demo_refuses_a_report_folder_it_did_not_write_before_any_work(tmp_path, capsys):
    (tmp_path / "demo" / "report").mkdir(parents=True)
    (tmp_path / "demo" / "report" / "notes.txt").write_text("mine")
    _one_line_error(capsys, ["demo", "--out", str(tmp_path / "demo")], "growfam replaces only a growfam report there")
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["report"]  # nothing trained
