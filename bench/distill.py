"""The cost of a distillation step: a student of N non-embedding parameters trained alone, and
with teachers of 2N and 8N, against the FLOPs prediction, in one run.

A step is the trainer's own: `forward_backward` over one micro-batch with the plain loss (the
fused, chunked cross-entropy) or a teacher's loss function (train.teacher.Teacher: the teacher's
forward under no_grad, then the distillation loss through both heads, chunk by chunk), gradient
clipping, AdamW's step. The teachers are the student's shape with twice the layers (2N) and twice
the width and layers (8N), so their non-embedding sizes are exactly 2N and 8N. The three steps are
timed in turn, step by step (a shared machine's busy moments hit all three), and the median of
each is reported against two predictions of the ratio to the plain step:

- (6·N_s + 2·N_t) / 6·N_s, non-embedding parameters (the 6ND convention): 1.67× and 3.67×;
- (F_s + F_t / 3) / F_s with F the attention- and head-inclusive training FLOPs per token
  (model.flops_per_token; a forward pass is a third of it).

    python bench/distill.py                       # CPU: d 256, 4 layers, seq 256, batch 8
    python bench/distill.py --d-model 512 --layers 8 --seq-len 1024 --batch 8   # a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from growfam.model import Llama, ModelConfig, flops_per_token, num_params
from growfam.train import DistillConfig, Teacher, forward_backward, param_groups


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_step(student_cfg: ModelConfig, teacher_cfg: ModelConfig | None, device: torch.device,
               amp: torch.dtype | None, chunk: int, seq_len: int):
    """step(x, y): one optimizer step of a fresh student (seed 0), alone or with a teacher."""
    torch.manual_seed(0)
    model = Llama(student_cfg).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95),
                                  fused=device.type in ("cuda", "cpu"))
    loss_fn = lambda x, y, head=None: model.loss(x, y, loss_chunk=chunk, head=head)  # noqa: E731
    if teacher_cfg is not None:
        torch.manual_seed(1)
        frozen = Llama(teacher_cfg).to(device=device, dtype=amp or torch.float32).requires_grad_(False).eval()
        spec = DistillConfig(teacher="(in memory)", weight=0.5, temperature=1.0)
        loss_fn = Teacher(spec, frozen, chunk, seq_len).loss_fn(loss_fn, spec.weight)

    def step(x, y):
        forward_backward(loss_fn, [(x, y)], device, amp)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=256, help="the student's width")
    parser.add_argument("--layers", type=int, default=4, help="the student's depth")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=1024 if gpu else 256)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--loss-chunk", type=int, default=1024, help="tokens per chunk of both losses")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each")
    parser.add_argument("--steps", type=int, default=8, help="timed steps of each")
    args = parser.parse_args()

    def shape(d: int, layers: int, name: str) -> ModelConfig:
        return ModelConfig(d_model=d, n_layers=layers, n_heads=d // args.head_dim, ffn_dim=int(3.5 * d),
                           vocab_size=args.vocab, max_seq_len=args.seq_len, name=name)

    student = shape(args.d_model, args.layers, "student")
    teachers = {"2N": shape(args.d_model, 2 * args.layers, "2N"), "8N": shape(2 * args.d_model, 2 * args.layers, "8N")}
    device = torch.device("cuda" if gpu else "cpu")
    amp = torch.bfloat16 if gpu else None
    steps = {"plain": build_step(student, None, device, amp, args.loss_chunk, args.seq_len)}
    steps.update({name: build_step(student, cfg, device, amp, args.loss_chunk, args.seq_len)
                  for name, cfg in teachers.items()})
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1))
    batch = (x[:, :-1].to(device), x[:, 1:].to(device))
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.warmup + args.steps):
        order = list(steps) if i % 2 == 0 else list(reversed(steps))  # none always goes first
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            steps[name](*batch)
            synchronize(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)

    n_s, f_s = num_params(student, "nonembedding"), flops_per_token(student, args.seq_len)
    plain = statistics.median(times["plain"])
    where = f"{torch.cuda.get_device_name(device)}, bf16" if gpu else f"CPU, {torch.get_num_threads()} threads, fp32"
    print(f"student: d {args.d_model}, {args.layers} layers, {n_s / 1e6:.2f}M non-embedding; seq {args.seq_len}, "
          f"batch {args.batch}; {where}; median of {args.steps} steps")
    print(f"{'step':<10}{'N_t/N_s':>8}{'ms':>10}{'measured':>10}{'6N+2N_t':>10}{'F+F_t/3':>10}")
    print(f"{'plain':<10}{'-':>8}{plain * 1e3:>10.1f}{1:>9.2f}x{1:>9.2f}x{1:>9.2f}x")
    for name, cfg in teachers.items():
        n_t, f_t = num_params(cfg, "nonembedding"), flops_per_token(cfg, args.seq_len)
        median = statistics.median(times[name])
        print(f"{'teacher ' + name:<10}{n_t / n_s:>8.2f}{median * 1e3:>10.1f}{median / plain:>9.2f}x"
              f"{(6 * n_s + 2 * n_t) / (6 * n_s):>9.2f}x{(f_s + f_t / 3) / f_s:>9.2f}x")


if __name__ == "__main__":
    main()
