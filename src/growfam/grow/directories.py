"""Growing saved models: `growfam expand` as a function, from Hugging Face directories to one.

`expand_directories` checks everything (outputs, sources, target, operators) before it reads a
weight, then grows one source (`expand`) or the combination of several (`expand_from`) and
writes the grown model atomically with the primary source's tokenizer files. Its messages name
the command's flags (--out, --report, ...), since that is where users meet them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from growfam.errors import ConfigError, GrowfamError
from growfam.grow.expansion import expand
from growfam.grow.growth import DEFAULT_DEPTH, DEFAULT_WIDTH, GrowthPlan
from growfam.grow.multi import DEFAULT_COMBINE, combined_config, expand_from
from growfam.grow.report import GrowthReport
from growfam.io import atomic_write_text, check_output
from growfam.outputs import FILE, MODEL
from growfam.model import (ModelConfig, check_same_tokenizer, load_pretrained, read_hf_config, resolve_config,
                           save_pretrained)

#: The probe is one batch: its logits must fit in memory.
MAX_PROBE_TOKENS = 65536


def expand_directories(sources: list[str], to: str, out: str, *, width: str | None = None,
                       depth: str | None = None, combine: str | None = None, seed: int = 0,
                       probe_tokens: int = 512, report: str | None = None,
                       force: bool = False) -> tuple[Path, GrowthReport]:
    """Grow the model directory `sources[0]` (or the combination of all `sources`) into the
    config `to` (preset, config file or model directory); write it to `out` and, when given,
    the growth report as JSON to `report`. Returns (the written directory, the report).

    width / depth / combine: operator and combine-mode names (None: grow's defaults).
    probe_tokens: Δlogits and Δloss are measured on this many seeded random tokens (0: skip).
    force: replace an existing `out` / `report` (never a source); the old one stays until the
    new one is complete.
    """
    width = DEFAULT_WIDTH if width is None else width
    depth = DEFAULT_DEPTH if depth is None else depth
    if width == "masked":  # its masks would be lost: a saved model has no place for them
        raise ConfigError("--width masked needs the training loop to ramp its masks; use it in "
                          "`growfam family` (or growfam.grow.expand), not on a saved directory")
    if not 0 <= probe_tokens <= MAX_PROBE_TOKENS:
        raise ConfigError(f"--probe-tokens must be in [0, {MAX_PROBE_TOKENS}], got {probe_tokens}")
    if not -2**63 <= seed < 2**63 - 1:  # torch seeds are 64-bit; expand also uses seed + 1
        raise ConfigError(f"--seed must be a 64-bit integer, got {seed}")
    if combine is not None and len(sources) == 1:
        raise ConfigError("--combine needs two or more SRC_DIRs (one source is grown as it is)")
    _check_outputs(sources, out, report, force)
    target = resolve_config(to)
    configs = _check_sources(sources)
    combine = DEFAULT_COMBINE if combine is None else combine
    start = configs[0] if len(sources) == 1 else combined_config(configs, combine)
    GrowthPlan.make(start, target, width, depth, seed)  # refusals before the weights

    models = [load_pretrained(src) for src in sources]
    probe = _probe(start, probe_tokens, seed) if probe_tokens else None
    if len(models) == 1:
        grown, _, growth = expand(models[0], target, width, depth, seed=seed, probe=probe)
    else:
        grown, growth = expand_from(models, target, width, depth, seed=seed, probe=probe, combine=combine)
    path = save_pretrained(grown, out, tokenizer=sources[0])
    if report:
        atomic_write_text(report, json.dumps(growth.to_dict(), indent=2) + "\n")
    return path, growth


def _probe(cfg: ModelConfig, n_tokens: int, seed: int) -> torch.Tensor:
    """[rows, seq] seeded random token ids, about n_tokens in all, rows no longer than the context."""
    seq = min(n_tokens, cfg.max_seq_len)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (max(1, n_tokens // seq), seq), generator=generator)


def _check_sources(sources: list[str]) -> list[ModelConfig]:
    """The sources' ModelConfigs; GrowfamError for one that is not a model directory, a
    directory given twice, or tokenizer files that differ (the output gets the first one's)."""
    seen: dict[str, str] = {}
    for src in sources:
        real = os.path.realpath(src)
        if real in seen:
            raise GrowfamError(f"one directory is given twice as SRC_DIR ({seen[real]}, {src}); "
                               "give each source once")
        seen[real] = src
    configs = [read_hf_config(src) for src in sources]
    check_same_tokenizer(sources)
    return configs


def _check_outputs(sources: list[str], out: str, report: str | None, force: bool) -> None:
    """Refuse, before any work, an output that would lose what a user has: `out` as
    `io.check_output` says; `report` needs an existing folder, outside `out` and the sources."""
    check_output(out, force=force, makes=MODEL, sources=sources, what="--out")
    if report is None:
        return
    report_path = Path(report)
    if report_path.is_dir():
        raise GrowfamError(f"--report {report_path} is a directory; give a file name")
    report_real, out_real = Path(os.path.realpath(report_path)), Path(os.path.realpath(out))
    if report_real == out_real or out_real in report_real.parents:
        raise GrowfamError(f"--report {report_path} is inside --out {out}, which expand replaces; "
                           "write it elsewhere")
    if not report_path.absolute().parent.is_dir():
        raise GrowfamError(f"--report {report_path}: {report_path.absolute().parent} is not an existing folder")
    check_output(report_path, force=force, makes=FILE, sources=sources, what="--report")
