"""The family's ledger, family.json: what run_family planned and did, per mode and member, and
what eval, consistency and speculate measured, as typed records.

    Ledger                    plan, data (and its fingerprint), growth, fixed_data, train;
      .modes[mode]            a list of MemberEntry, in family order
        MemberEntry           what one member's stage recorded (run_family builds it whole)
          .eval               EvalRecord: perplexity per source, zero-shot tasks (growfam eval)
      .consistency            ConsistencySection: KL, TV and acceptance per pair (growfam consistency)
      .speculative            SpeculativeSection: Table 5's rows (growfam speculate)

Every record has `from_json` (validated: a missing or mistyped field is one ConfigError naming
the file and the field) and `to_json` (the same JSON as ever, keys the record does not know
kept as read, so a newer growfam's ledger passes through an older one intact). `read_ledger` /
`write_ledger` read and atomically replace family.json; `check_same_run` refuses to resume a
family directory with another plan, data, growth section or train section.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from growfam.checks import shown
from growfam.errors import ConfigError, GrowfamError
from growfam.family.directory import MODES, FamilyDirectory
from growfam.io import atomic_write_text, read_json
from growfam.train import RESUME_FREE_KEYS

# What a JSON value must be, as (description, accepted types); `bool` only where named (it is an int).
TEXT = ("a string", (str,))
NUMBER = ("a number", (int, float))
NUMBER_OR_NULL = ("a number or null", (int, float, type(None)))
FLAG = ("true or false", (bool,))
MAPPING = ("a mapping", (dict,))
MAPPING_OR_NULL = ("a mapping or null", (dict, type(None)))
LIST = ("a list", (list,))
LIST_OR_NULL = ("a list or null", (list, type(None)))
TEXT_OR_NULL = ("a string or null", (str, type(None)))


class _Record:
    """A JSON object as a dataclass: FIELDS give each known key's (description, types),
    REQUIRED the keys that must be present; every other key read lands in `extra`."""

    FIELDS: ClassVar[dict[str, tuple[str, tuple[type, ...]]]] = {}
    REQUIRED: ClassVar[tuple[str, ...]] = ()
    #: Optional fields written even when None (as null): the ones run_family always writes.
    KEEP_NULL: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def _checked(cls, data: Any, where: str, path: Path | str) -> dict:
        """`data` split into the known fields (checked) and `extra`; ConfigError otherwise."""
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: {where or 'the ledger'} must be a mapping, got {shown(data)}")
        prefix = f"{where}." if where else ""
        for key in cls.REQUIRED:
            if key not in data:
                raise ConfigError(f"{path}: {prefix}{key} is missing")
        for key, (description, types) in cls.FIELDS.items():
            value = data.get(key)
            if key in data and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
                raise ConfigError(f"{path}: {prefix}{key} must be {description}, got {shown(value)}")
        known = {k: v for k, v in data.items() if k in cls.FIELDS}
        return {**known, "extra": {k: v for k, v in data.items() if k not in cls.FIELDS}}

    def to_json(self) -> dict:
        """The record as family.json holds it: its fields (an optional one that is None left out,
        unless KEEP_NULL names it), then the keys it did not know."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None and f.name not in self.REQUIRED + self.KEEP_NULL:
                continue
            out[f.name] = value.to_json() if isinstance(value, _Record) else value
        return {**out, **self.extra}


@dataclass
class EvalRecord(_Record):
    """A member's `eval` record: perplexity per source ("val", "wiki", "file:PATH") and metrics
    per zero-shot task, each a mapping of metric -> value (plus its limit and data origin), with
    the growfam and lm_eval versions that measured them."""

    FIELDS = {"perplexity": MAPPING, "tasks": MAPPING, "growfam": TEXT_OR_NULL, "lm_eval": TEXT_OR_NULL}

    perplexity: dict[str, dict] = field(default_factory=dict)
    tasks: dict[str, dict] = field(default_factory=dict)
    growfam: str | None = None
    lm_eval: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, where: str, path: Path | str) -> "EvalRecord":
        return cls(**cls._checked(data, where, path))

    def merged(self, newer: "EvalRecord") -> "EvalRecord":
        """This record with `newer`'s sources and tasks added or replacing these."""
        return EvalRecord({**self.perplexity, **newer.perplexity}, {**self.tasks, **newer.tasks},
                          newer.growfam or self.growfam, newer.lm_eval or self.lm_eval, {**self.extra, **newer.extra})


