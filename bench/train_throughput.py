"""Training-step throughput: growfam's Llama vs Hugging Face `LlamaForCausalLM`, one run.

Both models have the same config and weights, take the same batch, use the same optimizer
(AdamW over growfam's parameter groups, fused kernels where torch has them) and the same
precision (fp32 on CPU, bf16 autocast over fp32 weights on GPU). A step is forward, backward,
gradient clipping at 1.0, optimizer step and zero_grad, all through the trainer's own
`forward_backward`; the loss is growfam's `Llama.loss` and Hugging Face's
`model(input_ids, labels=input_ids).loss`. Warm-up steps are excluded and the median step time
gives tokens/s. On a CPU both models live at once and are timed alternately, step by step (a
shared machine's busy moments hit both); on a GPU one after the other. On a GPU whose peak is known, MFU uses the attention-inclusive FLOPs.

    python bench/train_throughput.py                      # CPU: tiny-4, seq 256, batch 8
    python bench/train_throughput.py --model bench-20m    # CPU: a ~20M-parameter model
    python bench/train_throughput.py --model paper-1b     # GPU default: seq 1024, bf16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from growfam.train.metrics import peak_flops
from growfam.model import (Llama, ModelConfig, config_to_hf, flops_per_token, hf_state_dict, num_params,
                           resolve_config)
from growfam.train import forward_backward, param_groups

#: A ~20M-parameter shape (head_dim 64, FFN 3.5·d), for a CPU figure beyond the tiny presets.
BENCH_20M = ModelConfig(d_model=384, n_layers=8, n_heads=6, ffn_dim=1344, vocab_size=8192,
                        max_seq_len=1024, name="bench-20m")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_step(kind: str, cfg: ModelConfig, device: torch.device, amp: torch.dtype | None,
               compile_: bool):
    """A closure step(x, y) doing one full optimizer step of growfam's or HF's model."""
    torch.manual_seed(0)  # the same initial weights for both
    ours = Llama(cfg)
    if kind == "growfam":
        model = ours.to(device)
        loss_fn = torch.compile(ours.loss) if compile_ else ours.loss
    else:
        model = LlamaForCausalLM(LlamaConfig(**config_to_hf(cfg)))
        model.load_state_dict(hf_state_dict(ours), strict=False)  # strict=False: a tied head re-ties
        model.to(device).train()
        forward = torch.compile(model) if compile_ else model

        def loss_fn(x, y):
            # Hugging Face's own loss path: it shifts the labels itself (T-1 targets per row).
            return forward(input_ids=x, labels=x).loss

    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95),
                                  fused=device.type in ("cuda", "cpu"))

    def step(x, y):
        forward_backward(loss_fn, [(x, y)], device, amp)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_steps(step, batch, device: torch.device, n: int) -> list[float]:
    times = []
    for _ in range(n):
        synchronize(device)
        start = time.perf_counter()
        step(*batch)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="paper-1b" if gpu else "tiny-4",
                        help="preset, config path, or bench-20m (default: paper-1b on GPU, tiny-4 on CPU)")
    parser.add_argument("--seq-len", type=int, default=1024 if gpu else 256)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="auto: bf16 autocast on GPU, fp32 on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice, all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if gpu else "cpu")
    amp = torch.bfloat16 if args.dtype == "bfloat16" or (args.dtype == "auto" and gpu) else None
    cfg = BENCH_20M if args.model == "bench-20m" else resolve_config(args.model)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1))
    batch = (x[:, :-1].to(device), x[:, 1:].to(device))
    times: dict[str, list[float]] = {}
    if gpu:  # one model at a time: two 1B models with AdamW state do not share a GPU comfortably
        for kind in ("growfam", "hf"):
            step = build_step(kind, cfg, device, amp, args.compile)
            time_steps(step, batch, device, args.warmup)
            times[kind] = time_steps(step, batch, device, args.steps)
            del step
            torch.cuda.empty_cache()
    else:  # both at once, alternating step by step, so a busy moment of a shared CPU hits both
        steps = {kind: build_step(kind, cfg, device, amp, args.compile) for kind in ("growfam", "hf")}
        for kind, step in steps.items():
            time_steps(step, batch, device, args.warmup)
        times = {kind: [] for kind in steps}
        for i in range(args.steps):
            for kind in ("growfam", "hf") if i % 2 == 0 else ("hf", "growfam"):  # neither always goes first
                times[kind] += time_steps(steps[kind], batch, device, 1)

    tokens = args.batch * args.seq_len
    rate = {k: tokens / statistics.median(v) for k, v in times.items()}
    where = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"model {cfg.name}: {num_params(cfg) / 1e6:.1f}M params ({num_params(cfg, 'nonembedding') / 1e6:.1f}M "
          f"non-embedding), batch {args.batch} x seq {args.seq_len}, "
          f"{'bf16 autocast' if amp else 'fp32'}{', compiled' if args.compile else ''}, {where}")
    peak = peak_flops(device) if amp == torch.bfloat16 else None
    for name, label in (("growfam", "growfam"), ("hf", "HF LlamaForCausalLM")):
        mfu = f"  MFU {flops_per_token(cfg, args.seq_len) * rate[name] / peak:.1%}" if peak else ""
        print(f"{label:>20}: {rate[name]:>12,.0f} tokens/s  (median step {statistics.median(times[name]) * 1e3:.1f} ms)"
              f"{mfu}")
    print(f"{'ratio growfam / HF':>20}: {rate['growfam'] / rate['hf']:.3f}")


if __name__ == "__main__":
    main()
