"""Next-token probabilities under temperature and nucleus (top-p) filtering, and drawing from them."""

from __future__ import annotations

import torch

from growfam.checks import as_number
from growfam.errors import ConfigError


def check_sampling(temperature: float, top_p: float) -> tuple[float, float]:
    """(temperature, top_p) as floats; ConfigError unless temperature >= 0 and 0 < top_p <= 1."""
    temperature = as_number(temperature, "temperature", at_least=0.0)
    top_p = as_number(top_p, "top_p", above=0.0)
    if top_p > 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    return temperature, top_p


def probabilities(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0) -> torch.Tensor:
    """logits [..., V] -> probabilities [..., V] (float32 at least, float64 for a float64 model).

    temperature 0: one-hot at the argmax (greedy), so speculative sampling's accept / resample
    rule reduces to "accept while the draft's token is the target's argmax". Otherwise
    softmax(logits / temperature), keeping the smallest set of most likely tokens whose mass
    reaches top_p (at least the most likely one), renormalised.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        # a token stays if the mass of the tokens before it is still below top_p
        before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One token id drawn from probs [V] (a one-hot vector always gives its hot index)."""
    return int(torch.multinomial(probs, 1, generator=generator))