@dataclass
class MemberEntry(_Record):
    """One member of one mode, as run_family records it once the member is published. Units:
    parameters as the family counts them (`params`), tokens, FLOPs (6·N·D; `flops_attn`
    attention-inclusive), seconds, losses in nats per token."""

    FIELDS = {"name": TEXT, "dir": TEXT_OR_NULL, "config": MAPPING_OR_NULL, "params": NUMBER,
              "nonembedding_params": NUMBER_OR_NULL, "total_params": NUMBER_OR_NULL, "tokens": NUMBER,
              "planned_tokens": NUMBER_OR_NULL, "steps": NUMBER_OR_NULL, "flops": NUMBER,
              "flops_attn": NUMBER_OR_NULL, "cum_flops": NUMBER, "val_loss": NUMBER_OR_NULL,
              "train_loss": NUMBER_OR_NULL, "max_lr": NUMBER_OR_NULL, "wall_s": NUMBER,
              "session_wall_s": NUMBER_OR_NULL, "spikes": NUMBER_OR_NULL, "rollbacks": NUMBER_OR_NULL,
              "stopped_early": FLAG, "growth": MAPPING_OR_NULL, "given": MAPPING_OR_NULL,
              "growth_point": MAPPING_OR_NULL, "done": FLAG, "eval": MAPPING_OR_NULL, "distill": MAPPING_OR_NULL,
              "shrink": MAPPING_OR_NULL}
    REQUIRED = ("name", "done", "params", "tokens", "flops", "cum_flops", "wall_s", "val_loss")
    KEEP_NULL = ("dir", "config", "nonembedding_params", "total_params", "planned_tokens", "steps", "flops_attn",
                 "train_loss", "max_lr", "session_wall_s", "spikes", "rollbacks", "growth")

    name: str
    done: bool
    params: float
    tokens: float
    flops: float
    cum_flops: float
    wall_s: float
    val_loss: float | None
    dir: str | None = None
    config: dict | None = None
    nonembedding_params: float | None = None
    total_params: float | None = None
    planned_tokens: float | None = None
    steps: int | None = None
    flops_attn: float | None = None
    train_loss: float | None = None
    max_lr: float | None = None
    session_wall_s: float | None = None
    spikes: int | None = None
    rollbacks: int | None = None
    stopped_early: bool = False
    growth: dict | None = None  # the growth report of the expansion it started from
    given: dict | None = None  # a start_from member: {dir, tokens, flops}
    growth_point: dict | None = None  # a converged schedule's growth step and loss slope
    # trained with a teacher: its member, the train config's distill section, its forward's FLOPs
    # (2·N_t per token it saw; in cum_flops, not in flops)
    distill: dict | None = None
    # pruned from a larger member (direction: shrink): its source, rules, held-out losses, what it kept
    shrink: dict | None = None
    eval: EvalRecord | None = None
    extra: dict = field(default_factory=dict)

    @property
    def spent_flops(self) -> float:
        """What training this member cost: its own 6·N·D and a teacher's forward passes."""
        return self.flops + (self.distill or {}).get("flops", 0)

    @classmethod
    def from_json(cls, data: Any, where: str, path: Path | str) -> "MemberEntry":
        fields = cls._checked(data, where, path)
        if fields.get("eval") is not None:
            fields["eval"] = EvalRecord.from_json(fields["eval"], f"{where}.eval", path)
        return cls(**fields)


