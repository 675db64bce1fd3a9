"""The teacher of a distillation run (the `distill:` section): checked before any work, loaded
once, frozen, laid out like the student, and the loss function of a step that learns from it.

The teacher runs forward only, under the step's autocast, with no gradients and no optimizer
state: whole on each rank for one process, DDP or per-tensor averaging; under FSDP2 its blocks
are sharded over the ranks as the student's are (Parallelism.wrap_frozen). Its forward costs
2·N_teacher FLOPs per token, counted apart in the run's ledger (`flops_teacher`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from growfam.data import load_tokenizer
from growfam.errors import ConfigError, GrowfamError
from growfam.model import Llama, ModelConfig, check_pretrained, flops_per_token, load_pretrained, num_params
from growfam.train.config import check_seq_len
from growfam.train.distill import DEFAULT_CHUNK, DistillConfig, distill_loss
from growfam.train.parallel import Parallelism

Loss = Callable[..., torch.Tensor]


def check_teacher(spec: DistillConfig, student: ModelConfig, dataset, seq_len: int) -> ModelConfig:
    """The teacher's config, once it is known to load and to fit the run: a Llama directory with
    the student's vocabulary, the dataset's tokenizer (when the dataset records one) and room
    for seq_len tokens. A ConfigError (one line) otherwise; no weight is read."""
    path = Path(spec.teacher)
    try:
        cfg = check_pretrained(path)
    except GrowfamError as err:
        raise ConfigError(f"distill.teacher: {err}") from None
    if cfg.vocab_size != student.vocab_size:
        raise ConfigError(f"distill.teacher {path} has a vocabulary of {cfg.vocab_size:,} tokens, the student "
                          f"{student.vocab_size:,}: a teacher must share the student's vocabulary and tokenizer")
    fingerprint = getattr(dataset, "tokenizer_fingerprint", None)
    if fingerprint is not None:
        try:
            same = load_tokenizer(path).fingerprint() == fingerprint
        except GrowfamError:
            raise ConfigError(f"distill.teacher {path} holds no tokenizer, so it cannot be checked against the "
                              "dataset's; save the teacher with its tokenizer files") from None
        if not same:
            raise ConfigError(f"distill.teacher {path} has another tokenizer than the dataset "
                              f"{getattr(dataset, 'path', '')} was prepared with: the teacher's and the student's "
                              "token ids must mean the same")
    check_seq_len(seq_len, cfg, f"the teacher {path}")
    return cfg


class Teacher:
    """A frozen teacher and the distillation term it adds to the loss of a step."""

    def __init__(self, spec: DistillConfig, model: Llama, chunk: int, seq_len: int) -> None:
        self.spec = spec
        self.model = model
        self.chunk = chunk
        # FLOPs per token of its forward pass: 2·N (non-embedding), and attention-inclusive
        self.flops_per_token = (2 * num_params(model.cfg, "nonembedding"), flops_per_token(model.cfg, seq_len) // 3)
        self._parts: list[torch.Tensor] = []

    @classmethod
    def load(cls, spec: DistillConfig, parallel: Parallelism, dtype: torch.dtype | None, loss_chunk: int,
             seq_len: int) -> "Teacher":
        """Read the teacher (in `dtype`, the run's autocast dtype, or float32) and lay it out on
        this rank as `parallel` lays out the student (call after the student is wrapped)."""
        model = load_pretrained(spec.teacher, dtype=dtype or torch.float32)
        return cls(spec, parallel.wrap_frozen(model), loss_chunk or DEFAULT_CHUNK, seq_len)

    def loss_fn(self, student_loss: Loss, alpha: float) -> Loss:
        """(idx, targets) [B, T] -> the mean distillation loss at weight `alpha`, through the
        student's `student_loss` (its wrapper's hooks); each call's mean cross-entropy and
        divergence are kept for take_parts()."""
        def loss(idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                teacher_h, teacher_weight = self.model(idx, head=_hidden_and_head)

            def head(h: torch.Tensor, weight: torch.Tensor, flat_targets: torch.Tensor) -> torch.Tensor:
                total, parts = distill_loss(h, weight, teacher_h, teacher_weight, flat_targets, self.spec, alpha,
                                            self.chunk)
                self._parts.append(parts.float())
                return total

            return student_loss(idx, targets, head=head)
        return loss

    def take_parts(self) -> torch.Tensor:
        """The mean cross-entropy and divergence [2] over the calls since the last take."""
        parts, self._parts = self._parts, []
        return torch.stack(parts).mean(0)


def _hidden_and_head(h: torch.Tensor, weight: torch.Tensor, _targets) -> tuple[torch.Tensor, torch.Tensor]:
    return h, weight
