"""Inference: sampling, KV-cached decoding and speculative decoding with a family member as the
draft (paper §5, Table 5; Leviathan et al., arXiv 2211.17192; docs/concepts.md).

- `sampling`: next-token probabilities under temperature / top-p (one-hot at temperature 0,
  so greedy decoding is the same maths as sampling) and drawing from them on the device
  (`next_token`, `sample`; `draw` for an int).
- `generate`: `generate` (prefill once, then one token per step with a KVCache),
  `speculative_generate` (draft proposes k tokens, the target verifies them in one pass, both
  caches roll back to the accepted prefix), `verify` (the accept / resample rule) and
  `Generation` (the tokens and the counts).
- `stream`: text of a growing token list, printed as it comes (for the CLI).
- `run`: `growfam generate` as functions (DecodeOptions, read_prompts, check_members,
  decode_prompts).
- `speculate`: `growfam speculate`, the paper's Table 5 for a built family (every pair of
  sizes in the four combinations of modes; acceptance, expected acceptance, speed-up), and its
  table.

infer/ may import model, the top-level helpers (devices from growfam.device); `speculate`
also the family's members and ledger (family.members, family.ledger) and eval.consistency's
divergence. A tokenizer is passed in, used by duck typing (`decode`).
"""

from growfam.infer.generate import Generation, generate, residual, speculative_generate, verify
from growfam.infer.run import DecodeOptions, check_members, decode_prompts, read_prompts
from growfam.infer.sampling import check_sampling, draw, next_token, probabilities, sample
from growfam.infer.stream import TextStream

__all__ = [
    "DecodeOptions",
    "Generation",
    "TextStream",
    "check_members",
    "check_sampling",
    "decode_prompts",
    "draw",
    "generate",
    "next_token",
    "probabilities",
    "read_prompts",
    "residual",
    "sample",
    "speculative_generate",
    "verify",
]