def _rows(data: dict, key: str, where: str, path: Path | str, required: dict) -> list[dict]:
    """data[key], a list of mappings each holding `required` (key -> (description, types))."""
    rows = data.get(key)
    if not isinstance(rows, list):
        raise ConfigError(f"{path}: {where}.{key} must be a list, got {shown(rows)}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ConfigError(f"{path}: {where}.{key}[{i}] must be a mapping, got {shown(row)}")
        for name, (description, types) in required.items():
            if not isinstance(row.get(name), types) or isinstance(row.get(name), bool):
                raise ConfigError(f"{path}: {where}.{key}[{i}].{name} must be {description}, got {shown(row.get(name))}")
    return rows


_PAIR_ROW = {"small": TEXT, "large": TEXT, "kl_small_large": NUMBER, "kl_large_small": NUMBER, "tv": NUMBER,
             "acceptance": NUMBER}
_SPECULATIVE_ROW = {"temperature": NUMBER, "draft": TEXT, "target": TEXT, "draft_mode": TEXT, "target_mode": TEXT}


@dataclass
class ConsistencySection(_Record):
    """growfam consistency's results: per mode, a row per (smaller, larger) pair with KL both
    ways, total variation and expected acceptance; measured on `windows` validation windows of
    `window` tokens (`windows_requested` asked for; the split may hold fewer)."""

    FIELDS = {"modes": MAPPING, "pairs": TEXT_OR_NULL, "windows": NUMBER_OR_NULL,
              "windows_requested": NUMBER_OR_NULL, "window": NUMBER_OR_NULL, "growfam": TEXT_OR_NULL}
    REQUIRED = ("modes",)

    modes: dict[str, list[dict]]
    pairs: str | None = None
    windows: int | None = None
    windows_requested: int | None = None
    window: int | None = None
    growfam: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, where: str, path: Path | str) -> "ConsistencySection":
        fields = cls._checked(data, where, path)
        for mode in fields["modes"]:
            _rows(fields["modes"], mode, f"{where}.modes", path, _PAIR_ROW)
        return cls(**fields)

    @property
    def asked(self) -> dict:
        """The options it was measured with, as asked (what FamilyEval compares)."""
        return {"pairs": self.pairs, "windows": self.windows_requested or self.windows}


@dataclass
class SpeculativeSection(_Record):
    """growfam speculate's results: a row per (draft, target, modes, temperature) — acceptance,
    tokens per target call, speed-up — and the options they were decoded with."""

    FIELDS = {"rows": LIST}
    REQUIRED = ("rows",)

    rows: list[dict]
    extra: dict = field(default_factory=dict)  # the options: k, prompts, prompt_tokens, device, ...

    @classmethod
    def from_json(cls, data: Any, where: str, path: Path | str) -> "SpeculativeSection":
        fields = cls._checked(data, where, path)
        _rows(fields, "rows", where, path, _SPECULATIVE_ROW)
        return cls(**fields)

    def option(self, name: str) -> Any:
        return self.extra.get(name)


def _list(value: Any, where: str, path: Path | str) -> list:
    if not isinstance(value, list):
        raise ConfigError(f"{path}: {where} must be a list, got {shown(value)}")
    return value


