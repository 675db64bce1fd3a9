"""KV-cached decoding and speculative decoding (Leviathan et al. 2023, arXiv 2211.17192). Batch 1.

Both keep the sequence's context within the models' max_seq_len: the prompt must leave room
for at least one token, and decoding stops at the end of the context.

Tokens stay on the model's device between steps (a drawn token is the next step's input), so
the host reads them only when it must: once a round in speculative decoding (the number
accepted decides what comes next), and every `sync_every` tokens in plain decoding (1 on the
CPU, where reading costs nothing; DEVICE_CHUNK on an accelerator, which then runs while the
host queues the next steps).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from growfam.checks import as_int
from growfam.errors import ConfigError
from growfam.infer.sampling import check_sampling, next_token, probabilities, sample, uniform
from growfam.model import KVCache, Llama

OnTokens = Callable[[list[int]], None]

#: Tokens decoded between two reads by the host on an accelerator. The price: up to
#: DEVICE_CHUNK - 1 steps decoded past an eos, thrown away.
DEVICE_CHUNK = 16


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

    def add(self, other: "Generation") -> None:
        """Sum `other` into this one (its tokens appended): totals over several prompts."""
        self.tokens += other.tokens
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.verified += other.verified
        self.target_calls += other.target_calls
        self.draft_calls += other.draft_calls
        self.wall_s += other.wall_s

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.wall_s if self.wall_s else float("nan")

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


def _device(model: Llama) -> torch.device:
    return model.embed_tokens.weight.device


def _new_cache(model: Llama, length: int) -> KVCache:
    """A cache for `length` tokens (what the sequence can reach, not the whole context)."""
    weight = model.embed_tokens.weight
    return KVCache.empty(model.cfg, 1, length, device=weight.device, dtype=weight.dtype)


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
             on_tokens: OnTokens | None = None, *, sync_every: int | None = None) -> Generation:
    """Decode up to max_new_tokens after the prompt `ids` (a list or 1-D tensor of token ids).

    The prompt is prefilled once, then one token per forward pass with the KV cache. Stops after
    `eos_id`, or at the end of the context (model.cfg.max_seq_len). on_tokens(new) sees the
    tokens as they come, `sync_every` at a time (default: 1 on the CPU, DEVICE_CHUNK on an
    accelerator). Greedy at temperature 0. generator: best on the model's device (any works).
    """
    start = time.perf_counter()
    context = model.cfg.max_seq_len
    ids = _check_prompt(ids, model.cfg.vocab_size, context)
    max_new_tokens = as_int(max_new_tokens, "max_new_tokens", at_least=1)
    temperature, top_p = check_sampling(temperature, top_p)
    device = _device(model)
    if sync_every is None:
        sync_every = 1 if device.type == "cpu" else DEVICE_CHUNK
    sync_every = as_int(sync_every, "sync_every", at_least=1)
    budget = min(max_new_tokens, context - len(ids))
    out = Generation()
    cache = _new_cache(model, len(ids) + budget)
    logits = model(torch.tensor([ids], device=device), cache, last=1)[0, -1]
    out.target_calls = 1
    token = next_token(logits, temperature, top_p, generator)
    pending = [token]  # drawn, not yet read by the host
    while True:
        done = len(out.tokens) + len(pending) == budget
        if done or len(pending) == sync_every:
            stop = _emit(out, torch.stack(pending).tolist(), eos_id, on_tokens)
            pending = []
            if stop or done:
                break
        logits = model(token.view(1, 1), cache)[0, -1]
        out.target_calls += 1
        token = next_token(logits, temperature, top_p, generator)
        pending.append(token)
    out.wall_s = time.perf_counter() - start
    return out


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p − q)) [V]: where a rejected draft token's replacement is drawn from.

    p == q leaves nothing (a rejection is then impossible); p is returned for that case."""
    rest = (p - q).clamp_min(0)
    total = rest.sum()
    return torch.where(total > 0, rest / total, p)  # no branch on the value: no wait for the device


def _verify(p: torch.Tensor, q: torch.Tensor | None, drafted: torch.Tensor,
            generator: torch.Generator | None) -> torch.Tensor:
    """`verify` on the device: [accepted, next token] (int64 [2]); drafted: int64 [k].

    The k uniforms are drawn at once; token i is accepted when u_i · q_i(x_i) < p_i(x_i) (u < p/q
    without the division), `accepted` counts the leading acceptances, and the next token is
    drawn from norm(max(0, p_a − q_a)) with q padded by a zero row, which is p_k when all k
    were accepted.
    """
    k = drafted.numel()
    zero = torch.zeros_like(p[:1])
    if k:
        rows = torch.arange(k, device=p.device)
        accepts = uniform(k, p, generator) * q[rows, drafted] < p[rows, drafted]
        accepted = accepts.long().cumprod(0).sum()
        q = torch.cat([q, zero])
    else:
        accepted, q = torch.zeros((), dtype=torch.long, device=p.device), zero
    at = accepted.view(1)
    token = sample(residual(p.index_select(0, at)[0], q.index_select(0, at)[0]), generator)
    return torch.stack([accepted, token])


