"""Post-training (growfam posttrain): SFT then DPO through TRL on a two-member family, its chat
template, resumption after kill -9, TRL's DPO loss against the formula, MT-Bench files."""

import json
import math
import os
import random
import signal
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from growfam.cli import main  # noqa: E402
from growfam.family import run_family  # noqa: E402
from growfam.family.ledger import read_ledger  # noqa: E402
from growfam.posttrain import PosttrainConfig, run_posttrain  # noqa: E402
from growfam.posttrain import data, mtbench  # noqa: E402
from growfam.posttrain.chat import with_chat_template  # noqa: E402
from growfam.report.run import write_report  # noqa: E402
from family.test_family import dataset, spec  # noqa: E402,F401  (module fixture)
from test_reliability import checksums, refused  # noqa: E402

WORDS = "the quick brown fox lazy dog jumps over fences field number lands".split()
FAST = ["--max-steps", "3", "--batch-size", "4", "--micro-batch-size", "2", "--held-out", "4",
        "--save-steps", "1", "--max-length", "96", "--no-progress"]


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_chat(path, n=24, seed=0):
    rng = random.Random(seed)
    rows = [{"messages": [{"role": "user", "content": _sentence(rng, 4)},
                          {"role": "assistant", "content": _sentence(rng, 6)}]} for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_prefs(path, n=24, seed=1):
    rng = random.Random(seed)
    rows = [{"prompt": _sentence(rng, 4), "chosen": _sentence(rng, 5), "rejected": _sentence(rng, 7)}
            for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def family(tmp_path_factory, dataset):  # noqa: F811
    out = tmp_path_factory.mktemp("posttrain") / "fam"
    run_family(spec(), out, data=dataset, modes=("progressive", "independent"), log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    return write_chat(folder / "chat.jsonl"), write_prefs(folder / "prefs.jsonl")


def test_a_family_post_trains_in_both_modes_and_every_result_chats(family, chat_files, tmp_path, capsys):
    sft, prefs = chat_files
    out = tmp_path / "post"
    assert main(["posttrain", str(family), "--sft", str(sft), "--dpo", str(prefs), *FAST, "--mt-bench",
                 "--max-new-tokens", "3", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "SFT held-out before" in table and "large" in table
    summary = json.loads((out / "posttrain.json").read_text())
    assert sorted(summary["members"]) == ["independent/large", "independent/small",
                                          "progressive/large", "progressive/small"]
    for key, result in summary["members"].items():
        assert result["sft"]["steps"] == 3 and result["dpo"]["steps"] == 3
        assert result["sft"]["held_out_loss"] < result["sft"]["held_out_loss_before"]
        assert 0 <= result["dpo"]["reward_accuracy"] <= 1
        model_dir = out / key / "model"
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        assert not (model_dir / "training_args.bin").exists()  # no pickle ships
        ids = tokenizer.apply_chat_template([{"role": "user", "content": "the fox"}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        reply = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert reply.shape[1] > ids.shape[1]
        answers = [json.loads(line) for line in (out / "mt_bench" / "model_answer" /
                                                 f"{key.replace('/', '-')}.jsonl").read_text().splitlines()]
        assert len({a["question_id"] for a in answers}) == 80
        assert all(len(a["choices"][0]["turns"]) == 2 and a["model_id"] == key.replace("/", "-") for a in answers)
    # the first member is shared by both modes, so its post-training is too
    assert summary["members"]["progressive/small"]["sft"]["held_out_loss"] == \
        summary["members"]["independent/small"]["sft"]["held_out_loss"]
    assert read_ledger(family).extra["posttrain"]["members"].keys() == summary["members"].keys()
    # growfam report: Appendix E's table and the SFT/DPO curves
    report = write_report([family], tmp_path / "report")
    text = report.path.read_text()
    assert "## Post-training (Appendix E)" in text and "| large | progressive |" in text
    assert (report.folder / "posttrain-curves.png").stat().st_size > 0
    # a rerun skips every finished member
    assert main(["posttrain", str(family), "--sft", str(sft), "--dpo", str(prefs), *FAST, "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("done already") == 4


KILLER = """
import os, signal, sys
import trl
save = trl.DPOTrainer._save_checkpoint
def save_then_die(self, model, trial):
    save(self, model, trial)
    if self.state.global_step == 2:
        os.kill(os.getpid(), signal.SIGKILL)
trl.DPOTrainer._save_checkpoint = save_then_die
from growfam.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_kill_9_during_dpo_then_the_same_command_ends_on_the_uninterrupted_weights(family, chat_files, tmp_path):
    sft, prefs = chat_files
    member = family / "progressive" / "large"
    argv = ["posttrain", str(member), "--sft", str(sft), "--dpo", str(prefs), "--dpo-lr", "1e-3", *FAST,
            "--max-steps", "4"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    killed = subprocess.run([sys.executable, "-c", KILLER, *argv, "--out", str(tmp_path / "cut")],
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "cut" / "progressive" / "large" / "model").exists()
    assert main([*argv, "--out", str(tmp_path / "cut")]) == 0
    result = json.loads((tmp_path / "cut" / "progressive" / "large" / "result.json").read_text())
    assert result["dpo"]["resumed"] and not result["sft"]["resumed"]
    whole = load_file(tmp_path / "whole" / "progressive" / "large" / "model" / "model.safetensors")
    cut = load_file(tmp_path / "cut" / "progressive" / "large" / "model" / "model.safetensors")
    after_sft = load_file(tmp_path / "whole" / "progressive" / "large" / "sft" / "final" / "model.safetensors")
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    assert any(not torch.equal(whole[k], after_sft[k]) for k in whole)  # DPO moved the weights


def test_assistant_only_loss_covers_exactly_the_assistant_tokens(family, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    member = family / "progressive" / "large"
    tokenizer = with_chat_template(AutoTokenizer.from_pretrained(member), str(member))
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the fox"},
            {"role": "assistant", "content": "jumps over"}, {"role": "user", "content": "and the dog"},
            {"role": "assistant", "content": "lazy dog lands"}]
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=1, assistant_only_loss=True, max_length=512,
                     report_to=[], use_cpu=True)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(member), args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"messages": conv}]))
    row = trainer.data_collator([trainer.train_dataset[0]])
    labels, ids = row["labels"][0].tolist(), row["input_ids"][0].tolist()
    expected = [t for reply in ("jumps over", "lazy dog lands")
                for t in tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    assert [label for label in labels if label != -100] == expected
    assert all(label in (-100, token) for label, token in zip(labels, ids))
    # the labelled tokens are two contiguous runs, each right after "<|assistant|>\n"
    runs = [i for i in range(len(labels)) if labels[i] != -100 and (i == 0 or labels[i - 1] == -100)]
    assert len(runs) == 2
    marker = tokenizer("<|assistant|>\n", add_special_tokens=False)["input_ids"]
    assert all(ids[start - len(marker):start] == marker for start in runs)


def _completion_logp(model, prompt, completion):
    """Sum of log p(completion | prompt), float64."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return sum(logp[len(prompt) - 1 + i, tok].item() for i, tok in enumerate(completion))


def test_trls_dpo_loss_is_the_dpo_formula_in_float64(family, chat_files, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy_dir, ref_dir = family / "progressive" / "large", family / "independent" / "large"
    tokenizer = with_chat_template(AutoTokenizer.from_pretrained(policy_dir), str(policy_dir))
    pairs = data.preferences(str(chat_files[1]), limit=4).items
    beta = 0.5
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), beta=beta, max_length=512, report_to=[], use_cpu=True, bf16=False,
                     per_device_train_batch_size=4)
    policy, ref = (AutoModelForCausalLM.from_pretrained(d) for d in (policy_dir, ref_dir))
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(pairs))
    rows = [trainer.train_dataset[i] for i in range(4)]
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows)).item()
    p64, r64 = (AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64).eval() for d in (policy_dir, ref_dir))
    terms = []
    for row in rows:
        margin = sum(sign * (_completion_logp(p64, row["prompt_ids"], row[key]) -
                             _completion_logp(r64, row["prompt_ids"], row[key]))
                     for sign, key in ((1, "chosen_ids"), (-1, "rejected_ids")))
        terms.append(-math.log(1 / (1 + math.exp(-beta * margin))))
    expected = sum(terms) / len(terms)
    assert abs(expected - math.log(2)) > 1e-2  # the two models differ: the test is not at log 2 by accident
    assert loss == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_a_judgment_file_with_missing_scores_counts_them(tmp_path):
    rows = [{"question_id": 81, "model": "a", "judge": ["gpt-4", "single-v1"], "judgment": "ok [[7]]", "score": 7, "turn": 1},
            {"question_id": 81, "model": "a", "judge": ["gpt-4", "single-v1-multi-turn"], "judgment": "?", "score": -1, "turn": 2},
            {"question_id": 82, "model": "a", "judge": ["gpt-4", "single-v1"], "judgment": "[[4.5]]", "score": 4.5, "turn": 1},
            {"question_id": 81, "model": "b", "judge": ["gpt-4", "single-v1"], "judgment": "no", "score": -1, "turn": 1}]
    path = tmp_path / "gpt-4_single.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert mtbench.read_judgments(path) == {"a": {"score": 5.75, "judged": 2, "missing": 1},
                                            "b": {"score": None, "judged": 0, "missing": 1}}
    assert mtbench.parse_score("Rating: [[8]]") == 8 and mtbench.parse_score("[3.5]") == 3.5
    assert mtbench.parse_score("no verdict") == -1
    path.write_text('{"model": "a"}\n')
    with pytest.raises(Exception, match="gpt-4_single.jsonl:1: not a FastChat judgment"):
        mtbench.read_judgments(path)


def test_a_local_judge_that_never_scores_is_counted_as_missing(family):
    member = family / "progressive" / "small"
    model = AutoModelForCausalLM.from_pretrained(member)
    tokenizer = with_chat_template(AutoTokenizer.from_pretrained(member), str(member))
    qs = mtbench.questions()
    assert len(qs) == 80 and all(len(q["turns"]) == 2 for q in qs)
    answers = mtbench.answer(model, tokenizer, "m", qs[:3], max_new_tokens=2)
    judgments = mtbench.judge(answers, model, tokenizer, "tiny", max_new_tokens=2)
    assert len(judgments) == 6 and {j["turn"] for j in judgments} == {1, 2}
    assert all(j["score"] == -1 for j in judgments)  # a 300-token model never writes [[n]]


def test_sharegpt_is_read_record_by_record_up_to_the_cut(tmp_path):
    convs = data.conversations("sharegpt", limit=50)
    assert len(convs.items) == 50
    assert all(t["role"] == ("user" if i % 2 == 0 else "assistant") for c in convs.items for i, t in enumerate(c))
    pairs = data.preferences("sharegpt", limit=20, seed=3).items
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    assert {p["rejected"][0]["content"] for p in pairs} <= {p["chosen"][0]["content"] for p in pairs}
    cut = tmp_path / "cut.json"
    cut.write_text('[\n {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},'
                   '\n {"id": "b", "conversations": [{"from": "human", "va')
    assert data.read_sharegpt(cut) == [{"id": "a", "conversations": [{"from": "human", "value": "hi"},
                                                                     {"from": "gpt", "value": "yo"}]}]


def test_data_problems_are_counted_and_mistakes_refused(tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "user", "content": "only a question"}]}]))
    loaded = data.conversations(str(chat))
    assert len(loaded.items) == 1 and loaded.dropped == {"empty": 1, "no assistant reply to a user": 1}
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "c"}],
         "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "d"}]}]))
    loaded = data.preferences(str(prefs))
    assert len(loaded.items) == 2 and loaded.dropped == {"chosen equals rejected": 1}
    assert loaded.items[1] == {"prompt": [{"role": "user", "content": "q"}],
                               "chosen": [{"role": "assistant", "content": "c"}],
                               "rejected": [{"role": "assistant", "content": "d"}]}


