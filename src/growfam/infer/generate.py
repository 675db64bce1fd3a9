"""KV-cached decoding and speculative decoding (Leviathan et al. 2023; DESIGN.md §5). Batch 1.

Both keep the sequence's context within the models' max_seq_len: the prompt must leave room
for at least one token, and decoding stops at the end of the context.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from growfam.checks import as_int
from growfam.errors import ConfigError
from growfam.infer.sampling import check_sampling, draw, probabilities
from growfam.model import KVCache, Llama

OnTokens = Callable[[list[int]], None]


@dataclass
class Generation:
    """The new tokens and what producing them cost.

    drafted / accepted: draft tokens proposed / accepted by the target (0 without a draft);
    verified: drafted tokens the rule checked (each round's up to its first rejection);
    target_calls / draft_calls: forward passes of each model (prefill included); wall_s: seconds.
    """

    tokens: list[int] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0
    verified: int = 0
    target_calls: int = 0
    draft_calls: int = 0
    wall_s: float = 0.0

    @property
    def acceptance(self) -> float:
        """accepted / drafted (nan without drafting)."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_target_call(self) -> float:
        return len(self.tokens) / self.target_calls if self.target_calls else float("nan")


def _check_prompt(ids, vocab_size: int, context: int) -> list[int]:
    """ids as a list of ints in [0, vocab_size) leaving room in `context`; ConfigError otherwise."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if not ids:
        raise ConfigError("the prompt is empty (at least one token is needed)")
    if not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids):
        raise ConfigError(f"the prompt has token ids outside the vocabulary [0, {vocab_size})")
    if len(ids) >= context:
        raise ConfigError(f"the prompt has {len(ids)} tokens; the context holds {context}, so nothing "
                          "is left to generate")
    return ids


def _new_cache(model: Llama, context: int) -> KVCache:
    weight = model.embed_tokens.weight
    return KVCache.empty(model.cfg, 1, context, device=weight.device, dtype=weight.dtype)


def _forward(model: Llama, ids: list[int], cache: KVCache) -> torch.Tensor:
    """Logits [len(ids), V] of `ids` appended to the cache."""
    return model(torch.tensor([ids], device=model.embed_tokens.weight.device), cache)[0]


def _emit(out: Generation, new: list[int], eos_id: int | None, on_tokens: OnTokens | None) -> bool:
    """Append `new` (cut after an eos) to out.tokens; True when the eos was among them."""
    stop = eos_id is not None and eos_id in new
    if stop:
        new = new[:new.index(eos_id) + 1]
    out.tokens += new
    if on_tokens is not None:
        on_tokens(new)
    return stop


@torch.inference_mode()
def generate(model: Llama, ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             generator: torch.Generator | None = None, eos_id: int | None = None,
             on_tokens: OnTokens | None = None) -> Generation:
    """Decode up to max_new_tokens after the prompt `ids` (a list or 1-D tensor of token ids).

    The prompt is prefilled once, then one token per forward pass with the KV cache. Stops after
    `eos_id`, or at the end of the context (model.cfg.max_seq_len). on_tokens(new) sees each
    token as it comes. Greedy at temperature 0.
    """
    start = time.perf_counter()
    context = model.cfg.max_seq_len
    ids = _check_prompt(ids, model.cfg.vocab_size, context)
    max_new_tokens = as_int(max_new_tokens, "max_new_tokens", at_least=1)
    temperature, top_p = check_sampling(temperature, top_p)
    budget = min(max_new_tokens, context - len(ids))
    out = Generation()
    cache = _new_cache(model, context)
    logits = _forward(model, ids, cache)[-1]
    out.target_calls = 1
    while True:
        token = draw(probabilities(logits, temperature, top_p), generator)
        if _emit(out, [token], eos_id, on_tokens) or len(out.tokens) == budget:
            break
        logits = _forward(model, [token], cache)[-1]
        out.target_calls += 1
    out.wall_s = time.perf_counter() - start
    return out


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p − q)) [V]: where a rejected draft token's replacement is drawn from.

    p == q leaves nothing (a rejection is then impossible); p is returned for that case."""
    rest = (p - q).clamp_min(0)
    total = rest.sum()
    return rest / total if total > 0 else p


def verify(p: torch.Tensor, q: torch.Tensor, drafted: list[int],
           generator: torch.Generator | None = None) -> tuple[int, int]:
    """The speculative sampling rule on one round: (accepted, next token).

    p: target probabilities [k+1, V] at the k drafted positions and the one after; q: the draft's
    [k, V]; drafted: the k tokens drawn from q. Token x_i is accepted with probability
    min(1, p_i(x_i) / q_i(x_i)); at the first rejection the next token is drawn from
    norm(max(0, p_i − q_i)); when all k are accepted it is drawn from p_k. The tokens emitted
    are drafted[:accepted] + [next], distributed exactly as the target samples them.
    """
    for i, x in enumerate(drafted):
        u = torch.rand((), generator=generator, dtype=p.dtype, device=p.device)
        if u * q[i, x] >= p[i, x]:  # rejected: u >= p/q, written without the division
            return i, draw(residual(p[i], q[i]), generator)
    return len(drafted), draw(p[len(drafted)], generator)


@torch.inference_mode()
def speculative_generate(target: Llama, draft: Llama, ids, k: int = 8, max_new_tokens: int = 64,
                         temperature: float = 0.0, top_p: float = 1.0,
                         generator: torch.Generator | None = None, eos_id: int | None = None,
                         on_tokens: OnTokens | None = None) -> Generation:
    """Decode like `generate(target, ...)` with `draft` proposing k tokens a round.

    Each round the draft, with its own cache, proposes up to k tokens one at a time; the target
    scores them all in one forward pass; `verify` accepts a prefix and draws one more token;
    both caches roll back to the accepted prefix. Temperature 0 gives exactly the target's
    greedy output. Both caches hold every token but the last one emitted (the draft's may lag
    further behind; it catches up at the start of its next proposal). The context is the
    smaller of the two models' max_seq_len.
    """
    start = time.perf_counter()
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise ConfigError(f"the draft's vocabulary ({draft.cfg.vocab_size} tokens) is not the target's "
                          f"({target.cfg.vocab_size})")
    k = as_int(k, "k", at_least=1)
    context = min(target.cfg.max_seq_len, draft.cfg.max_seq_len)
    seq = _check_prompt(ids, target.cfg.vocab_size, context)
    max_new_tokens = as_int(max_new_tokens, "max_new_tokens", at_least=1)
    temperature, top_p = check_sampling(temperature, top_p)
    budget = min(max_new_tokens, context - len(seq))
    out = Generation()
    target_cache, draft_cache = _new_cache(target, context), _new_cache(draft, context)
    if len(seq) > 1:  # prefill both with all but the last prompt token (the caches' invariant)
        _forward(target, seq[:-1], target_cache)
        _forward(draft, seq[:-1], draft_cache)
        out.target_calls, out.draft_calls = 1, 1
    while True:
        # k drafts + 1 must fit the budget and the context (the target scores n-1+kk tokens)
        kk = min(k, budget - len(out.tokens) - 1)
        drafted, q = [], []
        pending = seq[draft_cache.length:]
        for _ in range(kk):
            q.append(probabilities(_forward(draft, pending, draft_cache)[-1], temperature, top_p))
            drafted.append(draw(q[-1], generator))
            pending = drafted[-1:]
        out.draft_calls += kk
        n = len(seq)
        logits = _forward(target, seq[target_cache.length:] + drafted, target_cache)[-(kk + 1):]
        out.target_calls += 1
        accepted, token = verify(probabilities(logits, temperature, top_p),
                                 torch.stack(q) if q else None, drafted, generator)
        out.drafted += kk
        out.accepted += accepted
        out.verified += accepted + (accepted < kk)
        new = drafted[:accepted] + [token]
        seq += new
        target_cache.truncate(n + accepted)
        draft_cache.truncate(min(draft_cache.length, n + accepted))
        if _emit(out, new, eos_id, on_tokens) or len(out.tokens) >= budget:
            break
    out.wall_s = time.perf_counter() - start
    return out
