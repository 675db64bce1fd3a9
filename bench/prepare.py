"""Data preparation throughput against the tokenizer's own speed, in one run: `growfam data
prepare`'s tokens/s (GPT-2 BPE, from a JSONL file of the documents: its worker processes read,
tokenise and write shards) and tiktoken's raw `encode_ordinary_batch` over the same documents in
memory on as many threads, and the peak memory (the preparing process and its largest worker) at
two corpus sizes, each in a fresh process.

    python bench/prepare.py embedded --max-chars 20e6 --workers 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from itertools import accumulate
from pathlib import Path

from _script import run
from growfam.data import prepare
from growfam.data.sources import open_source
from growfam.data.tokenizer import TiktokenGPT2
from growfam.text import text_table

_PEAK = """
import resource, sys
from growfam.data import prepare
ds = prepare(sys.argv[1], "gpt2", sys.argv[2], workers=int(sys.argv[3]), shard_tokens=int(sys.argv[4]), progress=False)
# VmHWM, not RUSAGE_SELF: ru_maxrss survives exec, so it would count the benchmark's own memory
own = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # forked after exec: this process's pages on
print(ds.num_tokens("train") + ds.num_tokens("val"), max(own, workers))
"""


def documents(spec: str, max_chars: int) -> list[str]:
    """The source's first documents, about `max_chars` characters in all, in memory; a source
    shorter than that is read again from the start (a larger corpus of the same text)."""
    docs, size = [], 0
    while True:
        for doc in open_source(spec):
            docs.append(doc)
            size += len(doc)
            if size >= max_chars:
                return docs
        if not docs:
            raise SystemExit(f"{spec}: no documents")


def first_chars(docs: list[str], chars: float) -> list[str]:
    """The first documents of `docs` that hold `chars` characters (all of them when they hold fewer)."""
    return docs[: next(i for i, n in enumerate(accumulate(map(len, docs)), 1) if n >= chars or i == len(docs))]


def write_jsonl(docs: list[str], path: Path) -> Path:
    with path.open("w") as file:
        file.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    return path


def peak_mib(corpus: Path, workers: int, shard_tokens: int, scratch: Path) -> tuple[int, float]:
    """(tokens written, peak resident memory in MiB of the preparing process or its largest
    worker) of a fresh process preparing the JSONL file `corpus`."""
    out = scratch / f"peak-{corpus.stem}"
    done = subprocess.run([sys.executable, "-c", _PEAK, str(corpus), str(out), str(workers), str(shard_tokens)],
                          capture_output=True, text=True, check=True)
    written, peak = done.stdout.split()[-2:]
    return int(written), int(peak) / 1024  # ru_maxrss is in KiB on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", help="a source: embedded, a .txt/.jsonl/.parquet file or folder")
    parser.add_argument("--max-chars", type=float, default=20e6, help="characters timed (both sides)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (growfam), threads (tiktoken)")
    parser.add_argument("--shard-tokens", type=float, default=1e6,
                        help="growfam's --shard-tokens: units of about 4x this many bytes, shared among the workers")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (the best is kept)")
    parser.add_argument("--memory-chars", type=float, default=5e6,
                        help="the smaller of the two corpora measured for memory (the other is 4x)")
    args = parser.parse_args()
    docs = documents(args.corpus, int(max(args.max_chars, 4 * args.memory_chars)))
    timed = first_chars(docs, args.max_chars)
    chars = sum(len(d) for d in timed)
    encoding = TiktokenGPT2()._enc
    encoding.encode_ordinary_batch(timed[:100], num_threads=args.workers)  # warm up
    shard_tokens = int(args.shard_tokens)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        corpus = write_jsonl(timed, scratch / "corpus.jsonl")
        few = write_jsonl(timed[:20], scratch / "few.jsonl")
        raw, ours, fixed, tokens = float("inf"), float("inf"), float("inf"), 0
        for k in range(args.repeats):  # alternated, so a busy moment hits both
            start = time.perf_counter()
            tokens = sum(len(ids) for ids in encoding.encode_ordinary_batch(timed, num_threads=args.workers))
            raw = min(raw, time.perf_counter() - start)
            start = time.perf_counter()
            dataset = prepare(corpus, "gpt2", scratch / f"ds{k}", workers=args.workers, shard_tokens=shard_tokens,
                              progress=False)
            ours = min(ours, time.perf_counter() - start)
            # the cost that does not grow with the corpus (loading and saving the tokenizer, the
            # index, starting the workers): a preparation of a few documents
            start = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):  # its empty validation split is expected
                prepare(few, "gpt2", scratch / f"few{k}", workers=args.workers, val_fraction=0.0, progress=False)
            fixed = min(fixed, time.perf_counter() - start)
        written = dataset.num_tokens("train") + dataset.num_tokens("val")
        units = len(json.loads((dataset.path / "prepare.json").read_text())["units"])
        sizes = [int(args.memory_chars), int(4 * args.memory_chars)]
        memory = []
        for size in sizes:
            part = write_jsonl(first_chars(docs, size), scratch / f"mem{size}.jsonl")
            memory.append(peak_mib(part, args.workers, shard_tokens, scratch))
    steady = max(ours - fixed, 1e-9)
    rows = [["", "seconds", "tokens", "tokens/s"],
            ["tiktoken encode_ordinary_batch", f"{raw:.2f}", f"{tokens:,}", f"{tokens / raw:,.0f}"],
            ["growfam data prepare (JSONL), end to end", f"{ours:.2f}", f"{written:,}", f"{written / ours:,.0f}"],
            ["  its fixed cost (20 documents)", f"{fixed:.2f}", "", ""],
            ["  the rest, per token", f"{steady:.2f}", f"{written:,}", f"{written / steady:,.0f}"]]
    print(f"{len(timed):,} documents, {chars:,} characters of {args.corpus}; {args.workers} workers; "
          f"{units} units of work; best of {args.repeats}")
    print("\n".join(text_table(rows)))
    print(f"growfam / tiktoken raw: {(written / ours) / (tokens / raw):.2f} x end to end, "
          f"{(written / steady) / (tokens / raw):.2f} x without the fixed cost (target >= 0.8)")
    print("peak memory of a preparation: " + ", ".join(f"{mib:.0f} MiB for {n:,} tokens" for n, mib in memory))
    return 0


if __name__ == "__main__":
    run(main)
