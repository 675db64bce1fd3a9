"""The progressive pipeline end to end on a two-member family small enough for the suite."""

import dataclasses
import json
import re
import subprocess
import sys

import pytest
from conftest import documents
import torch
from transformers import AutoModelForCausalLM

import growfam.family.stage as family
from growfam.cli import main
from growfam.config import DataConfig, FamilyConfig, GrowthConfig
from growfam.data import prepare
from growfam.errors import ConfigError
from growfam.family import make_plan, run_family
from growfam.family.ledger import MemberEntry
from growfam.report.tables import format_comparison
from growfam.model import load_pretrained

TEXT = documents(400)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "ds"
    prepare(TEXT, "train:300", out, val_fraction=0.05, progress=False)
    return str(out)


def spec(**changes) -> FamilyConfig:
    member = dict(vocab_size=300, max_seq_len=32)
    data = dict(
        name="pair",
        members=[dict(name="small", d_model=32, n_heads=2, n_kv_heads=1, n_layers=1, ffn_dim=64, **member),
                 dict(name="large", d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, ffn_dim=96, **member)],
        tokens={"explicit": [6000, 16000]},
        batch_size=4, seq_len=32, lr={"policy": "linear", "start": 2e-3, "end": 1e-3},
        growth={"width": "aki", "depth": "stack"},
        train={"eval_every": 4, "eval_batches": 2, "ckpt_every": 4, "log_every": 4},
    )
    data.update(changes)
    return FamilyConfig.from_dict(data)


def test_two_stage_family_matches_its_plan(tmp_path, dataset):
    ledger = run_family(spec(), tmp_path, data=dataset, modes=("progressive", "independent"), log=lambda s: None)
    plan = make_plan(spec())
    for mode, tokens_key in (("progressive", "tokens_progressive"), ("independent", "tokens_independent")):
        members = ledger.members(mode)
        assert [m.name for m in members] == ["small", "large"]
        for stage, member in zip(plan.stages, members):
            per_step = stage.batch_size * stage.seq_len
            planned = getattr(stage, tokens_key)
            assert planned <= member.tokens < planned + per_step  # whole steps
            assert member.flops == 6 * stage.nonembedding_params * member.tokens
            assert member.max_lr == stage.max_lr
            assert member.val_loss is not None
    prog = ledger.members("progressive")
    # cumulative progressive FLOPs after the last stage = training it from scratch (Eq. 4)
    assert prog[-1].cum_flops == pytest.approx(plan.stages[-1].cum_flops_progressive, rel=0.02)
    assert prog[-1].cum_flops == pytest.approx(plan.stages[-1].flops_independent, rel=0.02)
    growth = prog[1].growth
    assert (growth["width"], growth["depth"], growth["target"]["d_model"]) == ("aki", "stack", 64)
    assert growth["probe"]["max_abs_dlogits"] > 0  # aki is not function-preserving by design
    assert ledger.member("independent", "large").growth is None
    assert json.loads((tmp_path / "family.json").read_text()) == ledger.to_json()

    # every member is a Hugging Face directory transformers loads with the same logits
    idx = torch.randint(0, 300, (1, 16))
    for mode in ("progressive", "independent"):
        for name in ("small", "large"):
            ours = load_pretrained(tmp_path / mode / name)
            theirs = AutoModelForCausalLM.from_pretrained(tmp_path / mode / name)
            with torch.no_grad():
                assert (theirs(idx).logits - ours(idx)).abs().max() <= 1e-5
            assert (tmp_path / mode / name / "tokenizer.json").exists()
    table = format_comparison(ledger)
    assert "small" in table and "large" in table and "saved" in table


def test_a_killed_family_resumes_onto_the_uninterrupted_result(tmp_path, dataset, monkeypatch):
    straight = run_family(spec(), tmp_path / "straight", data=dataset, modes=("progressive",), log=lambda s: None)

    real_train = family.train

    def crash_in_stage_two(cfg, model=None, optimizer=None, **kw):
        if cfg.model.d_model != 64:
            return real_train(cfg, model, optimizer, **kw)

        def die(step, loss):
            if step >= 8:  # after the step-4 checkpoint
                raise KeyboardInterrupt
        return real_train(cfg, model, optimizer, **{**kw, "on_eval": die})

    monkeypatch.setattr(family, "train", crash_in_stage_two)
    with pytest.raises(KeyboardInterrupt):
        run_family(spec(), tmp_path / "killed", data=dataset, modes=("progressive",), log=lambda s: None)
    monkeypatch.setattr(family, "train", real_train)
    resumed = run_family(spec(), tmp_path / "killed", data=dataset, modes=("progressive",), log=lambda s: None)
    for a, b in zip(straight.members("progressive"), resumed.members("progressive")):
        assert a.tokens == b.tokens and a.flops == b.flops
        assert a.val_loss == pytest.approx(b.val_loss, abs=1e-6)

    # a finished family is not trained again
    calls = []
    monkeypatch.setattr(family, "train", lambda *a, **k: calls.append(a))
    again = run_family(spec(), tmp_path / "killed", data=dataset, modes=("progressive",), log=lambda s: None)
    assert calls == [] and again.modes == resumed.modes


