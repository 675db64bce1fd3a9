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

GPU (--gpu, one GPU, one process, bf16): paper-1b tokens/s and MFU with the plain model (bf16
autocast, the whole loss compiled; also with micro-batches twice as large, with cuDNN's
attention tried before FlashAttention, and with the head and loss fused in chunks of 1024
tokens) and with FSDP2 (a group of one: bf16 parameters, fp32 gradient reduction, each block
compiled; also with the blocks kept gathered between forward and backward), each at 1 and at 8
micro-batches per optimizer step: the paper's batch of 960 sequences is 120 micro-batches of 8
on one GPU, so the update's share of a real step is far below its share of a one-micro-batch
step. Each line also gives the two halves of the step (forward+backward per micro-batch; the
update: clipping, AdamW, zero_grad). `--profile` adds, per configuration, where one step's
device time goes (matmuls, attention, cross-entropy, optimizer, compiled fusions, copies) and
how much of the wall time the GPU sat idle. Then the largest paper preset that trains with
FSDP2 + activation checkpointing, with its peak memory. Each configuration is tried alone: one
that fails (out of memory, a compile error) is reported and the next one runs; `--budget`
seconds bound the whole run (configurations not started in time are reported as skipped).

    python bench/parallel.py --gpu --profile       # paper-1b, seq 1024, micro-batch 8; then 8b, 4b, 2b
    python bench/parallel.py --gpu --device cpu --model tiny-1 --largest tiny-4 --seq-len 64 --steps 2
                                                   # the same code path on a CPU (a smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
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


def build(cfg: ModelConfig, options: ParallelConfig, device: str, compile_loss: bool = False,
          attention: str | None = None):
    """The strategy, a step's two halves as train() takes them — micro(batches) -> loss (forward
    and backward over the micro-batches, the loss averaged over ranks) and update() (gradients
    reduced, clipped at 1.0, AdamW, zero_grad) — and step(batches) -> loss doing both. The model
    is initialised on the device itself: the bench needs no seeded CPU copy. attention: an SDPA
    backend tried first ("cudnn", "flash"; None: PyTorch's own order), compiled code included."""
    parallel = make_parallelism(device, options, "auto")
    with torch.device("meta"):
        skeleton = Llama(cfg)
    model = parallel.wrap(skeleton)
    torch.manual_seed(0)
    model.reset_parameters()
    optimizer = make_optimizer(model, TrainConfig(max_steps=1), parallel.device)
    loss_fn = torch.compile(parallel.loss_fn(model)) if compile_loss else parallel.loss_fn(model)
    amp = torch.bfloat16 if parallel.device.type == "cuda" else None
    micro_batch = functools.partial(parallel.micro_batch, model)

    def micro(batches) -> torch.Tensor:
        with sdpa_first(attention):
            loss = forward_backward(loss_fn, batches, parallel.device, amp, micro_batch)
        parallel.average([loss])
        return loss

    def update() -> None:
        parallel.reduce_gradients(model)
        parallel.clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step(batches) -> torch.Tensor:
        loss = micro(batches)
        update()
        return loss

    return parallel, step, micro, update


def sdpa_first(backend: str | None):
    """A context in which SDPA tries `backend` first, then the others in PyTorch's order."""
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    rest = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel([first] + [b for b in rest if b != first], set_priority=True)


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


def timed_split(micro, update, data, device: torch.device) -> tuple[float, float]:
    """Seconds of one step's two halves: the micro-batches' forward and backward, the update."""
    if device.type != "cuda":
        start = time.perf_counter()
        micro(data)
        middle = time.perf_counter()
        update()
        return middle - start, time.perf_counter() - middle
    events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
    events[0].record()
    micro(data)
    events[1].record()
    update()
    events[2].record()
    events[2].synchronize()
    return events[0].elapsed_time(events[1]) / 1e3, events[1].elapsed_time(events[2]) / 1e3


#: Where a profiled step's device time goes, by kernel name (first match wins, case ignored).
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "norm_reduce", "clip")),
    ("cross-entropy", ("log_softmax", "nll_loss", "cross_entropy", "logsumexp")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "matmul", "aten::mm", "aten::addmm", "aten::bmm")),
    ("communication", ("nccl", "all_gather", "reduce_scatter", "allreduce", "gloo")),
    ("fused by the compiler", ("triton_",)),
    ("copies and casts", ("memcpy", "memset", "copy", "cat", "fill")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in lowered for k in keys)), "other (elementwise, norms)")


