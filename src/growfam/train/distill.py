"""Knowledge distillation's loss: the train config's `distill:` section and the teacher's term,
computed chunk by chunk through both output heads.

Per token, with the student's logits z_s, the teacher's z_t, temperature T and weight α:

    loss = (1 − α) · CE(z_s, target) + α · T² · D(softmax(z_t / T), softmax(z_s / T))

D is forward KL(teacher ‖ student) (the student covers the teacher's mass; the default), reverse
KL(student ‖ teacher) (mode-seeking), or the Jensen–Shannon divergence (the two KLs to their
mean, averaged). T² keeps the gradient's scale independent of T (Hinton et al. 2015,
arXiv 1503.02531). With `top_k`, both distributions are taken over the teacher's k most likely
tokens and renormalised there; the student's mass elsewhere is left to the cross-entropy term.

Like the fused cross-entropy (model/loss.py), the loss is taken `chunk` tokens at a time: each
chunk's two [chunk, vocab] logits are made, turned into the chunk's loss and its gradients
(with autograd, on the chunk alone), and dropped; the backward pass only scales the gradients
kept. Neither model's [tokens, vocab] logits exist whole.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from growfam.checks import Section, as_choice, as_int, as_mapping, as_number
from growfam.errors import ConfigError

#: The divergences D the loss can use.
KINDS = ("forward", "reverse", "jsd")
#: Tokens per chunk of the distillation loss when parallel.loss_chunk is 0.
DEFAULT_CHUNK = 1024


@dataclass
class DistillConfig(Section):
    """The train config's `distill:` section: learn from a teacher's distribution as well.

    teacher: a Hugging Face Llama directory (a growfam member, or transformers-made) with the
        student's vocabulary and tokenizer; frozen, run forward only.
    weight: α, the KD term's share of the loss, in [0, 1] (1: distillation alone).
    temperature: T > 0; both distributions are softened by it.
    kind: forward | reverse | jsd (see the module docstring).
    until: the fraction of the run, in (0, 1], after which α falls to 0 over `ramp` of the run
        (SALT, arXiv 2410.18779: a weaker teacher helps early and hurts late); 1: to the end.
        Steps at α = 0 are plain steps: the teacher is not run.
    ramp: the fall's length as a fraction of the run, in [0, 1] (0: α drops at once).
    top_k: compare the distributions over the teacher's k most likely tokens only (None: all).
    """

    key: ClassVar[str] = "distill"
    teacher: str | None = None
    weight: float = 0.5
    temperature: float = 1.0
    kind: str = "forward"
    until: float = 1.0
    ramp: float = 0.05
    top_k: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.teacher, str) or not self.teacher:
            raise ConfigError(f"distill.teacher must be a model directory, got {self.teacher!r}")
        self.weight = as_number(self.weight, "distill.weight", at_least=0, at_most=1)
        self.temperature = as_number(self.temperature, "distill.temperature", above=0)
        as_choice(self.kind, KINDS, "distill.kind")
        self.until = as_number(self.until, "distill.until", above=0)
        if self.until > 1:
            raise ConfigError(f"distill.until is a fraction of the run in (0, 1], got {self.until}")
        self.ramp = as_number(self.ramp, "distill.ramp", at_least=0, at_most=1)
        if self.top_k is not None:
            self.top_k = as_int(self.top_k, "distill.top_k", 1)

    def alpha(self, step: int, total_steps: int) -> float:
        """α at 0-based optimizer step `step` of `total_steps`: `weight` until `until` of the run,
        then falling linearly to 0 over `ramp` of it."""
        if self.until >= 1:
            return self.weight
        start = self.until * total_steps
        length = self.ramp * total_steps
        if step < start:
            return self.weight
        if length <= 0 or step >= start + length:
            return 0.0
        return self.weight * (1 - (step - start) / length)


def divergence(student: torch.Tensor, teacher: torch.Tensor, kind: str = "forward",
               temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """D(teacher ‖ student) of each row, in nats: student, teacher [N, V] logits -> [N].
    Computed in the logits' dtype (float32 or float64)."""
    a, b = student / temperature, teacher / temperature
    if top_k is not None and top_k < b.shape[-1]:
        b, ids = b.topk(top_k, dim=-1)
        a = a.gather(-1, ids)
    log_q, log_p = a.log_softmax(-1), b.log_softmax(-1)
    if kind == "forward":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if kind == "reverse":
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2)
    return 0.5 * ((log_p.exp() * (log_p - log_m)).sum(-1) + (log_q.exp() * (log_q - log_m)).sum(-1))