def _verify_greedy(logits: torch.Tensor, drafted: torch.Tensor) -> torch.Tensor:
    """`_verify` at temperature 0, from the target's logits [k+1, V]: the drafts agreeing with
    the target's argmax are accepted, the next token is its argmax after them (the same as the
    rule on one-hot p and q, without building them)."""
    best = logits.argmax(-1)
    accepted = (drafted == best[:-1]).long().cumprod(0).sum()
    return torch.stack([accepted, best.index_select(0, accepted.view(1))[0]])


def verify(p: torch.Tensor, q: torch.Tensor, drafted: list[int],
           generator: torch.Generator | None = None) -> tuple[int, int]:
    """The speculative sampling rule on one round: (accepted, next token).

    p: target probabilities [k+1, V] at the k drafted positions and the one after; q: the draft's
    [k, V]; drafted: the k tokens drawn from q. Token x_i is accepted with probability
    min(1, p_i(x_i) / q_i(x_i)); at the first rejection the next token is drawn from
    norm(max(0, p_i − q_i)); when all k are accepted it is drawn from p_k. The tokens emitted
    are drafted[:accepted] + [next], distributed exactly as the target samples them.
    """
    accepted, token = _verify(p, q, torch.tensor(drafted, dtype=torch.long, device=p.device), generator).tolist()
    return accepted, token


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
    smaller of the two models' max_seq_len. The host reads the device once a round.
    """
    # Over 60 lines on purpose: the draft-verify-rollback round keeps both caches and the token
    # buffer in step; split into helpers, that invariant would span several functions' state.
    start = time.perf_counter()
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise ConfigError(f"the draft's vocabulary ({draft.cfg.vocab_size} tokens) is not the target's "
                          f"({target.cfg.vocab_size})")
    device = _device(target)
    if _device(draft) != device:
        raise ConfigError(f"the draft is on {_device(draft)} and the target on {device}; put both on one device")
    k = as_int(k, "k", at_least=1)
    context = min(target.cfg.max_seq_len, draft.cfg.max_seq_len)
    prompt = _check_prompt(ids, target.cfg.vocab_size, context)
    max_new_tokens = as_int(max_new_tokens, "max_new_tokens", at_least=1)
    temperature, top_p = check_sampling(temperature, top_p)
    budget = min(max_new_tokens, context - len(prompt))
    out = Generation()
    # the sequence on the device: the prompt, the tokens emitted, then this round's drafts
    seq = torch.empty(len(prompt) + budget, dtype=torch.long, device=device)
    seq[:len(prompt)] = torch.tensor(prompt)
    n = len(prompt)  # tokens of seq known for good
    target_cache, draft_cache = _new_cache(target, len(seq)), _new_cache(draft, len(seq))
    if n > 1:  # prefill both with all but the last prompt token (the caches' invariant)
        target(seq[None, :n - 1], target_cache, last=0)
        draft(seq[None, :n - 1], draft_cache, last=0)
        out.target_calls, out.draft_calls = 1, 1
    while True:
        # k drafts + 1 must fit the budget (which keeps the sequence within the context)
        kk = min(k, budget - len(out.tokens) - 1)
        q = []
        for i in range(kk):
            logits = draft(seq[None, draft_cache.length:n + i], draft_cache, last=1)[0, -1]
            if temperature == 0:
                seq[n + i] = logits.argmax(-1)
            else:
                q.append(probabilities(logits, temperature, top_p))
                seq[n + i] = sample(q[-1], generator)
        out.draft_calls += kk
        logits = target(seq[None, target_cache.length:n + kk], target_cache, last=kk + 1)[0]
        out.target_calls += 1
        drafted = seq[n:n + kk]
        if temperature == 0:
            decision = _verify_greedy(logits, drafted)
        else:
            decision = _verify(probabilities(logits, temperature, top_p), torch.stack(q) if q else None,
                               drafted, generator)
        accepted, token, *proposed = torch.cat([decision, drafted]).tolist()  # the round's one read
        out.drafted += kk
        out.accepted += accepted
        out.verified += accepted + (accepted < kk)
        seq[n + accepted] = token
        target_cache.truncate(n + accepted)
        draft_cache.truncate(min(draft_cache.length, n + accepted))
        n += accepted + 1
        if _emit(out, proposed[:accepted] + [token], eos_id, on_tokens) or len(out.tokens) >= budget:
            break
    out.wall_s = time.perf_counter() - start
    return out