def profile_step(step, data, device: torch.device, top: int) -> None:
    """Profile one step and print where its time goes: device time by kind of kernel, the
    device's idle share of the wall time (launch overheads, host syncs), the top kernels. On a
    CPU the operators' self time stands in for kernels (a smoke test of this mode)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    step(data)  # a step outside the profile: nothing left to compile or allocate
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        step(data)
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    if cuda:
        rows = [(e.key, e.self_device_time_total) for e in prof.key_averages()
                if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
    else:  # operators only: their self time adds up to the step, kernels nested in them do not
        rows = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()
                if e.key.startswith("aten::") and e.self_cpu_time_total > 0]
    busy = sum(us for _, us in rows) / 1e6
    kinds: dict[str, float] = {}
    for name, us in rows:
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + us / 1e6
    what = "device" if cuda else "operator self"
    print(f"  profile of a step of one micro-batch: wall {wall * 1e3:.1f} ms, {what} time {busy * 1e3:.1f} ms "
          f"({busy / wall:.0%} of the wall time busy)")
    for kind, seconds in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"    {kind:>32}: {seconds * 1e3:8.1f} ms  {seconds / busy:6.1%}")
    print(f"  top {top} kernels:")
    for name, us in sorted(rows, key=lambda r: -r[1])[:top]:
        print(f"    {us / 1e3:8.2f} ms  {kernel_kind(name)[:14]:>14}  {name[:90]}")


def gpu_config(label: str, cfg: ModelConfig, options: ParallelConfig, args, *, batch: int, accums: list[int],
               compile_loss: bool = False, attention: str | None = None) -> bool:
    """Time one configuration at each of `accums` micro-batches per step, one line each (then
    profile one step with --profile); False when it failed (reported, not raised)."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    release()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    step = micro = update = None
    try:
        _, step, micro, update = build(cfg, options, args.device, compile_loss and cuda, attention)
        for accum in accums:
            data = batches(cfg, batch, accum, args.seq_len, device)
            for _ in range(args.warmup):
                timed_split(micro, update, data, device)
            halves = [timed_split(micro, update, data, device) for _ in range(args.steps)]
            report(f"{label}, {batch} x {accum}", cfg, accum * batch * args.seq_len, halves, accum, args)
        if args.profile:
            try:
                profile_step(step, batches(cfg, batch, 1, args.seq_len, device), device, args.top)
            except Exception as err:  # noqa: BLE001 -- the timings above stand; say why the profile did not
                print(f"  profile failed: {type(err).__name__}: {err}", flush=True)
    except Exception as err:  # noqa: BLE001 -- out of memory, compile failures: report and go on
        what = "out of memory" if isinstance(err, torch.OutOfMemoryError) else \
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        print(f"{label:>44}: failed ({what}) after {time.perf_counter() - started:.0f} s", flush=True)
        if args.verbose and not isinstance(err, torch.OutOfMemoryError):
            traceback.print_exc()
        return False
    finally:
        del step, micro, update
        release()
    print(f"{'':>44}  ({time.perf_counter() - started:.0f} s)", flush=True)
    return True


def report(label: str, cfg: ModelConfig, tokens: int, halves: list[tuple[float, float]], accum: int, args) -> None:
    """One line: tokens/s and MFU of the median step, its two halves, the peak memory so far."""
    device = torch.device(args.device)
    rate = tokens / statistics.median(a + b for a, b in halves)
    peak = peak_flops(device)
    mfu = f"  MFU {flops_per_token(cfg, args.seq_len) * rate / peak:6.1%}" if peak else ""
    memory = f"  peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
    print(f"{label:>44}: {rate:>9,.0f} tokens/s{mfu}  "
          f"fwd+bwd {statistics.median(a for a, _ in halves) / accum * 1e3:6.1f} ms/micro-batch, "
          f"update {statistics.median(b for _, b in halves) * 1e3:5.1f} ms{memory}", flush=True)


