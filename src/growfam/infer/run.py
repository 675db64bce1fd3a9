"""`growfam generate` as functions: check the members and prompts, then decode each prompt.

Devices are named and resolved as `growfam eval` does (growfam.train's check_device and
resolve_device, imported where used: infer/ does not otherwise depend on train/).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from growfam.checks import as_choice, as_int
from growfam.errors import ConfigError
from growfam.infer.generate import Generation, generate, speculative_generate
from growfam.infer.sampling import check_sampling
from growfam.infer.stream import TextStream
from growfam.model import ModelConfig, check_pretrained, check_same_tokenizer, load_pretrained, num_params


#: The dtypes a member can decode in.
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class DecodeOptions:
    """What `growfam generate` decodes with; `check` validates and normalises it.

    device: auto (cuda when there is one), cpu, cuda, cuda:N. dtype: one of DTYPES; float32
    on every device by default: at batch 1 a step's time is mostly the launching of a few hundred
    small kernels, not reading the weights, so half precision gains little for family-sized
    members, while float32 keeps greedy speculative output equal to the member's own greedy output
    (in bfloat16 the k+1-token verification pass and the one-token steps round differently enough
    to flip near-ties).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    k: int = 8
    device: str = "auto"
    dtype: str = "float32"

    def check(self) -> "DecodeOptions":
        from growfam.device import check_device

        self.max_new_tokens = as_int(self.max_new_tokens, "--max-new-tokens", at_least=1)
        self.temperature, self.top_p = check_sampling(self.temperature, self.top_p, ("--temperature", "--top-p"))
        self.seed = as_int(self.seed, "--seed")
        self.k = as_int(self.k, "--k", at_least=1)
        check_device(self.device)
        self.dtype = as_choice(self.dtype, DTYPES, "--dtype")
        return self


def read_prompts(path: str | Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file, one prompt each; ConfigError when there are none."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except OSError as err:
        raise ConfigError(f"{path}: {err.strerror or err}") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"{path}: no prompts (one a line)")
    return prompts


def check_members(target_dir: str | Path, draft_dir: str | Path | None, tokenizer_vocab: int) -> int:
    """The context both models share; ConfigError unless the directories are models (their
    weights checked from the headers) whose vocabularies hold the tokenizer's and agree, with
    byte-identical tokenizer files, and the draft is not larger than the target."""
    configs: list[tuple[Path, ModelConfig]] = [(Path(d), check_pretrained(d)) for d in (target_dir, draft_dir) if d]
    for path, cfg in configs:
        if cfg.vocab_size < tokenizer_vocab:
            raise ConfigError(f"{path}: vocab_size {cfg.vocab_size} is below its tokenizer's {tokenizer_vocab} tokens")
    if draft_dir is not None:
        (_, target), (_, draft) = configs
        if num_params(draft, "total") > num_params(target, "total"):
            raise ConfigError(f"the draft {draft_dir} ({num_params(draft, 'total'):,} parameters) is larger than "
                              f"the target {target_dir} ({num_params(target, 'total'):,}); a draft must be the "
                              "smaller model (swap them)")
        if draft.vocab_size != target.vocab_size:
            raise ConfigError(f"the draft's vocabulary ({draft.vocab_size} tokens) is not the target's "
                              f"({target.vocab_size})")
        try:
            check_same_tokenizer([target_dir, draft_dir])
        except ConfigError:  # its message speaks of growth sources
            raise ConfigError(f"{draft_dir}: its tokenizer files are not {target_dir}'s (a draft must "
                              "share the target's tokenizer)") from None
    return min(cfg.max_seq_len for _, cfg in configs)


def decode_prompts(target_dir: str | Path, draft_dir: str | Path | None, tokenizer, prompts: list[str],
                   opts: DecodeOptions, write: Callable[[str], object],
                   report: Callable[[str], object]) -> list[Generation]:
    """Check everything, then decode each prompt: its text and continuation through write,
    a blank line between prompts; with a draft, each prompt's counts through report.

    tokenizer: the target's (anything with encode, decode, vocab_size, eos_id)."""
    from growfam.device import resolve_device

    opts.check()
    context = check_members(target_dir, draft_dir, tokenizer.vocab_size)
    encoded = [tokenizer.encode(p) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids or len(ids) >= context:
            raise ConfigError(f"prompt {i + 1} has {len(ids)} tokens; it needs 1 to {context - 1} to "
                              f"leave room in the context of {context}")
    device, dtype = resolve_device(opts.device, 1), getattr(torch, opts.dtype)
    target = load_pretrained(target_dir, dtype=dtype, device=device).eval()
    draft = load_pretrained(draft_dir, dtype=dtype, device=device).eval() if draft_dir is not None else None
    generator = torch.Generator(device=device).manual_seed(opts.seed)  # on the device: draws cost no copies
    results = []
    for i, (text, ids) in enumerate(zip(prompts, encoded)):
        write(("\n" if i else "") + text)
        stream = TextStream(tokenizer, write, ids)
        common = dict(max_new_tokens=opts.max_new_tokens, temperature=opts.temperature, top_p=opts.top_p,
                      generator=generator, eos_id=tokenizer.eos_id, on_tokens=stream)
        if draft is None:
            out = generate(target, ids, **common)
        else:
            out = speculative_generate(target, draft, ids, opts.k, **common)
        stream.finish()
        write("\n")
        if draft is not None:
            report(f"prompt {i + 1}: {len(out.tokens)} tokens, accepted {out.accepted}/{out.drafted} drafted "
                   f"({out.acceptance:.1%}), {out.tokens_per_target_call:.2f} tokens per target call, "
                   f"{len(out.tokens) / out.wall_s:.1f} tokens/s")
        results.append(out)
    return results
