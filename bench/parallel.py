"""Benchmark: the trainer's parallel strategies (train/parallel.py), one step as train() takes it.

A step is the loop's: forward and backward over the micro-batches in the strategy's context
(DDP's no_sync before the last), the loss averaged over ranks, the gradients reduced, clipped
at 1.0, AdamW, zero_grad. Warm-up steps are excluded; the median step gives tokens/s.

CPU (default): 2 processes (gloo), DDP against the per-tensor averaging (strategy "none":
one all_reduce per gradient after the backward pass). Both models live at once and are
timed alternately, step by step, so a shared machine's busy moments hit both. Target:
DDP / per-tensor >= 1.0.

    python bench/parallel.py                       # ~5M-parameter model, 2 ranks, 2 micro-batches
    python bench/parallel.py --model tiny-4 --steps 20

GPU (--gpu, one GPU, one process, bf16): paper-1b tokens/s and MFU with FSDP2 (a group of one:
bf16 parameters, fp32 gradient reduction, each block compiled) against the plain model (the
whole loss compiled, bf16 autocast); then the largest paper preset that trains with FSDP2 +
activation checkpointing, with its peak memory. Each configuration is tried alone: one that
fails (out of memory, a compile error) is reported and the next one runs; `--budget` seconds
bound the whole run (configurations not started in time are reported as skipped).

    python bench/parallel.py --gpu                 # paper-1b, seq 1024, batch 8; then 8b, 4b, 2b
    python bench/parallel.py --gpu --device cpu --model tiny-1 --largest tiny-4 --seq-len 64 --steps 2
                                                   # the same code path on a CPU (a smoke test)
"""

from __future__ import annotations

import argparse
import functools
import gc
import socket
import statistics
import time
import traceback

import torch

from growfam.model import Llama, ModelConfig, flops_per_token, num_params, resolve_config
from growfam.train import TrainConfig, forward_backward, make_optimizer
from growfam.train.config import ParallelConfig
from growfam.train.metrics import peak_flops
from growfam.train.parallel import make_parallelism

#: ~5M parameters (head_dim 64): gradients large enough for their reduction to show on a CPU.
BENCH_5M = ModelConfig(d_model=256, n_layers=4, n_heads=4, ffn_dim=896, vocab_size=4096, max_seq_len=256,
                       name="bench-5m")


def build(cfg: ModelConfig, options: ParallelConfig, device: str, compile_loss: bool = False):
    """The model, optimizer and step(batches) -> loss of one strategy, set up as train() does
    (the model initialised on the device itself: the bench needs no seeded CPU copy)."""
    parallel = make_parallelism(device, options, "auto")
    with torch.device("meta"):
        skeleton = Llama(cfg)
    model = parallel.wrap(skeleton)
    torch.manual_seed(0)
    model.reset_parameters()
    optimizer = make_optimizer(model, TrainConfig(max_steps=1), parallel.device, fused=parallel.fused_adamw)
    loss_fn = torch.compile(parallel.loss_fn(model)) if compile_loss else parallel.loss_fn(model)
    amp = torch.bfloat16 if parallel.device.type == "cuda" else None
    micro_batch = functools.partial(parallel.micro_batch, model)

    def step(batches) -> torch.Tensor:
        loss = forward_backward(loss_fn, batches, parallel.device, amp, micro_batch)
        parallel.average([loss])
        parallel.reduce_gradients(model)
        parallel.clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return parallel, step


def batches(cfg: ModelConfig, micro: int, accum: int, seq_len: int, device) -> list:
    out = []
    for _ in range(accum):
        x = torch.randint(0, cfg.vocab_size, (micro, seq_len + 1))
        out.append((x[:, :-1].to(device), x[:, 1:].to(device)))
    return out


