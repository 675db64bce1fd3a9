"""The output head and cross-entropy fused and taken in chunks of tokens, so the [tokens, vocab]
logits never exist whole.

With a 50k vocabulary the head's logits are the largest activation of a training step: 12
bytes per vocabulary entry and token (bf16 logits, their float32 log-softmax, its gradient),
4.6 GiB for 8 × 1024 tokens, more than the rest of paper-1b's activations with checkpointing.
Here each chunk's logits are made, turned into the chunk's loss and its gradient
(softmax − one-hot), multiplied into the gradients of the hidden states and of the head's
weight, and dropped. The backward pass only scales those gradients: no logits are kept or
recomputed, and the matmuls are the usual three (2·V·d FLOPs per token each).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _chunks(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, grads: bool):
    """Sum of the token losses and, with `grads`, d(mean loss)/dh and d(mean loss)/dweight.

    h [N, d], weight [V, d], targets [N] int64. Each chunk's logits are computed as the head
    computes them (under the ambient autocast) and taken to float32 for the softmax."""
    n = h.shape[0]
    total = torch.zeros((), device=h.device, dtype=torch.promote_types(h.dtype, torch.float32))
    grad_h = torch.empty_like(h) if grads else None
    grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=total.dtype) if grads else None
    for start in range(0, n, chunk):
        hc, tc = h[start:start + chunk], targets[start:start + chunk]
        logits = (hc @ weight.T).to(total.dtype)
        lse = torch.logsumexp(logits, dim=-1)
        total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
        if not grads:
            continue
        probs = logits.sub_(lse[:, None]).exp_()  # in place: the chunk's logits are not needed again
        probs[torch.arange(len(tc), device=tc.device), tc] -= 1
        g = probs.div_(n).to(hc.dtype)
        grad_h[start:start + chunk] = (g @ weight).to(h.dtype)
        grad_weight += (g.T @ hc).to(grad_weight.dtype)
    return total, grad_h, grad_weight


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        total, grad_h, grad_weight = _chunks(h, weight, targets, chunk, grads=True)
        ctx.save_for_backward(grad_h, grad_weight.to(weight.dtype))
        return total / h.shape[0]

    @staticmethod
    @once_differentiable  # the gradients were computed in the forward pass: no second order
    def backward(ctx, grad_loss):
        grad_h, grad_weight = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_weight * grad_loss.to(grad_weight.dtype), None, None


def head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean next-token cross-entropy of the logits h @ weight.T against targets, `chunk` tokens
    at a time (see the module docstring): the function F.cross_entropy computes over float32
    logits (float64 for a float64 model), with the same gradients; without gradients
    (evaluation) each chunk's logits are dropped as soon as its loss is taken.

    h [N, d] (the final norm's output), weight [V, d] (the head's), targets [N] int64, chunk >= 1."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _FusedHeadLoss.apply(h, weight, targets, chunk)
    return _chunks(h, weight, targets, chunk, grads=False)[0] / h.shape[0]