def test_overlong_conversations_are_truncated_and_counted(family, tmp_path):
    long = tmp_path / "long.jsonl"
    rng = random.Random(0)
    rows = [{"messages": [{"role": "user", "content": _sentence(rng, 3)},
                          {"role": "assistant", "content": _sentence(rng, 40 if i % 3 == 0 else 3)}]} for i in range(12)]
    long.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = PosttrainConfig(sft=str(long), max_steps=1, batch_size=2, micro_batch_size=2, held_out=2, max_length=64)
    summary = run_posttrain(family / "progressive" / "small", cfg, tmp_path / "out", progress=False, log=lambda s: None)
    sft = summary["members"]["progressive/small"]["sft"]
    long_ones = sum(1 for i in range(12) if i % 3 == 0)
    assert 0 < sft["truncated"] <= long_ones and sft["examples"] == 10


@pytest.mark.parametrize("case, message", [
    ("no tokenizer", "no tokenizer there"),
    ("fields", "has no 'messages' field"),
    ("no data", "needs --sft DATA, --dpo DATA or both"),
    ("all empty", "no usable record (2 empty)"),
    ("held out", "leave none of the"),
    ("bad number", "batch-size must be a positive number"),
    ("bad judgments", "not a FastChat judgment"),
    ("no out", "--out is needed for a model directory"),
    ("changed", "holds a post-training with other settings (sft_lr 1.0 -> 2e-05)"),
    ("unknown member", "has no member tiny-9 (it has small, large)"),
    ("out in a family", "lies inside the family directory"),
    ("out not ours", "is a folder growfam posttrain did not make"),
    ("too short", "no SFT record keeps a reply token within max_length 8"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_write(family, chat_files, tmp_path, capsys, case, message):
    sft, prefs = chat_files
    member = tmp_path / "member"
    subprocess.run(["cp", "-r", str(family / "progressive" / "small"), str(member)], check=True)
    argv = ["posttrain", str(member), "--sft", str(sft), *FAST, "--out", str(tmp_path / "out")]
    if case == "no tokenizer":
        for f in member.glob("tokenizer*"):
            f.unlink()
    elif case == "fields":
        argv[3] = str(prefs)
    elif case == "no data":
        argv = ["posttrain", str(member), "--out", str(tmp_path / "out")]
    elif case == "all empty":
        empty = tmp_path / "empty.jsonl"
        empty.write_text('{"messages": [{"role": "user", "content": ""}]}\n{"messages": []}\n')
        argv[3] = str(empty)
    elif case == "held out":
        argv += ["--held-out", "500"]
    elif case == "bad number":
        argv += ["--batch-size", "0"]
    elif case == "bad judgments":
        bad = tmp_path / "j.jsonl"
        bad.write_text("not json\n")
        argv += ["--judgments", str(bad)]
    elif case == "no out":
        argv = argv[:-2]
    elif case == "changed":
        (tmp_path / "out").mkdir()
        settings = PosttrainConfig(sft=str(sft), max_steps=3, batch_size=4, micro_batch_size=2, held_out=4,
                                   max_length=96, sft_lr=1.0).training()
        (tmp_path / "out" / "posttrain.json").write_text(json.dumps({"settings": settings}))
    elif case == "unknown member":
        argv = ["posttrain", str(family), "--member", "tiny-9", *argv[2:]]
    elif case == "out in a family":
        argv[-1] = str(family / "progressive" / "posttrain")
    elif case == "too short":
        argv += ["--max-length", "8"]
    elif case == "out not ours":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "notes.txt").write_text("mine")
    before = checksums(tmp_path)
    refused(capsys, argv, message)
    assert checksums(tmp_path) == before


def _family_yaml(tmp_path, posttrain) -> str:
    import yaml

    path = tmp_path / "pair.yaml"
    path.write_text(yaml.safe_dump({**spec().to_dict(), "posttrain": posttrain}))
    return str(path)


def test_family_run_ends_with_the_yamls_posttrain_section(dataset, chat_files, tmp_path, capsys):  # noqa: F811
    section = {"sft": str(chat_files[0]), "max_steps": 2, "batch_size": 2, "micro_batch_size": 2, "held_out": 2,
               "max_length": "96", "sft_lr": "1e-4", "members": ["large"]}
    out = tmp_path / "fam"
    assert main(["family", "run", _family_yaml(tmp_path, section), "--data", dataset, "--mode", "both",
                 "--out", str(out)]) == 0
    assert "SFT held-out before" in capsys.readouterr().out
    summary = json.loads((out / "posttrain" / "posttrain.json").read_text())
    assert sorted(summary["members"]) == ["independent/large", "progressive/large"]
    assert summary["settings"]["sft_lr"] == 1e-4 and summary["settings"]["max_length"] == 96
    assert read_ledger(out).extra["posttrain"]["out"] == str(out / "posttrain")


@pytest.mark.parametrize("section, message", [
    ({"sft": "x", "bogus": 1}, "unknown key 'bogus' in posttrain"),
    ({"sft": "x", "beta": "strong"}, "posttrain.beta must be a number"),
    ({"max_steps": 2}, "posttrain needs --sft DATA, --dpo DATA or both"),
    ({"sft": "x", "mt_bench": "yes"}, "posttrain.mt_bench must be true or false"),
])
def test_a_bad_posttrain_section_is_refused_before_any_work(dataset, tmp_path, capsys, section, message):  # noqa: F811
    refused(capsys, ["family", "run", _family_yaml(tmp_path, section), "--data", dataset,
                     "--out", str(tmp_path / "fam")], message)
    assert not (tmp_path / "fam").exists()


@pytest.mark.slow
def test_under_torchrun_every_rank_trains_and_rank_0_alone_writes(family, chat_files, tmp_path):
    sft, prefs = chat_files
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "growfam",
                          "posttrain", str(family / "progressive" / "large"), "--sft", str(sft), "--dpo", str(prefs),
                          *FAST, "--mt-bench", "--max-new-tokens", "2", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("SFT held-out before") == 1 and run.stdout.count("SFT on") == 1  # rank 0 prints
    result = json.loads((out / "progressive" / "large" / "result.json").read_text())
    assert result["sft"]["steps"] == 3 and result["dpo"]["steps"] == 3
    answers = (out / "mt_bench" / "model_answer" / "progressive-large.jsonl").read_text().splitlines()
    assert len(answers) == 80
    assert AutoModelForCausalLM.from_pretrained(out / "progressive" / "large" / "model") is not None
