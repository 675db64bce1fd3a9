"""`growfam speculate`: Table 5 over a family's pairs and modes (docs/concepts.md)."""

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_model, tiny_config
from growfam.cli import main
from growfam.family.members import Member, Target, resolve_target
from growfam.family import read_ledger, run_family, write_ledger
from growfam.family.ledger import Ledger
from growfam.infer import generate, speculative_generate
from growfam.infer.speculate import (SpeculateOptions, expected_acceptance, family_speculative, format_speculative,
                                     speculative_pairs)
from family.test_family import TEXT, dataset, spec  # noqa: F401  (dataset: the module fixture)

SMALL = dict(prompts=3, prompt_tokens=8, max_new_tokens=12, k=4, temperatures=[0, 1], device="cpu")


@pytest.fixture(scope="module")
def family(tmp_path_factory, dataset):
    out = tmp_path_factory.mktemp("family") / "fam"
    run_family(spec(tokens={"explicit": [1000, 2000]}), out, data=dataset, modes="both", log=lambda s: None)
    return out


@pytest.fixture
def family_copy(family, tmp_path):
    shutil.copytree(family, tmp_path / "fam")
    return tmp_path / "fam"


def _target(names: list[str], modes: list[str]) -> Target:
    members = [Member(n, m, Path(m) / n, tiny_config()) for m in modes for n in names]
    ledger = Ledger(plan={"stages": [{"name": n} for n in names]}, data_fingerprint="", growth={}, fixed_data=False,
                    data="", modes={})
    return Target(members, Path("."), ledger)


def test_pairs_follow_table_5s_combinations_and_sizes():
    both = ["progressive", "independent"]
    adjacent = speculative_pairs(_target(["a", "b", "c"], both), "adjacent")
    assert [(d.mode[:4], d.name, t.mode[:4], t.name) for d, t in adjacent] == [
        ("prog", "a", "prog", "b"), ("inde", "a", "prog", "b"), ("inde", "a", "inde", "b"), ("prog", "a", "inde", "b"),
        ("prog", "b", "prog", "c"), ("inde", "b", "prog", "c"), ("inde", "b", "inde", "c"), ("prog", "b", "inde", "c")]
    every = speculative_pairs(_target(["a", "b", "c"], both), "all")
    assert {(d.name, t.name) for d, t in every} == {("a", "b"), ("a", "c"), ("b", "c")} and len(every) == 12
    # one mode built: its own pairs only
    alone = speculative_pairs(_target(["a", "b"], ["independent"]), "all")
    assert [(d.mode, t.mode) for d, t in alone] == [("independent", "independent")]


def test_expected_acceptance_is_sum_of_min_at_the_temperature_and_argmax_agreement_at_zero():
    draft, target = random_model(tiny_config(), seed=0, dtype=torch.float64), random_model(tiny_config(), seed=1,
                                                                                          dtype=torch.float64)
    seqs = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(0))
    assert expected_acceptance(target, target, seqs, 5, 1.0) == pytest.approx(1.0, abs=1e-12)
    with torch.no_grad():
        lp, lq = target(seqs)[:, 4:-1], draft(seqs)[:, 4:-1]
    p, q = torch.softmax(lp / 0.7, -1), torch.softmax(lq / 0.7, -1)
    by_hand = float(torch.minimum(p, q).sum(-1).mean())
    assert expected_acceptance(draft, target, seqs, 5, 0.7) == pytest.approx(by_hand, rel=1e-12)
    agree = float((lp.argmax(-1) == lq.argmax(-1)).double().mean())
    assert expected_acceptance(draft, target, seqs, 5, 0.0) == agree and 0 < by_hand < 1


