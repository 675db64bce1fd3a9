"""`growfam speculate`: the paper's Table 5 for a built family.

For each target member and each smaller draft (adjacent, or all), in the four combinations of
modes (progressive draft -> progressive target, independent -> progressive, independent ->
independent, progressive -> independent), at each temperature: speculative decoding of the same
N prompts cut from the family's validation split, against target-only decoding with the same
cache code. Per row:

- acceptance = accepted / drafted (every drafted token counts, also those after a rejection
  that were never checked: the rate docs/concepts.md defines) and alpha = accepted / verified (verified:
  the drafted tokens checked, up to and including the first rejection of a round). alpha is
  the per-token acceptance of Leviathan et al.: its expectation is Σ_v min(p, q) over the
  contexts the target decodes, so it estimates `expected_acceptance`;
- expected_acceptance: Σ_v min(p_T, q_T) averaged over the positions of the target's own
  continuations of the same prompts, both distributions at temperature T (at T = 0 this is
  the share of positions where the two argmaxes agree);
- tokens per target call, tokens/s, and the speed-up over target-only tokens/s.

Decoding runs to max_new_tokens on every prompt (end-of-text does not stop it), so every row
decodes the same number of tokens. The section goes into the family ledger as `speculative`.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field

import torch

from growfam import __version__
from growfam.checks import as_int, as_number
from growfam.errors import ConfigError, GrowfamError
from growfam.eval.consistency import chunk_divergence
from growfam.family.directory import mode_pairs
from growfam.family.members import LoadedMembers, Member, Target
from growfam.family.ledger import SpeculativeSection, read_ledger, write_ledger
from growfam.infer.generate import Generation, generate, speculative_generate



def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # stdout is for the table and --json


@dataclass
class SpeculateOptions:
    """prompts: how many; prompt_tokens: each prompt's length in tokens; k: tokens drafted a
    round; temperatures: each one a full set of rows (0 is greedy)."""

    pairs: str = "adjacent"
    prompts: int = 8
    prompt_tokens: int = 32
    max_new_tokens: int = 64
    k: int = 8
    temperatures: list[float] = field(default_factory=lambda: [0.0, 1.0])
    seed: int = 0
    device: str = "auto"

    def check(self) -> "SpeculateOptions":
        from growfam.device import check_device

        if self.pairs not in ("adjacent", "all"):
            raise ConfigError(f"--pairs must be adjacent or all, got {self.pairs!r}")
        self.prompts = as_int(self.prompts, "--prompts", at_least=1)
        self.prompt_tokens = as_int(self.prompt_tokens, "--prompt-tokens", at_least=1)
        self.max_new_tokens = as_int(self.max_new_tokens, "--max-new-tokens", at_least=1)
        self.k = as_int(self.k, "--k", at_least=1)
        self.temperatures = list(dict.fromkeys(as_number(t, "--temperature", at_least=0.0)
                                               for t in self.temperatures))
        if not self.temperatures:
            raise ConfigError("--temperature needs at least one value")
        self.seed = as_int(self.seed, "--seed")
        check_device(self.device)
        return self


def speculative_pairs(target: Target, pairs: str = "adjacent") -> list[tuple[Member, Member]]:
    """(draft, target) members: for each target size, each smaller draft size (the next
    smaller one only with pairs="adjacent"), in the mode pairs (family.directory.mode_pairs) whose two members
    are both finished. Sizes are ordered as the family's plan lists them (as the ledger lists the
    members when the plan names none)."""
    stages = target.ledger.stage_names
    found = {(m.mode, m.name): m for m in target.members}
    out = []
    for j, large in enumerate(stages):
        for small in stages[j - 1:j] if pairs == "adjacent" else stages[:j]:
            out += [(found[dm, small], found[tm, large]) for dm, tm in mode_pairs(target.ledger.built_mode)
                    if (dm, small) in found and (tm, large) in found]
    return out


def cut_prompts(tokens, n: int, length: int) -> torch.Tensor:
    """n prompts [n, length] int64: the starts of windows spread evenly over `tokens`."""
    from growfam.data import eval_windows

    prompts = torch.cat([x for x, _ in eval_windows(tokens, length, n, batch_size=n)])
    if len(prompts) < n:
        raise ConfigError(f"the validation split holds only {len(prompts)} prompts of {length} tokens; "
                          f"lower --prompts or --prompt-tokens")
    return prompts


@torch.no_grad()
def expected_acceptance(draft: torch.nn.Module, target: torch.nn.Module, sequences: torch.Tensor, start: int,
                        temperature: float) -> float:
    """Σ_v min(p_T, q_T) averaged over the positions that predict sequences[:, start:]
    (sequences [N, L] on the models' device: prompts of `start` tokens and their continuations)."""
    logits_p = target(sequences)[:, start - 1:-1]
    logits_q = draft(sequences)[:, start - 1:-1]
    if temperature == 0:
        return float((logits_p.argmax(-1) == logits_q.argmax(-1)).double().mean())
    return float(1.0 - chunk_divergence(logits_q / temperature, logits_p / temperature)[..., 2].mean())


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def check_speculate(target: Target, opts: SpeculateOptions) -> tuple[list[tuple[Member, Member]],
                                                                    list[tuple[Member, Member]], torch.Tensor]:
    """Every check that needs no model loaded; the (draft, target) pairs to decode: the
    members', and each distill.draft variant's and its member's with the variant's teacher
    (before, after, per variant); and the prompts [N, prompt_tokens] cut from the validation split."""
    opts.check()
    if target.family_dir is None:
        raise GrowfamError(f"{target.members[0].path}: speculate needs a family directory (family.json); "
                           "for two member directories use `growfam generate TARGET --draft DRAFT`")
    pairs = speculative_pairs(target, opts.pairs)
    if not pairs:
        raise GrowfamError(f"{target.family_dir}: no two finished members of different sizes to pair")
    variants = [(draft, teacher) for member, variant, teacher in target.variants("draft")
                for draft in (member, variant)]
    dataset = target.dataset()
    for draft, large in pairs + variants:
        for member in (draft, large):
            if member.config.vocab_size < dataset.vocab_size:
                raise GrowfamError(f"{member.path}: vocab_size {member.config.vocab_size} is below the "
                                   f"dataset's {dataset.vocab_size} tokens")
        if draft.config.vocab_size != large.config.vocab_size:
            raise GrowfamError(f"{draft.path} has {draft.config.vocab_size} tokens and {large.path} "
                               f"{large.config.vocab_size}: a draft needs the target's vocabulary")
        context = min(draft.config.max_seq_len, large.config.max_seq_len)
        if opts.prompt_tokens + opts.max_new_tokens > context:
            raise ConfigError(f"--prompt-tokens {opts.prompt_tokens} + --max-new-tokens {opts.max_new_tokens} "
                              f"exceed the context of {draft.name} -> {large.name} ({context} tokens)")
    return pairs, variants, cut_prompts(dataset.tokens("val"), opts.prompts, opts.prompt_tokens)


def family_speculative(target: Target, opts: SpeculateOptions) -> dict:
    """Decode every pair of check_speculate at every temperature; the ledger's `speculative`
    section (the distilled drafts' rows under `variants`), also written to family.json and returned."""
    from growfam.device import resolve_device

    pairs, variants, prompts = check_speculate(target, opts)
    device = resolve_device(opts.device, 1)
    # warm-up on load: a model's first calls are slow
    model = LoadedMembers(device, on_load=lambda m: generate(m, prompts[0].tolist(), 4))

    def decode(draft: Member, large: Member, temperature: float) -> tuple[Generation, Generation, torch.Tensor]:
        """(target alone, speculative, prompts + the target's own continuations [N, L]); the two
        decodings alternate prompt by prompt, so a change in the machine's load hits both alike."""
        alone, spec, continuations = Generation(), Generation(), []
        seeded = [torch.Generator(device=device).manual_seed(opts.seed) for _ in range(2)]
        common = dict(max_new_tokens=opts.max_new_tokens, temperature=temperature)
        for ids in prompts.tolist():
            out = generate(model(large), ids, generator=seeded[0], **common)
            alone.add(out)
            continuations.append(out.tokens)
            spec.add(speculative_generate(model(large), model(draft), ids, opts.k, generator=seeded[1], **common))
        return alone, spec, torch.cat([prompts, torch.tensor(continuations)], 1)

    with target.recording("speculate"):
        rows = _speculate_rows(pairs, opts, decode, model, device)
        section = {"growfam": __version__, **{k: v for k, v in asdict(opts).items() if k != "device"},
                   "device": str(device), "dtype": "float32", "threads": torch.get_num_threads(), "rows": rows}
        if variants:  # distilled drafts: each variant's rows and its member's, against the variant's teacher
            section["variants"] = _speculate_rows(variants, opts, decode, model, device)
        ledger = read_ledger(target.family_dir)
        ledger.speculative = SpeculativeSection.from_json(section, "speculative", "the measured section")
        write_ledger(target.family_dir, ledger)
    return section


def _speculate_rows(pairs, opts: SpeculateOptions, decode, model: LoadedMembers, device) -> list[dict]:
    """A row per (draft, target) pair and temperature: decode(draft, target, temperature) and
    the expected acceptance measured on the target's own continuations."""
    rows = []
    for draft, large in pairs:
        for temperature in opts.temperatures:
            alone, spec, sequences = decode(draft, large, temperature)
            expected = expected_acceptance(model(draft), model(large), sequences.to(device), opts.prompt_tokens,
                                           temperature)
            row = {"temperature": temperature, "draft_mode": draft.mode, "draft": draft.name,
                   "target_mode": large.mode, "target": large.name, "drafted": spec.drafted,
                   "accepted": spec.accepted, "verified": spec.verified,
                   "acceptance": spec.acceptance, "alpha": _ratio(spec.accepted, spec.verified),
                   "expected_acceptance": expected, "tokens": len(spec.tokens), "target_calls": spec.target_calls,
                   "tokens_per_target_call": spec.tokens_per_target_call,
                   "tokens_per_s": spec.tokens_per_s, "target_only_tokens_per_s": alone.tokens_per_s,
                   "speedup": _ratio(spec.tokens_per_s, alone.tokens_per_s)}
            rows.append(row)
            _log(f"T={temperature:g} {_short(draft.mode)} {draft.name} -> {_short(large.mode)} {large.name}: "
                 f"accepted {spec.accepted}/{spec.drafted}, alpha {row['alpha']:.3f} (expected "
                 f"{expected:.3f}), {row['tokens_per_target_call']:.2f} tokens/call, speed-up {row['speedup']:.2f}x")
    return rows


def _short(mode: str) -> str:
    return {"progressive": "prog", "independent": "ind"}.get(mode, mode)


def format_speculative(section: dict) -> str:
    """The `speculative` section as Table 5: per temperature, per (draft -> target) sizes, a
    line per combination of modes."""
    from growfam.text import loss, text_table

    blocks = []
    for temperature in dict.fromkeys(r["temperature"] for r in section["rows"]):
        table = [["draft -> target", "accepted/drafted", "alpha", "Σmin(p,q)", "tokens/call", "tokens/s",
                  "target alone", "speed-up"]]
        rows = [r for r in section["rows"] if r["temperature"] == temperature]
        for sizes in dict.fromkeys((r["draft"], r["target"]) for r in rows):
            table.append([f"{sizes[0]} -> {sizes[1]}"] + [""] * 7)
            for r in (r for r in rows if (r["draft"], r["target"]) == sizes):
                table.append([f"  {_short(r['draft_mode'])} -> {_short(r['target_mode'])}", loss(r["acceptance"]),
                              loss(r["alpha"]), loss(r["expected_acceptance"]), f"{r['tokens_per_target_call']:.2f}",
                              f"{r['tokens_per_s']:.1f}", f"{r['target_only_tokens_per_s']:.1f}",
                              f"{r['speedup']:.2f}x"])
        title = "greedy (temperature 0)" if temperature == 0 else f"temperature {temperature:g}"
        blocks.append("\n".join([f"{title}, k = {section['k']}"] + text_table(table)))
    blocks.append(f"{section['prompts']} prompts of {section['prompt_tokens']} validation tokens, "
                  f"{section['max_new_tokens']} new tokens each, on {section['device']} ({section['dtype']}, "
                  f"{section['threads']} threads). alpha = accepted / verified (per checked token; its expectation "
                  "is Σmin(p,q), measured on the target's own continuations); speed-up = tokens/s over the "
                  "target decoding alone with the same cache code.")
    return "\n\n".join(blocks)
