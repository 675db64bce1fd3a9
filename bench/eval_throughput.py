"""Zero-shot scoring throughput: growfam's evaluation path vs plain lm_eval, one run.

Both score the same loglikelihood requests (the first `--limit` examples of each task, built
by lm_eval's own tasks over growfam's offline data) of the same member directory:

- plain lm_eval: `HFLM(pretrained=DIR, tokenizer=DIR)`, lm_eval loading the directory itself;
- growfam: the path `growfam eval` takes (growfam.eval.harness: transformers model from the
  directory, safetensors only, handed to `HFLM(pretrained=model, tokenizer=tok)` in memory by
  `make_lm`, which gives choice tasks at least 2048 tokens of context).

It also times a floor that no lm_eval model class which runs every request's tokens through the
model can beat: the transformer body alone (no output head, no log-softmax, no Python per
request) over the same requests, sorted by length and batched alike. The closer lm_eval's time
is to it, the less an own model class could gain. Rounds alternate between the paths (a busy
machine's slow moments hit all of them); the best round of each is reported, and the two
paths' log-likelihoods are checked to agree.

    python bench/eval_throughput.py growfam-demo/progressive/tiny-4
    python bench/eval_throughput.py DIR --tasks arc_easy,hellaswag,piqa --limit 100 --batch-size 32
"""

from __future__ import annotations

import argparse
import time

import torch

from growfam.eval.harness import load_hf_model, load_hf_tokenizer, make_lm, offline
from growfam.eval.tasks import prepare_tasks


def build_requests(names: list[str], limit: int):
    """lm_eval Instances of the loglikelihood requests of `names` (first `limit` examples each)."""
    from lm_eval.tasks import TaskManager

    configs, _ = prepare_tasks(names)
    loaded = TaskManager(include_path=str(configs), include_defaults=False).load([f"growfam_{n}" for n in names])
    requests = []
    for task in loaded["tasks"].values():
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        requests += [r for r in task.instances if r.request_type == "loglikelihood"]
    return requests


def score(lm, requests) -> tuple[float, list[float]]:
    start = time.perf_counter()
    out = lm.loglikelihood(requests, disable_tqdm=True)
    return time.perf_counter() - start, [ll for ll, _ in out]


@torch.no_grad()
def body_floor(model, token_lists: list[list[int]], batch_size: int, device) -> float:
    """Seconds for the transformer body over every request's tokens, longest first, batched."""
    ordered = sorted(token_lists, key=len, reverse=True)
    start = time.perf_counter()
    for i in range(0, len(ordered), batch_size):
        batch = ordered[i:i + batch_size]
        ids = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)
        for row, toks in enumerate(batch):
            ids[row, :len(toks)] = torch.tensor(toks)
        model.model(ids.to(device))
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("member", help="a member directory (with its tokenizer)")
    parser.add_argument("--tasks", default="arc_easy,hellaswag,piqa,lambada_openai")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    offline()
    from lm_eval.models.huggingface import HFLM

    requests = build_requests(args.tasks.split(","), args.limit)
    model, tokenizer = load_hf_model(args.member, args.device), load_hf_tokenizer(args.member)
    growfam_lm = make_lm(model, tokenizer, args.batch_size, args.device)
    plain_lm = HFLM(pretrained=args.member, tokenizer=args.member, batch_size=args.batch_size,
                    device=args.device, dtype="float32")
    token_lists = []
    for r in requests:
        context, continuation = growfam_lm._encode_pair(*r.args)
        token_lists.append((context + continuation)[-(plain_lm.max_length + 1):][:-1])
    tokens = sum(len(t) for t in token_lists)
    for name, lm in (("plain", plain_lm), ("growfam", growfam_lm)):
        print(f"{name}: attention {lm.model.config._attn_implementation}, {lm.model.dtype}, max_length {lm.max_length}")
    print(f"{len(requests)} requests ({args.tasks}, first {args.limit} examples each), {tokens:,} tokens; "
          f"{args.member}, batch {args.batch_size}, {args.device}, {torch.get_num_threads()} threads")
    times = {"plain lm_eval (HFLM from the directory)": [], "growfam eval path": [], "body only (floor)": []}
    for round_ in range(args.rounds):
        paths = [("plain lm_eval (HFLM from the directory)", plain_lm), ("growfam eval path", growfam_lm)]
        scores = {}
        for name, lm in paths if round_ % 2 == 0 else paths[::-1]:  # alternate who goes first
            seconds, scores[name] = score(lm, requests)
            times[name].append(seconds)
        times["body only (floor)"].append(body_floor(model, token_lists, args.batch_size, args.device))
        worst = max(abs(a - b) for a, b in zip(*scores.values()))
    base = min(times["plain lm_eval (HFLM from the directory)"])
    print(f"{'path':42} {'best s':>8} {'requests/s':>11} {'tokens/s':>10} {'vs plain':>9}  rounds (s)")
    for name, seconds in times.items():
        best = min(seconds)
        print(f"{name:42} {best:8.2f} {len(requests) / best:11.1f} {tokens / best:10,.0f} {base / best:8.2f}x  "
              + " ".join(f"{x:.1f}" for x in seconds))
    print(f"max |log-likelihood difference| between the two paths: {worst:.2e}")


if __name__ == "__main__":
    main()