def _chunks(h, weight, teacher_h, teacher_weight, targets, spec: DistillConfig, alpha: float, chunk: int,
            grads: bool):
    """Sums of the token cross-entropies and divergences and, with `grads`, the gradients of the
    mean loss with respect to h and weight. Shapes as distill_loss's."""
    n = h.shape[0]
    dtype = torch.promote_types(h.dtype, torch.float32)
    sums = torch.zeros(2, device=h.device, dtype=dtype)  # cross-entropy, divergence
    scale = torch.tensor([1 - alpha, alpha * spec.temperature ** 2], device=h.device, dtype=dtype) / n
    w = weight.detach().requires_grad_(grads)
    grad_h = torch.empty_like(h) if grads else None
    grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=dtype) if grads else None
    for start in range(0, n, chunk):
        with torch.enable_grad() if grads else contextlib.nullcontext():
            hc = h[start:start + chunk].detach().requires_grad_(grads)
            logits = (hc @ w.T).to(dtype)
            with torch.no_grad():
                teacher_logits = (teacher_h[start:start + chunk] @ teacher_weight.T).to(dtype)
            parts = torch.stack([F.cross_entropy(logits, targets[start:start + chunk], reduction="sum"),
                                 divergence(logits, teacher_logits, spec.kind, spec.temperature, spec.top_k).sum()])
            if grads:
                g_h, g_w = torch.autograd.grad((parts * scale).sum(), (hc, w))
                grad_h[start:start + chunk] = g_h.to(h.dtype)
                grad_weight += g_w.to(dtype)
        sums += parts.detach()
    return sums, scale, grad_h, grad_weight


class _FusedDistillLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, teacher_h, teacher_weight, targets, spec, alpha, chunk):
        sums, scale, grad_h, grad_weight = _chunks(h, weight, teacher_h, teacher_weight, targets, spec, alpha,
                                                   chunk, grads=True)
        ctx.save_for_backward(grad_h, grad_weight.to(weight.dtype))
        parts = sums / h.shape[0]
        ctx.mark_non_differentiable(parts)
        return (sums * scale).sum(), parts

    @staticmethod
    @once_differentiable  # the gradients were computed in the forward pass
    def backward(ctx, grad_loss, _grad_parts):
        grad_h, grad_weight = ctx.saved_tensors
        return (grad_h * grad_loss.to(grad_h.dtype), grad_weight * grad_loss.to(grad_weight.dtype),
                None, None, None, None, None, None)


