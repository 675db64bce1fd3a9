"""Next-token probabilities under temperature and nucleus (top-p) filtering, and drawing from them.

Nothing here waits for the device: tokens come back as tensors on the logits' device, so a
decoding loop can feed them to the next forward pass and read them on the host only when it
must (`draw` is the one-off that returns an int).
"""

from __future__ import annotations

import torch

from growfam.checks import as_number
from growfam.errors import ConfigError


def check_sampling(temperature: float, top_p: float, names: tuple[str, str] = ("temperature", "top_p")
                   ) -> tuple[float, float]:
    """(temperature, top_p) as floats; ConfigError unless temperature >= 0 and 0 < top_p <= 1.

    names: what the messages call the two (the CLI passes its flags)."""
    temperature = as_number(temperature, names[0], at_least=0.0)
    top_p = as_number(top_p, names[1], above=0.0)
    if top_p > 1:
        raise ConfigError(f"{names[1]} must be in (0, 1], got {top_p}")
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


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids [...] (int64, on the logits' device) for logits [..., V].

    Temperature 0: the argmax of the logits, the token `probabilities`' one-hot would give,
    without building it. Otherwise a draw from probabilities(logits, temperature, top_p).
    """
    if temperature == 0:
        return logits.argmax(-1)
    return sample(probabilities(logits, temperature, top_p), generator)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids [...] (int64, on probs' device) drawn from probs [..., V].

    torch.multinomial's own one-sample method, argmax(p / E) with E ~ Exp(1) per token (the
    exponential race), without its input checks, which wait for the device. The exponentials
    are drawn on the generator's device: a generator there costs nothing, one elsewhere (a CPU
    generator with a CUDA model) costs a copy.
    """
    where = probs.device if generator is None else generator.device
    race = torch.empty(probs.shape, dtype=probs.dtype, device=where).exponential_(generator=generator)
    return (probs / race.to(probs.device)).argmax(-1)


def uniform(n: int, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """n draws of U[0, 1) [n] with the dtype and device of `like`, made on the generator's device."""
    where = like.device if generator is None else generator.device
    return torch.rand(n, generator=generator, dtype=like.dtype, device=where).to(like.device)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One token id drawn from probs [V] (a one-hot vector always gives its hot index)."""
    return int(sample(probs, generator))