def test_speculate_records_table_5_in_the_ledger_and_greedy_matches_its_expectation(family_copy):
    before = read_ledger(family_copy)
    section = family_speculative(resolve_target(family_copy), SpeculateOptions(**SMALL))
    ledger = read_ledger(family_copy)
    assert ledger.speculative.to_json() == section and ledger.modes == before.modes
    rows = section["rows"]
    assert [(r["temperature"], r["draft_mode"], r["target_mode"]) for r in rows] == [
        (t, d, m) for d, m in (("progressive", "progressive"), ("independent", "progressive"),
                               ("independent", "independent"), ("progressive", "independent")) for t in (0, 1)]
    for r in rows:
        assert (r["draft"], r["target"]) == ("small", "large")
        assert r["tokens"] == SMALL["prompts"] * SMALL["max_new_tokens"]  # end-of-text does not stop it
        assert 0 <= r["accepted"] <= r["verified"] <= r["drafted"]
        assert r["acceptance"] == r["accepted"] / r["drafted"] and r["alpha"] == r["accepted"] / r["verified"]
        assert r["tokens_per_target_call"] == r["tokens"] / r["target_calls"] >= 1
        assert r["speedup"] == pytest.approx(r["tokens_per_s"] / r["target_only_tokens_per_s"])
    for r in (r for r in rows if r["temperature"] == 0):
        # greedy: the text decoded is the target's own, so its positions where the argmaxes
        # agree are the accepted tokens plus some of the positions never checked (a round's
        # bonus token, the budget's end): accepted <= agreements <= accepted + unchecked
        agreements = r["expected_acceptance"] * r["tokens"]
        assert r["accepted"] - 1e-9 <= agreements <= r["accepted"] + r["tokens"] - r["verified"] + 1e-9
    table = format_speculative(section)
    assert "greedy (temperature 0), k = 4" in table and "temperature 1, k = 4" in table
    assert "small -> large" in table and "  ind -> prog" in table and "prog -> ind" in table


@pytest.mark.slow
def test_sampled_acceptance_agrees_with_sum_of_min():
    """At temperature T every checked draft token is accepted with probability Σ min(p_T, q_T)
    of its context, so alpha over many tokens estimates the expectation on the target's own text."""
    cfg = tiny_config(init_std=0.3, vocab_size=23)  # peaked, different distributions: alpha near 0.5
    draft, target = random_model(cfg, seed=4), random_model(cfg, seed=5)
    prompts = torch.randint(0, 23, (40, 3), generator=torch.Generator().manual_seed(1)).tolist()
    generator, accepted, verified, sequences = torch.Generator().manual_seed(2), 0, 0, []
    for ids in prompts:
        out = speculative_generate(target, draft, ids, k=3, max_new_tokens=30, temperature=1.5, generator=generator)
        accepted, verified = accepted + out.accepted, verified + out.verified
        sequences.append(ids + generate(target, ids, 30, temperature=1.5, generator=generator).tokens)
    a = accepted / verified
    e = expected_acceptance(draft, target, torch.tensor(sequences), 3, 1.5)
    se = math.sqrt(a * (1 - a) / verified + e * (1 - e) / (len(prompts) * 30))
    assert 0.2 < e < 0.8 and abs(a - e) < 4 * se, (a, e, se)
    # what docs/concepts.md calls the acceptance rate, accepted / drafted, is lower: it also counts
    # the tokens after a round's rejection that were never checked


@pytest.mark.parametrize("args, message", [
    (["--k", "0"], "--k must be"),
    (["--temperature", "-1"], "--temperature must be"),
    (["--prompts", "x"], "--prompts must be"),
    (["--prompt-tokens", "30"], "exceed the context of small -> large (32 tokens)"),
    (["--prompts", "100000", "--prompt-tokens", "8", "--max-new-tokens", "8"], "the validation split holds only"),
    (["--device", "tpu"], "device must be"),
])
def test_bad_input_is_one_line_and_exit_2_without_touching_the_ledger(family_copy, capsys, args, message):
    before = (family_copy / "family.json").read_bytes()
    assert main(["speculate", str(family_copy), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert (family_copy / "family.json").read_bytes() == before


def test_speculate_refuses_what_is_not_a_family_with_two_sizes(family_copy, tmp_path, capsys):
    assert main(["speculate", str(tmp_path / "nope")]) == 2
    assert "not a family directory" in capsys.readouterr().err
    member = family_copy / "progressive" / "large"
    assert main(["speculate", str(member)]) == 2
    assert "not a family directory" in capsys.readouterr().err
    ledger = read_ledger(family_copy)
    for members in ledger.modes.values():
        members[1].done = False
    write_ledger(family_copy, ledger)
    assert main(["speculate", str(family_copy)]) == 2
    assert "no two finished members" in capsys.readouterr().err


def test_the_cli_prints_the_table(family_copy, capsys):
    assert main(["speculate", str(family_copy), "--prompts", "2", "--prompt-tokens", "6", "--max-new-tokens", "6",
                 "--temperature", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("greedy (temperature 0), k = 8") and "temperature 1" not in out
    assert read_ledger(family_copy).speculative.option("max_new_tokens") == 6
    assert np.isfinite(read_ledger(family_copy).speculative.rows[0]["tokens_per_s"])
