"""Benchmark: expand a ~1B model (random bf16 weights) into the next preset on the CPU.

    python bench/expand.py [--source paper-1b] [--target paper-2b] [--width aki] [--depth stack]
                           [--free-source] [--rounds 3]

Each round times a plain copy of the target's bytes into fresh memory
(`torch.empty_like(x).copy_(x)`) and then `growfam.grow.expand`, in the same process, and
reads the expansion's peak resident memory (VmHWM from /proc/self/status, reset before it;
minus the process's footprint before the source model existed and the baseline's bytes)
against the source + target bytes. Targets: expansion within 3x of the copy time, peak <= 1.5x source + target bytes.
A child process first touches 1.6x those bytes: on a VM whose memory the host backs lazily,
first touches are slow, and both timings should see the same, warm, memory.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import time

import torch

from growfam.grow import expand
from growfam.model import Llama, get_preset, num_params


def proc_status_bytes(key: str) -> int:
    """A memory figure of this process (VmRSS, VmHWM) from /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def random_model(name: str, dtype: torch.dtype) -> Llama:
    """A preset with random weights, built in `dtype` directly (no float32 copy of the model)."""
    with torch.device("meta"):
        model = Llama(get_preset(name))
    model = model.to(dtype).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5, generator=generator)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    return model


def prewarm(n_bytes: int) -> None:
    """Touch n_bytes of memory in a child process that then exits. On a VM whose memory the
    host backs lazily, the first touch of a page costs far more than any later one; without
    this the expansion (run first) would pay that and the copy baseline (run later) not."""
    code = f"import torch; torch.ones({n_bytes}, dtype=torch.uint8)"
    subprocess.run([sys.executable, "-c", code], check=True)


def nbytes(model: Llama) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def timed(fn) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of fn(). CPU time is reported as well
    because a shared machine's other processes inflate wall time, not CPU time."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def reset_peak() -> None:
    """Restart VmHWM at the current RSS (Linux >= 4.0), so each round measures its own peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def copy_round(x: torch.Tensor) -> tuple[float, float]:
    """(wall, CPU) seconds to copy x into freshly allocated memory, as the expansion writes
    its target."""
    wall, cpu, _ = timed(lambda: torch.empty_like(x).copy_(x))
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="paper-1b")
    parser.add_argument("--target", default="paper-2b")
    parser.add_argument("--width", default="aki")
    parser.add_argument("--depth", default="stack")
    parser.add_argument("--free-source", action="store_true",
                        help="release source tensors as they are used (one round only)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (copy, expansion)")
    args = parser.parse_args()
    dtype = torch.bfloat16
    src_bytes, tgt_bytes = (2 * num_params(get_preset(n)) for n in (args.source, args.target))
    prewarm(int(1.6 * (src_bytes + tgt_bytes)))

    base = proc_status_bytes("VmRSS")
    wall, _, source = timed(lambda: random_model(args.source, dtype))
    assert nbytes(source) == src_bytes
    print(f"source {args.source}: {src_bytes / 1e9:.2f} GB bf16 (built in {wall:.1f} s); "
          f"target {args.target}: {tgt_bytes / 1e9:.2f} GB; width={args.width} "
          f"depth={args.depth}{' free-source' if args.free_source else ''}; "
          f"torch threads {torch.get_num_threads()}")
    # The bytes the baseline copies live through all rounds, so that the copy and the expansion
    # both write into the memory the other one just freed; the peak below excludes them.
    x = torch.ones(tgt_bytes // 2, dtype=dtype)
    base += x.numel() * x.element_size()
    print(f"{'round':>5} {'copy wall':>10} {'CPU':>7} {'expand wall':>12} {'CPU':>7} "
          f"{'ratio wall':>11} {'CPU':>6} {'peak GB':>8} {'/ (src+tgt)':>12}")
    rounds = []
    for i in range(1 if args.free_source else args.rounds):
        copy = copy_round(x)
        gc.collect()
        reset_peak()
        exp_wall, exp_cpu, (grown, _, _) = timed(lambda: expand(
            source, args.target, args.width, args.depth, free_source=args.free_source))
        used = proc_status_bytes("VmHWM") - base
        assert nbytes(grown) == tgt_bytes
        del grown
        gc.collect()
        rounds.append((copy[0], copy[1], exp_wall, exp_cpu, used))
        print(f"{i + 1:>5} {copy[0]:>10.2f} {copy[1]:>7.2f} {exp_wall:>12.2f} {exp_cpu:>7.2f} "
              f"{exp_wall / copy[0]:>10.2f}x {exp_cpu / copy[1]:>5.2f}x {used / 1e9:>8.2f} "
              f"{used / (src_bytes + tgt_bytes):>11.2f}x")
    best = [min(r[k] for r in rounds) for k in range(5)]
    print(f"best: expansion / copy = {best[2] / best[0]:.2f}x wall, {best[3] / best[1]:.2f}x CPU "
          f"(target <= 3x); peak {max(r[4] for r in rounds) / 1e9:.2f} GB above the "
          f"{base / 1e9:.2f} GB before the source (and the copy's bytes) = "
          f"{max(r[4] for r in rounds) / (src_bytes + tgt_bytes):.2f}x source + target bytes "
          f"(target <= 1.5x)")


if __name__ == "__main__":
    main()