def test_a_family_directory_refuses_a_different_family(tmp_path, dataset):
    run_family(spec(tokens={"explicit": [2000, 4000]}), tmp_path, data=dataset, modes=("independent",),
               log=lambda s: None)
    with pytest.raises(ConfigError, match="different plan"):
        run_family(spec(tokens={"explicit": [2000, 5000]}), tmp_path, data=dataset, modes=("independent",),
                   log=lambda s: None)


def test_train_section_cannot_override_the_plan(tmp_path, dataset):
    with pytest.raises(ConfigError, match="train.max_lr is set by the family plan"):
        run_family(spec(train={"max_lr": 1.0}), tmp_path, data=dataset, log=lambda s: None)


def test_cli_family_errors_are_one_line(tmp_path, capsys, dataset):
    assert main(["family", "run", "no-such-family", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown family 'no-such-family'" in err
    (tmp_path / "f.yaml").write_text("members: [tiny-1, tiny-2]\nbatch_size: 4\ngrowth: {width: nope}\n")
    # (the growth operator is checked before stage 1 trains)
    assert main(["family", "run", str(tmp_path / "f.yaml"), "--data", dataset, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown width operator 'nope'" in err
    assert main(["family", "show", str(tmp_path / "nothing")]) == 2
    assert "no family.json" in capsys.readouterr().err


def test_convergence_stop_fits_the_slope_over_its_window():
    stop = family.ConvergenceStop(slope=1e-3, window=3)
    assert not stop(10, 5.0) and not stop(20, 4.0)
    assert not stop(30, 3.0)  # slope -0.1 per step: still learning
    assert stop.last_slope == pytest.approx(-0.1)
    assert not stop(40, 2.99)
    assert stop(50, 2.985) and abs(stop.last_slope) < 1e-3


def test_a_stage_that_grew_early_leaves_its_tokens_to_the_next():
    plan = make_plan(spec())
    small, large = plan.stages
    on_budget = [MemberEntry.from_json({**MEMBER, "tokens": small.tokens_progressive}, "", "test")]
    assert family._progressive_tokens(plan, 1, on_budget) == large.tokens_progressive
    early = [dataclasses.replace(on_budget[0], tokens=small.tokens_progressive / 2, stopped_early=True)]
    tokens = family._progressive_tokens(plan, 1, early)
    # cumulative FLOPs after the large stage still equal training it from scratch (Eq. 4)
    spent = small.params * early[0].tokens + large.params * tokens
    assert spent == pytest.approx(large.params * large.tokens_independent)


def test_fixed_data_caps_unique_tokens_at_the_largest_budget(tmp_path, dataset):
    plan = make_plan(spec())
    for index in (0, 1):
        cfg = family.stage_train_config(spec(), plan, index, "progressive", dataset, tmp_path,
                                        plan.stages[index].tokens_progressive, fixed_data=True)
        assert cfg.max_unique_tokens == int(plan.stages[-1].tokens_independent)
    free = family.stage_train_config(spec(), plan, 0, "progressive", dataset, tmp_path, 1000, fixed_data=False)
    assert free.max_unique_tokens is None


def test_a_stage_trains_the_steps_its_plan_counts(tmp_path):
    plan = make_plan(spec())
    for index, stage in enumerate(plan.stages):
        for mode in ("independent", "progressive"):
            cfg = family.stage_train_config(spec(), plan, index, mode, None, tmp_path,
                                            getattr(stage, f"tokens_{mode}"), fixed_data=False)
            assert cfg.total_steps == getattr(stage, f"steps_{mode}")
            assert cfg.tokens_per_step == stage.tokens_per_step
    assert plan.stages[0].steps_independent == 47  # 6000 tokens at 128 a step, rounded up


def test_a_family_refuses_data_with_another_tokenizer(tmp_path, dataset):
    small = spec(tokens={"explicit": [1000, 2000]})
    run_family(small, tmp_path / "fam", data=dataset, modes=("independent",), log=lambda s: None)
    prepare(TEXT, "train:280", tmp_path / "other", val_fraction=0.05, progress=False)
    with pytest.raises(ConfigError, match="different data fingerprint"):
        run_family(small, tmp_path / "fam", data=str(tmp_path / "other"), modes=("independent",),
                   log=lambda s: None)


def test_cli_family_run_prepares_its_data_and_prints_the_comparison(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TEXT[:200]):
        (corpus / f"doc{i}.txt").write_text(text)
    data = spec().to_dict()
    data.update(tokens={"explicit": [1000, 2000]},
                data={"source": str(corpus), "tokenizer": "train:300", "val_fraction": 0.05})
    (tmp_path / "fam.yaml").write_text(json.dumps(data))  # JSON is YAML
    out = tmp_path / "out"
    assert main(["family", "run", str(tmp_path / "fam.yaml"), "--mode", "both", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "data" / "index.json").exists()
    assert "saved" in printed and printed.count("small") >= 1 and printed.count("large") >= 1
    assert main(["family", "show", str(out)]) == 0
    shown = capsys.readouterr().out.strip()
    assert shown.startswith("member") and printed.rstrip().endswith(shown)  # the same table


def test_a_masked_growth_ramp_ends_inside_its_stage(tmp_path, dataset):
    from growfam.train.checkpoint import latest_checkpoint, read_trainer_state

    masked = spec(tokens={"explicit": [2000, 4000]}, growth={"width": "masked", "depth": "identity"})
    ledger = run_family(masked, tmp_path, data=dataset, modes=("progressive",), log=lambda s: None)
    large = ledger.member("progressive", "large")
    assert 1 <= large.growth["mask_steps"] <= large.steps
    # the published member is what was trained: the masks folded away before the end
    assert read_trainer_state(latest_checkpoint(tmp_path / "runs" / "progressive" / "large"))["masks"] is None


def test_growth_and_data_sections_read_yaml_numbers_and_refuse_bad_ones():
    opts = GrowthConfig.from_dict({"slope": "3e-6", "window": "4", "mask_steps": 1e3})
    assert (opts.slope, opts.window, opts.mask_steps) == (3e-6, 4, 1000)
    assert DataConfig.from_dict({"max_tokens": "5e6"}).max_tokens == 5_000_000
    with pytest.raises(ConfigError, match="growth.slope must be positive"):
        GrowthConfig.from_dict({"slope": -1})
    with pytest.raises(ConfigError, match="unknown key 'widht' in growth \\(did you mean 'width'\\?\\)"):
        GrowthConfig.from_dict({"widht": "aki"})
    with pytest.raises(ConfigError, match="growth.window must be an integer >= 0, got 2.5"):
        GrowthConfig.from_dict({"window": 2.5})


# --------------------------------------------------------------------------------------------
# Bad input is refused in one line, before any write or data preparation
# --------------------------------------------------------------------------------------------


class Killed(Exception):
    """Stands in for a run killed while its first stage trains."""


def _killed_train(*args, **kwargs):
    raise Killed


def _dead_pid() -> str:
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def no_prepare(monkeypatch):
    """Data preparation fails the test: these inputs must be refused before it."""
    def prepare(*args, **kwargs):
        raise AssertionError("the data was prepared before the input was checked")
    monkeypatch.setattr("growfam.data.config.prepare", prepare)


def test_a_family_directory_refuses_a_changed_train_section(tmp_path, dataset, monkeypatch):
    monkeypatch.setattr(family, "train", _killed_train)
    section = {"eval_every": 4, "ckpt_every": 4, "log_every": 4}
    with pytest.raises(Killed):
        run_family(spec(train=section), tmp_path, data=dataset, log=lambda s: None)
    with pytest.raises(ConfigError, match=r"different train section \(weight_decay: 0.1 then, 0.0 now\)"):
        run_family(spec(train={**section, "weight_decay": 0}), tmp_path, data=dataset, log=lambda s: None)
    # keys that leave the loss trajectory alone may change
    with pytest.raises(Killed):
        run_family(spec(train={"eval_every": 8, "ckpt_every": 2, "tensorboard": False}), tmp_path,
                   data=dataset, log=lambda s: None)
    # a ledger from before the record resumes, and gets the record
    ledger = json.loads((tmp_path / "family.json").read_text())
    assert ledger["train"]["weight_decay"] == 0.1
    del ledger["train"]
    (tmp_path / "family.json").write_text(json.dumps(ledger))
    with pytest.raises(Killed):
        run_family(spec(train={"weight_decay": 0.05}), tmp_path, data=dataset, log=lambda s: None)
    assert json.loads((tmp_path / "family.json").read_text())["train"]["weight_decay"] == 0.05


@pytest.mark.parametrize("changes, message", [
    ({"train": {"weight_decay": -1}}, r"^train.weight_decay must be >= 0, got -1"),
    ({"train": {"betas": [2, 0.9]}}, r"^train.betas must each be in \[0, 1\), got 2"),
    ({"train": {"weight_decya": 0}}, r"^unknown key 'weight_decya' in train \(did you mean 'weight_decay'\?\)"),
    ({"train": {"max_lr": 1.0}}, r"^train.max_lr is set by the family plan"),
    ({"train": [1, 2]}, r"^train must be a mapping"),
    # only the second stage's batch (6) does not split into micro-batches of 4
    ({"batch_size": [4, 6], "train": {"micro_batch_size": 4}},
     r"^train.micro_batch_size 4 does not divide stage large's batch_size 6"),
])
def test_train_section_errors_name_the_key_before_any_write(tmp_path, dataset, monkeypatch, changes, message):
    monkeypatch.setattr(family, "train", _killed_train)
    with pytest.raises(ConfigError, match=message):
        run_family(spec(**changes), tmp_path / "out", data=dataset, log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_cli_checks_the_train_section_before_preparing_data(tmp_path, capsys, no_prepare):
    data = spec(train={"weight_decay": -1}).to_dict()
    data["data"] = {"source": str(tmp_path / "corpus"), "tokenizer": "train:300"}
    (tmp_path / "fam.yaml").write_text(json.dumps(data))
    assert main(["family", "run", str(tmp_path / "fam.yaml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.weight_decay must be >= 0" in err
    assert not (tmp_path / "out").exists()


MEMBER = {"name": "small", "done": True, "params": 1e4, "tokens": 6000, "flops": 3.6e8, "cum_flops": 3.6e8,
          "wall_s": 1.0, "val_loss": 5.1}


def _ledger(**changes) -> dict:
    ledger = {"plan": {}, "data_fingerprint": "abc", "growth": {}, "fixed_data": False, "data": "ds",
              "modes": {"progressive": [MEMBER], "independent": [MEMBER]}}
    ledger.update(changes)
    return ledger


@pytest.mark.parametrize("ledger, message", [
    ([1, 2], "the ledger must be a mapping, got list"),
    ("text", "the ledger must be a mapping, got 'text'"),
    (_ledger(modes=[]), "modes must be a mapping, got list"),
    ({k: v for k, v in _ledger().items() if k != "plan"}, "plan is missing"),
    (_ledger(fixed_data="no"), "fixed_data must be true or false, got 'no'"),
    (_ledger(modes={"sideways": []}), "modes has an unknown mode 'sideways'"),
    (_ledger(modes={"progressive": {"small": MEMBER}}), r"modes.progressive must be a list, got dict"),
    (_ledger(modes={"progressive": ["small"]}), r"modes.progressive\[0\] must be a mapping, got 'small'"),
    (_ledger(modes={"progressive": [{**MEMBER, "name": None}]}),
     r"modes.progressive\[0\].name must be a string, got None"),
    (_ledger(modes={"progressive": [{k: v for k, v in MEMBER.items() if k != "name"}]}),
     r"modes.progressive\[0\].name is missing"),
    (_ledger(modes={"progressive": [{**MEMBER, "val_loss": "low"}]}),
     r"modes.progressive\[0\].val_loss must be a number or null, got 'low'"),
    (_ledger(modes={"independent": [MEMBER, {**MEMBER, "flops": "many"}]}),
     r"modes.independent\[1\].flops must be a number, got 'many'"),
    (_ledger(modes={"progressive": [{**MEMBER, "flops": True}]}),
     r"modes.progressive\[0\].flops must be a number, got True"),
    (_ledger(modes={"progressive": [{**MEMBER, "done": "yes"}]}),
     r"modes.progressive\[0\].done must be true or false, got 'yes'"),
    (_ledger(modes={"progressive": [{k: v for k, v in MEMBER.items() if k != "cum_flops"}]}),
     r"modes.progressive\[0\].cum_flops is missing"),
])
def test_a_malformed_ledger_is_one_line_naming_the_file(tmp_path, capsys, dataset, ledger, message):
    (tmp_path / "family.json").write_text(json.dumps(ledger))
    assert main(["family", "show", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'family.json'}: " in err
    assert re.search(message, err), err
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'family.json'}: ")):
        run_family(spec(), tmp_path, data=dataset, log=lambda s: None)
    assert json.loads((tmp_path / "family.json").read_text()) == ledger  # left as it was


def test_a_well_formed_ledger_shows_even_with_unfinished_or_zero_members(tmp_path, capsys):
    unfinished = {**MEMBER, "name": "large", "done": False}
    (tmp_path / "family.json").write_text(json.dumps(_ledger(modes={
        "progressive": [MEMBER, unfinished], "independent": [{**MEMBER, "flops": 0, "val_loss": None}]})))
    assert main(["family", "show", str(tmp_path)]) == 0
    assert "small" in capsys.readouterr().out
    (tmp_path / "family.json").write_text(json.dumps(_ledger(modes={
        "progressive": [{**MEMBER, "cum_flops": 0}], "independent": [{**MEMBER, "flops": 0}]})))
    assert main(["family", "show", str(tmp_path)]) == 0  # no saving to compute, no division by zero


def test_cli_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, dataset, no_prepare):
    (tmp_path / "f.yaml").write_text("members: [tiny-1, tiny-2]\nbatch_size: 4\n")
    taken = tmp_path / "taken"
    taken.write_text("mine")
    for argv in (["family", "run", str(tmp_path / "f.yaml"), "--data", dataset, "--out", str(taken)],
                 ["family", "run", "tiny", "--out", str(taken)],
                 ["family", "run", "tiny", "--out", str(taken / "sub")],
                 ["demo", "--out", str(taken)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{taken} is not a directory" in err, err
    assert taken.read_text() == "mine"


def test_cli_bad_data_or_mode_is_refused_before_any_write(tmp_path, capsys):
    (tmp_path / "f.yaml").write_text("members: [tiny-1, tiny-2]\nbatch_size: 4\n")
    out = tmp_path / "out"
    assert main(["family", "run", str(tmp_path / "f.yaml"), "--data", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a prepared dataset" in err
    with pytest.raises(SystemExit) as exit_:
        main(["family", "run", str(tmp_path / "f.yaml"), "--mode", "sideways", "--out", str(out)])
    assert exit_.value.code == 2 and "invalid choice: 'sideways'" in capsys.readouterr().err
    assert not out.exists()


def test_run_family_refuses_no_mode_or_an_unknown_one_before_any_write(tmp_path, dataset):
    with pytest.raises(ConfigError, match="no mode"):
        run_family(spec(), tmp_path / "out", data=dataset, modes=(), log=lambda s: None)
    with pytest.raises(ConfigError, match="unknown mode 'sideways'"):
        run_family(spec(), tmp_path / "out", data=dataset, modes="sideways", log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_a_family_run_removes_the_temporaries_of_a_killed_one(tmp_path, dataset, monkeypatch):
    dead = _dead_pid()
    (tmp_path / f".family.json.tmp-{dead}").write_text("{")
    (tmp_path / "independent").mkdir()
    (tmp_path / "independent" / f".small.tmp-{dead}-abc").mkdir()
    monkeypatch.setattr(family, "train", _killed_train)
    with pytest.raises(Killed):
        run_family(spec(), tmp_path, data=dataset, modes=("independent",), log=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".growfam.lock", "family.json", "independent"]
    assert list((tmp_path / "independent").iterdir()) == []


def test_the_growth_probe_refuses_ids_beyond_the_vocabulary(tmp_path, dataset):
    import shutil

    from growfam.data import TokenDataset
    from growfam.errors import GrowfamError

    bad = tmp_path / "ds"
    shutil.copytree(dataset, bad)
    index = json.loads((bad / "index.json").read_text())
    index["tokenizer"].update(vocab_size=5, eos_id=4)  # the tokens hold ids up to 299
    (bad / "index.json").write_text(json.dumps(index))
    with pytest.raises(GrowfamError, match="outside the vocabulary of 5"):
        family._probe_batch(TokenDataset.open(bad), seq_len=32, n_tokens=256)
    probe = family._probe_batch(TokenDataset.open(dataset), seq_len=32, n_tokens=256)
    assert probe.shape == (8, 32) and probe.dtype == torch.int64