def distill_loss(h: torch.Tensor, weight: torch.Tensor, teacher_h: torch.Tensor, teacher_weight: torch.Tensor,
                 targets: torch.Tensor, spec: DistillConfig, alpha: float,
                 chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean distillation loss (see the module docstring) and, detached, the mean
    cross-entropy and divergence [2], in nats per token.

    h [N, d] (the student's final norm output), weight [V, d] (its head), teacher_h [N, d_t] and
    teacher_weight [V, d_t] (the teacher's, no gradient), targets [N] int64, alpha in [0, 1],
    chunk >= 1 tokens at a time. Gradients flow to h and weight only."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _FusedDistillLoss.apply(h, weight, teacher_h, teacher_weight, targets, spec, alpha, chunk)
    sums, scale, _, _ = _chunks(h, weight, teacher_h, teacher_weight, targets, spec, alpha, chunk, grads=False)
    return (sums * scale).sum(), sums / h.shape[0]


#: A family's distillation variants: a short run of a finished member against a teacher,
#: published beside it as MEMBER+KIND (family/variants.py).
VARIANTS = ("retro", "draft")


@dataclass
class FamilyDistillConfig(Section):
    """The family YAML's `distill:` section: how a family uses the trainer's distillation.

    inherit: {weight, temperature, kind, until, ramp, top_k} (a DistillConfig without its
        teacher; until defaults to 0.25): each grown member of the progressive mode learns from
        the member it grew from, early in its run (Knowledge Inheritance, arXiv 2105.13880;
        SALT, arXiv 2410.18779). The independent baseline trains as before; the teacher's
        forward passes are counted in the grown members' FLOPs.
    retro / draft: {tokens, lr, weight, temperature, kind, top_k}: once the family is built,
        each smaller member of each mode gets a short run against a teacher of the same mode —
        the largest member (retro) or the next larger one (draft, to become its speculative
        draft) — of `tokens` × its from-scratch budget D(N_i) (> 0), at `lr` × its stage's peak
        LR (default 0.2), weight 1 (distillation alone) unless given, published as MEMBER+KIND.
    """

    key: ClassVar[str] = "distill"
    inherit: dict | None = None
    retro: dict | None = None
    draft: dict | None = None

    def __post_init__(self) -> None:
        for kind in ("inherit", *VARIANTS):
            section = getattr(self, kind)
            if section is None:
                continue
            section = as_mapping(section, f"distill.{kind}")
            if "teacher" in section:
                raise ConfigError(f"distill.{kind} takes no teacher: the family's members are the teachers")
            if kind == "inherit":
                section = {"until": 0.25, **section}
            else:
                section = {"weight": 1.0, "lr": 0.2, **section}
                if "tokens" not in section:
                    raise ConfigError(f"distill.{kind} needs `tokens`: a fraction of each member's from-scratch budget")
                section["tokens"] = as_number(section["tokens"], f"distill.{kind}.tokens", above=0)
                section["lr"] = as_number(section["lr"], f"distill.{kind}.lr", above=0)
            setattr(self, kind, section)
            self.spec(kind, "(a member)")  # checked now

    def spec(self, kind: str, teacher: str) -> DistillConfig | None:
        """The train config's distill section of `kind` (inherit, retro, draft) with `teacher`;
        None when the family has no such section. A ConfigError names the key distill.KIND.KEY."""
        section = getattr(self, kind)
        if section is None:
            return None
        fields = {k: v for k, v in section.items() if k not in ("tokens", "lr")}
        try:
            return DistillConfig.from_dict({**fields, "teacher": teacher})
        except ConfigError as err:
            known = "keys: " if kind == "inherit" else "keys: tokens, lr, "
            raise ConfigError(str(err).replace("distill.", f"distill.{kind}.", 1)
                              .replace("in distill", f"in distill.{kind}", 1).replace("keys: teacher, ", known)) from None

    def inherit_spec(self, teacher: str) -> DistillConfig | None:
        """The distill section of a grown member whose teacher is `teacher` (None without inherit)."""
        return self.spec("inherit", teacher)

    def variants(self) -> list[str]:
        """The variant kinds this family builds, in order."""
        return [kind for kind in VARIANTS if getattr(self, kind) is not None]

    @staticmethod
    def pairs(kind: str, n: int) -> list[tuple[int, int]]:
        """(student, teacher) member indices of a family of n members: retro pairs every smaller
        member with the largest, draft each member with the next."""
        return [(i, n - 1 if kind == "retro" else i + 1) for i in range(n - 1)]

    def teacher_share(self, total_steps: int) -> float:
        """The fraction of a grown member's `total_steps` steps at α > 0 (its teacher runs)."""
        spec = self.inherit_spec("-")
        if spec is None or spec.weight == 0 or total_steps == 0:
            return 0.0
        if spec.until >= 1:
            return 1.0
        # alpha() is > 0 exactly for the steps below this bound (the same float expression)
        end = spec.until * total_steps + (spec.ramp * total_steps if spec.ramp > 0 else 0)
        return min(total_steps, math.ceil(end)) / total_steps

    def to_dict(self) -> dict:
        return {kind: dict(getattr(self, kind)) for kind in ("inherit", *VARIANTS) if getattr(self, kind) is not None}