#: The --gpu configurations: name -> (label, strategy options, whole loss compiled, micro-batch
#: size as a multiple of --batch, SDPA backend tried first).
GPU_CONFIGS = {
    "plain": ("plain, loss compiled", ParallelConfig(strategy="none"), True, 1, None),
    "fsdp": ("FSDP2, blocks compiled", ParallelConfig(strategy="fsdp", compile=True), False, 1, None),
    "plain-cudnn": ("plain, compiled, cuDNN attn", ParallelConfig(strategy="none"), True, 1, "cudnn"),
    "plain-chunked": ("plain, compiled, loss in 1024s", ParallelConfig(strategy="none", loss_chunk=1024), True, 1,
                      None),
    "fsdp-keep": ("FSDP2 kept gathered, compiled",
                  ParallelConfig(strategy="fsdp", compile=True, reshard_after_forward=False), False, 1, None),
    "plain-2x": ("plain, loss compiled", ParallelConfig(strategy="none"), True, 2, None),
}


def gpu(args) -> None:
    start = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = resolve_config(args.model)
    where = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"{where}, torch {torch.__version__}: {cfg.name} ({num_params(cfg) / 1e9:.2f}B params), "
          f"micro-batches of {args.batch} x seq {args.seq_len} (batch x micro-batches per step below), bf16; "
          f"median of {args.steps} steps after {args.warmup}", flush=True)
    runs = []
    for name in args.configs:
        label, options, compile_loss, factor, attention = GPU_CONFIGS[name]
        runs.append((f"{cfg.name} {label}", cfg, options, compile_loss, args.batch * factor, attention))
    for name in args.largest:
        runs.append((f"{name} FSDP2 + act. ckpt", resolve_config(name),
                     ParallelConfig(strategy="fsdp", activation_checkpointing=True), False, args.batch, None))
    largest_done = False
    for label, model_cfg, options, compile_loss, batch, attention in runs:
        if time.perf_counter() - start > args.budget:
            print(f"{label:>44}: skipped (the {args.budget:.0f} s budget is spent)", flush=True)
            continue
        if options.checkpoint_every and largest_done:
            continue  # a smaller preset than one that trained
        # The largest preset is timed at one micro-batch per step: its memory is the question.
        accums = args.accum[:1] if options.checkpoint_every else args.accum
        ok = gpu_config(label, model_cfg, options, args, batch=batch, accums=accums, compile_loss=compile_loss,
                        attention=attention)
        largest_done = largest_done or (ok and bool(options.checkpoint_every))
    print(f"total {time.perf_counter() - start:.0f} s")


def positive(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the one-GPU figures (see above)")
    parser.add_argument("--model", help="preset or config (default: bench-5m on CPU, paper-1b with --gpu)")
    parser.add_argument("--largest", nargs="+", default=["paper-8b", "paper-4b", "paper-2b"], metavar="PRESET",
                        help="--gpu: presets to try with FSDP2 + activation checkpointing, largest first")
    parser.add_argument("--seq-len", type=positive, help="default: 128 on CPU, 1024 with --gpu")
    parser.add_argument("--batch", type=positive, default=8, help="--gpu: sequences per micro-batch")
    parser.add_argument("--micro", type=positive, default=4, help="CPU: sequences per micro-batch per rank")
    parser.add_argument("--accum", type=positive, nargs="+", help="micro-batches per step (per rank): one number on "
                        "CPU (default 2); with --gpu each configuration is timed at each (default 1 8)")
    parser.add_argument("--configs", nargs="+", default=list(GPU_CONFIGS), choices=list(GPU_CONFIGS),
                        help="--gpu: the paper-1b configurations to time (default: all)")
    parser.add_argument("--profile", action="store_true",
                        help="--gpu: profile one step of each configuration: where its time goes")
    parser.add_argument("--top", type=positive, default=12, help="--profile: kernels to list")
    parser.add_argument("--threads", type=positive, default=1, help="CPU: threads per rank")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration")
    parser.add_argument("--steps", type=positive, default=10, help="timed steps per configuration")
    parser.add_argument("--budget", type=float, default=420, help="--gpu: seconds after which no configuration starts")
    parser.add_argument("--verbose", action="store_true", help="--gpu: tracebacks of failed configurations")
    parser.add_argument("--device", default="cuda", help="--gpu: the device (cpu: a smoke test of this mode)")
    args = parser.parse_args()
    args.model = args.model or ("paper-1b" if args.gpu else "bench-5m")
    args.seq_len = args.seq_len or (1024 if args.gpu else 128)
    args.accum = args.accum or ([1, 8] if args.gpu else [2])
    if not args.gpu:
        if len(args.accum) != 1:
            parser.error("--accum takes one number on the CPU")
        args.accum = args.accum[0]
    gpu(args) if args.gpu else cpu(args)


if __name__ == "__main__":
    main()
