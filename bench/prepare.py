"""Data preparation throughput against the tokenizer's own speed, in one run: `growfam data
prepare`'s tokens/s (GPT-2 BPE) and tiktoken's raw `encode_ordinary_batch` over the same
documents on the same threads, and the peak memory of a preparation at two corpus sizes
(each in a fresh process, streaming from the source).

    python bench/prepare.py embedded --max-chars 20e6 --workers 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _script import run
from growfam.data import prepare
from growfam.data.sources import open_source
from growfam.data.tokenizer import TiktokenGPT2
from growfam.text import text_table

_PEAK = """
import resource, sys
from growfam.data import prepare
ds = prepare(sys.argv[1], "gpt2", sys.argv[2], max_tokens=int(sys.argv[3]), workers=int(sys.argv[4]), progress=False)
print(ds.num_tokens("train") + ds.num_tokens("val"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def documents(spec: str, max_chars: int) -> list[str]:
    """The source's first documents, about `max_chars` characters in all, in memory."""
    docs, size = [], 0
    for doc in open_source(spec):
        docs.append(doc)
        size += len(doc)
        if size >= max_chars:
            break
    return docs


def peak_mib(spec: str, tokens: int, workers: int, scratch: Path) -> tuple[int, float]:
    """(tokens written, peak resident memory in MiB) of a fresh process preparing up to
    `tokens` tokens of `spec`."""
    out = scratch / f"peak-{tokens}"
    done = subprocess.run([sys.executable, "-c", _PEAK, spec, str(out), str(tokens), str(workers)],
                          capture_output=True, text=True, check=True)
    written, peak = done.stdout.split()[-2:]
    return int(written), int(peak) / 1024  # ru_maxrss is in KiB on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", help="a source: embedded, a .txt/.jsonl/.parquet file or folder")
    parser.add_argument("--max-chars", type=float, default=20e6, help="characters timed (both sides)")
    parser.add_argument("--workers", type=int, default=2, help="threads, both sides")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (the best is kept)")
    parser.add_argument("--memory-tokens", type=float, default=5e6,
                        help="the smaller of the two preparations measured for memory (the other is 4x)")
    args = parser.parse_args()
    docs = documents(args.corpus, int(args.max_chars))
    chars = sum(len(d) for d in docs)
    encoding = TiktokenGPT2()._enc
    encoding.encode_ordinary_batch(docs[:100], num_threads=args.workers)  # warm up
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        raw, ours, fixed, tokens = float("inf"), float("inf"), float("inf"), 0
        for k in range(args.repeats):  # alternated, so a busy moment hits both
            start = time.perf_counter()
            tokens = sum(len(ids) for ids in encoding.encode_ordinary_batch(docs, num_threads=args.workers))
            raw = min(raw, time.perf_counter() - start)
            start = time.perf_counter()
            dataset = prepare(docs, "gpt2", scratch / f"ds{k}", workers=args.workers, progress=False)
            ours = min(ours, time.perf_counter() - start)
            # the cost that does not grow with the corpus (loading and saving the tokenizer, the
            # index): a preparation of a few documents
            start = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):  # its empty validation split is expected
                prepare(docs[:20], "gpt2", scratch / f"few{k}", workers=args.workers, val_fraction=0.0,
                        progress=False)
            fixed = min(fixed, time.perf_counter() - start)
        written = dataset.num_tokens("train") + dataset.num_tokens("val")
        small = int(args.memory_tokens)
        memory = [peak_mib(args.corpus, n, args.workers, scratch) for n in (small, 4 * small)]
    steady = max(ours - fixed, 1e-9)
    rows = [["", "seconds", "tokens", "tokens/s"],
            ["tiktoken encode_ordinary_batch", f"{raw:.2f}", f"{tokens:,}", f"{tokens / raw:,.0f}"],
            ["growfam data prepare, end to end", f"{ours:.2f}", f"{written:,}", f"{written / ours:,.0f}"],
            ["  its fixed cost (20 documents)", f"{fixed:.2f}", "", ""],
            ["  the rest, per token", f"{steady:.2f}", f"{written:,}", f"{written / steady:,.0f}"]]
    print(f"{len(docs):,} documents, {chars:,} characters of {args.corpus}; {args.workers} threads; "
          f"best of {args.repeats}")
    print("\n".join(text_table(rows)))
    print(f"growfam / tiktoken raw: {(written / ours) / (tokens / raw):.2f} x end to end, "
          f"{(written / steady) / (tokens / raw):.2f} x without the fixed cost (target >= 0.8)")
    print("peak memory of a preparation: " + ", ".join(f"{mib:.0f} MiB for {n:,} tokens" for n, mib in memory))
    return 0


if __name__ == "__main__":
    run(main)