@dataclass
class Ledger(_Record):
    """family.json. `plan`: the FamilyPlan as JSON; `growth`: the growth section; `train`: the
    effective train section (absent in ledgers from before it was recorded)."""

    FIELDS = {"plan": MAPPING, "data_fingerprint": TEXT, "growth": MAPPING, "fixed_data": FLAG, "data": TEXT,
              "modes": MAPPING, "train": MAPPING_OR_NULL, "consistency": MAPPING_OR_NULL,
              "speculative": MAPPING_OR_NULL, "distill": MAPPING_OR_NULL, "variants": MAPPING_OR_NULL,
              "data_mix": LIST_OR_NULL}
    REQUIRED = ("plan", "data_fingerprint", "growth", "fixed_data", "data", "modes")

    plan: dict
    data_fingerprint: str
    growth: dict
    fixed_data: bool
    data: str
    modes: dict[str, list[MemberEntry]]
    train: dict | None = None
    data_mix: list | None = None  # a mixture's [{dir, weight}] (absent: one dataset)
    distill: dict | None = None  # the family's distill: {inherit} (absent: none)
    # distilled variants of finished members, per mode: MemberEntry records named MEMBER+KIND
    variants: dict[str, list[MemberEntry]] | None = None
    consistency: ConsistencySection | None = None
    speculative: SpeculativeSection | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, path: Path | str) -> "Ledger":
        fields = cls._checked(data, "", path)
        modes = {}
        for mode, members in fields["modes"].items():
            if mode not in MODES:
                raise ConfigError(f"{path}: modes has an unknown mode {mode!r}")
            if not isinstance(members, list):
                raise ConfigError(f"{path}: modes.{mode} must be a list, got {shown(members)}")
            modes[mode] = [MemberEntry.from_json(m, f"modes.{mode}[{i}]", path) for i, m in enumerate(members)]
        fields["modes"] = modes
        if fields.get("variants") is not None:
            fields["variants"] = {mode: [MemberEntry.from_json(m, f"variants.{mode}[{i}]", path)
                                         for i, m in enumerate(_list(entries, f"variants.{mode}", path))]
                                  for mode, entries in fields["variants"].items()}
        for key, section in (("consistency", ConsistencySection), ("speculative", SpeculativeSection)):
            if fields.get(key) is not None:
                fields[key] = section.from_json(fields[key], key, path)
        return cls(**fields)

    def to_json(self) -> dict:
        out = super().to_json()
        out["modes"] = {mode: [m.to_json() for m in members] for mode, members in self.modes.items()}
        if self.variants is not None:
            out["variants"] = {mode: [m.to_json() for m in entries] for mode, entries in self.variants.items()}
        return out

    @property
    def built_mode(self) -> str:
        """The mode the family's direction builds beside independent: progressive, or shrink."""
        return "shrink" if self.plan.get("direction") == "shrink" else "progressive"

    def members(self, mode: str) -> list[MemberEntry]:
        """The entries of `mode` in family order ([] when it has none)."""
        return self.modes.get(mode, [])

    def member(self, mode: str, name: str) -> MemberEntry | None:
        return next((m for m in self.members(mode) if m.name == name), None)

    @property
    def stage_names(self) -> list[str]:
        """The members' names in the plan's order (in the ledger's order when the plan names none)."""
        names = [s["name"] for s in self.plan.get("stages", []) if isinstance(s, dict) and isinstance(s.get("name"), str)]
        return names or list(dict.fromkeys(m.name for mode in MODES for m in self.members(mode)))


def read_ledger(out_dir: str | Path) -> Ledger | None:
    """The checked ledger of the family directory `out_dir`; None when it has none."""
    path = FamilyDirectory(out_dir).ledger
    if not path.exists():
        return None
    try:
        return Ledger.from_json(read_json(path), path)
    except OSError as err:
        raise GrowfamError(f"cannot read {path}: {err.strerror or err}") from None


def write_ledger(out_dir: str | Path, ledger: Ledger) -> None:
    """Replace family.json atomically."""
    atomic_write_text(FamilyDirectory(out_dir).ledger, json.dumps(ledger.to_json(), indent=2) + "\n")


def check_same_run(ledger: Ledger | None, fresh: dict, out_dir: Path) -> None:
    """A resumed family must have the plan, the data, the growth options and the train section
    it started with (keys of `fresh`, the JSON values a run would record; train keys that leave
    the loss trajectory alone, RESUME_FREE_KEYS, may change)."""
    if ledger is None:
        return
    for key in ("distill", "plan", "data_fingerprint", "growth", "fixed_data"):
        if key in fresh and getattr(ledger, key) != fresh[key]:
            raise ConfigError(f"{FamilyDirectory(out_dir).ledger} was made with a different {key.replace('_', ' ')}; "
                              "use another --out to build a different family")
    old, new = ledger.train, fresh.get("train")
    if old is None or new is None:
        return  # a ledger from before the train section was recorded
    # keys in both only: a field added to TrainConfig later is not a change of the user's
    differ = [k for k in sorted(set(old) & set(new)) if k not in RESUME_FREE_KEYS and old[k] != new[k]]
    if differ:
        changes = "; ".join(f"{k}: {old[k]!r} then, {new[k]!r} now" for k in differ)
        raise ConfigError(f"{FamilyDirectory(out_dir).ledger} was made with a different train section ({changes}); "
                          "use the original train section, or another --out to build a different family")