def timed(step, data, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step(data)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# CPU: 2 processes
# --------------------------------------------------------------------------------------------


def _cpu_rank(rank: int, port: int, args, cfg: ModelConfig) -> None:
    torch.set_num_threads(args.threads)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    device = torch.device("cpu")
    steps = {name: build(cfg, ParallelConfig(strategy=name), "cpu")[1] for name in ("none", "ddp")}
    data = batches(cfg, args.micro, args.accum, args.seq_len, device)
    times = {name: [] for name in steps}
    for i in range(args.warmup + args.steps):
        for name in ("none", "ddp") if i % 2 == 0 else ("ddp", "none"):
            torch.distributed.barrier()  # each step starts together on both ranks
            seconds = timed(steps[name], data, device)
            if i >= args.warmup:
                times[name].append(seconds)
    if rank == 0:
        tokens = 2 * args.accum * args.micro * args.seq_len
        rate = {name: tokens / statistics.median(t) for name, t in times.items()}
        print(f"model {cfg.name}: {num_params(cfg) / 1e6:.1f}M params, 2 ranks (gloo, {args.threads} thread(s) each), "
              f"{args.accum} micro-batches of {args.micro} x {args.seq_len} per rank, fp32")
        for name, label in (("none", "per-tensor all_reduce"), ("ddp", "DDP")):
            print(f"{label:>22}: {rate[name]:>10,.0f} tokens/s  (median step {statistics.median(times[name]) * 1e3:.0f} ms)")
        print(f"{'ratio DDP / per-tensor':>22}: {rate['ddp'] / rate['none']:.3f}")
    torch.distributed.destroy_process_group()


def cpu(args) -> None:
    cfg = BENCH_5M if args.model == "bench-5m" else resolve_config(args.model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_cpu_rank, args=(port, args, cfg), nprocs=2)


# --------------------------------------------------------------------------------------------
# GPU: one process
# --------------------------------------------------------------------------------------------


def release() -> None:
    """Free what the last configuration left: compiled code, its tensors, the cached blocks."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gpu_config(label: str, cfg: ModelConfig, options: ParallelConfig, args, compile_loss: bool = False) -> bool:
    """Time one configuration and print its line; False when it failed (reported, not raised)."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    release()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    step = None
    try:
        _, step = build(cfg, options, args.device, compile_loss and cuda)
        data = batches(cfg, args.batch, 1, args.seq_len, device)
        for _ in range(args.warmup):
            timed(step, data, device)
        times = [timed(step, data, device) for _ in range(args.steps)]
    except Exception as err:  # noqa: BLE001 -- out of memory, compile failures: report and go on
        what = "out of memory" if isinstance(err, torch.OutOfMemoryError) else \
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        print(f"{label:>34}: failed ({what}) after {time.perf_counter() - started:.0f} s", flush=True)
        if args.verbose and not isinstance(err, torch.OutOfMemoryError):
            traceback.print_exc()
        return False
    finally:
        del step
        release()
    rate = args.batch * args.seq_len / statistics.median(times)
    peak = peak_flops(device)
    mfu = f"  MFU {flops_per_token(cfg, args.seq_len) * rate / peak:.1%}" if peak else ""
    memory = f"  peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if cuda else ""
    print(f"{label:>34}: {rate:>10,.0f} tokens/s{mfu}{memory}  ({time.perf_counter() - started:.0f} s)", flush=True)
    return True


def gpu(args) -> None:
    start = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = resolve_config(args.model)
    where = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"{where}: {cfg.name} ({num_params(cfg) / 1e9:.2f}B params), batch {args.batch} x "
          f"seq {args.seq_len}, bf16", flush=True)
    runs = [(f"{cfg.name} plain, loss compiled", cfg, ParallelConfig(strategy="none"), True),
            (f"{cfg.name} FSDP2, blocks compiled", cfg, ParallelConfig(strategy="fsdp", compile=True), False)]
    for name in args.largest:
        runs.append((f"{name} FSDP2 + act. ckpt", resolve_config(name),
                     ParallelConfig(strategy="fsdp", activation_checkpointing=True), False))
    largest_done = False
    for label, model_cfg, options, compile_loss in runs:
        if time.perf_counter() - start > args.budget:
            print(f"{label:>34}: skipped (the {args.budget:.0f} s budget is spent)", flush=True)
            continue
        if options.activation_checkpointing and largest_done:
            continue  # a smaller preset than one that trained
        ok = gpu_config(label, model_cfg, options, args, compile_loss)
        largest_done = largest_done or (ok and options.activation_checkpointing)
    print(f"total {time.perf_counter() - start:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the one-GPU figures (see above)")
    parser.add_argument("--model", help="preset or config (default: bench-5m on CPU, paper-1b with --gpu)")
    parser.add_argument("--largest", nargs="+", default=["paper-8b", "paper-4b", "paper-2b"], metavar="PRESET",
                        help="--gpu: presets to try with FSDP2 + activation checkpointing, largest first")
    parser.add_argument("--seq-len", type=int, help="default: 128 on CPU, 1024 with --gpu")
    parser.add_argument("--batch", type=int, default=8, help="--gpu: sequences per step")
    parser.add_argument("--micro", type=int, default=4, help="CPU: sequences per micro-batch per rank")
    parser.add_argument("--accum", type=int, default=2, help="CPU: micro-batches per step per rank")
    parser.add_argument("--threads", type=int, default=1, help="CPU: threads per rank")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--budget", type=float, default=420, help="--gpu: seconds after which no configuration starts")
    parser.add_argument("--verbose", action="store_true", help="--gpu: tracebacks of failed configurations")
    parser.add_argument("--device", default="cuda", help="--gpu: the device (cpu: a smoke test of this mode)")
    args = parser.parse_args()
    args.model = args.model or ("paper-1b" if args.gpu else "bench-5m")
    args.seq_len = args.seq_len or (1024 if args.gpu else 128)
    gpu(args) if args.gpu else cpu(args)


if __name__ == "__main__":
    main()
