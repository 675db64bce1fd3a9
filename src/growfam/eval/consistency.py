"""How alike two members' next-token distributions are (paper Appendix F; docs/concepts.md).

Per position, with P the smaller member's distribution and Q the larger one's:
KL(P‖Q) = Σ_v P(v) log(P(v)/Q(v)), the reverse KL(Q‖P), total variation TV = ½ Σ_v |P − Q|,
and the expected speculative acceptance Σ_v min(P, Q) = 1 − TV (Leviathan et al. 2023: the
chance that a draft token sampled from one is accepted by the other). Each is averaged over
the positions of a window, then over windows. Both members see the same validation windows.

Streamed: one batch of windows' logits at a time, turned into float64 probabilities a few
positions at a time (`chunk_divergence`), so |V|×T×N probabilities never exist at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from growfam.errors import GrowfamError

#: float64 elements of one chunk of probabilities (about 32 MB): bounds the memory of a step.
_CHUNK_ELEMENTS = 4 * 2**20


@dataclass
class Divergence:
    """Window-averaged divergences of a pair over `windows` windows of `positions` positions."""

    kl_small_large: float
    kl_large_small: float
    tv: float
    windows: int
    positions: int

    @property
    def acceptance(self) -> float:
        return 1.0 - self.tv

    def to_dict(self) -> dict:
        return {"kl_small_large": self.kl_small_large, "kl_large_small": self.kl_large_small, "tv": self.tv,
                "acceptance": self.acceptance, "windows": self.windows, "positions": self.positions}


def chunk_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Per position [..., 3] float64: KL(P‖Q), KL(Q‖P), TV, from logits [..., V] of P and Q.

    Computed in float64 over the positions in chunks of about _CHUNK_ELEMENTS values."""
    if logits_p.shape != logits_q.shape:
        raise GrowfamError(f"logit shapes differ: {tuple(logits_p.shape)} vs {tuple(logits_q.shape)}")
    vocab = logits_p.shape[-1]
    flat_p, flat_q = logits_p.reshape(-1, vocab), logits_q.reshape(-1, vocab)
    step = max(1, _CHUNK_ELEMENTS // vocab)
    out = torch.empty(flat_p.shape[0], 3, dtype=torch.float64, device=logits_p.device)
    for i in range(0, flat_p.shape[0], step):
        log_p = torch.log_softmax(flat_p[i:i + step].double(), dim=-1)
        log_q = torch.log_softmax(flat_q[i:i + step].double(), dim=-1)
        p, q = log_p.exp(), log_q.exp()
        # clamped: rounding can leave -1e-17 where the distributions are equal
        out[i:i + step, 0] = (p * (log_p - log_q)).sum(-1).clamp_min(0)
        out[i:i + step, 1] = (q * (log_q - log_p)).sum(-1).clamp_min(0)
        out[i:i + step, 2] = 0.5 * (p - q).abs().sum(-1)
    return out.view(*logits_p.shape[:-1], 3)


@torch.no_grad()
def divergence(small: torch.nn.Module, large: torch.nn.Module, tokens: np.ndarray, window: int,
               windows: int | None = None, batch_size: int = 8, device: str | torch.device = "cpu") -> Divergence:
    """Divergences between `small` and `large` (idx [B, T] -> logits [B, T, V], the same V) on
    up to `windows` validation windows of `window` tokens spread evenly over `tokens`
    (`growfam.data.eval_windows`: the same windows for every pair)."""
    from growfam.data import eval_windows

    per_window = []
    for x, _ in eval_windows(tokens, window, windows, batch_size):
        x = x.to(device)
        logits_small, logits_large = small(x), large(x)
        if logits_small.shape[-1] != logits_large.shape[-1]:
            raise GrowfamError(f"the members' vocabularies differ ({logits_small.shape[-1]} vs "
                               f"{logits_large.shape[-1]} tokens); KL needs one vocabulary")
        per_window.append(chunk_divergence(logits_small, logits_large).mean(dim=1).cpu())
    stats = torch.cat(per_window).mean(dim=0)
    return Divergence(float(stats[0]), float(stats[1]), float(stats[2]),
                      windows=sum(len(w) for w in per_window), positions=window)
