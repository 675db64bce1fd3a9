"""The family's ledger, family.json: what run_family planned and did, per mode and member.

`read_ledger` / `write_ledger` read and atomically replace it; `check_ledger` checks its
structure; `_check_same_run` refuses to resume a family directory with another plan, data,
growth section or train section.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from growfam.checks import shown
from growfam.errors import ConfigError, GrowfamError
from growfam.family.directory import LEDGER, MODES, FamilyDirectory
from growfam.io import atomic_write_text, read_json
from growfam.train import RESUME_FREE_KEYS


# The ledger's structure, as (description, accepted types) per field: what run_family writes
# and what it and format_comparison read. `bool` is accepted only where named (it is an int).
_TEXT = ("a string", (str,))
_NUMBER = ("a number", (int, float))
_NUMBER_OR_NULL = ("a number or null", (int, float, type(None)))
_FLAG = ("true or false", (bool,))
_MAPPING = ("a mapping", (dict,))

#: Top-level fields; `train` is optional (ledgers written before it was recorded lack it).
_LEDGER_FIELDS = {"plan": _MAPPING, "data_fingerprint": _TEXT, "growth": _MAPPING, "fixed_data": _FLAG,
                  "data": _TEXT, "modes": _MAPPING, "train": _MAPPING}
_LEDGER_REQUIRED = ("plan", "data_fingerprint", "growth", "fixed_data", "data", "modes")
#: Member fields; every member has all but `stopped_early` (run_family writes whole entries).
_MEMBER_FIELDS = {"name": _TEXT, "done": _FLAG, "params": _NUMBER, "tokens": _NUMBER, "flops": _NUMBER,
                  "cum_flops": _NUMBER, "wall_s": _NUMBER, "val_loss": _NUMBER_OR_NULL,
                  "stopped_early": _FLAG}
_MEMBER_REQUIRED = ("name", "done", "params", "tokens", "flops", "cum_flops", "wall_s", "val_loss")


def _check_fields(data: dict, fields: dict, required: tuple[str, ...], where: str, path: Path) -> None:
    """ConfigError naming `path` and `where`+key for a missing `required` key or a mistyped one."""
    for key in required:
        if key not in data:
            raise ConfigError(f"{path}: {where}{key} is missing")
    for key, (description, types) in fields.items():
        value = data.get(key)
        if key in data and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            raise ConfigError(f"{path}: {where}{key} must be {description}, got {shown(value)}")


def check_ledger(ledger: Any, path: Path) -> dict:
    """`ledger` (the content of family.json at `path`) if it has the structure run_family
    writes; ConfigError naming the file and the first thing wrong otherwise."""
    if not isinstance(ledger, dict):
        raise ConfigError(f"{path}: the ledger must be a mapping, got {shown(ledger)}")
    _check_fields(ledger, _LEDGER_FIELDS, _LEDGER_REQUIRED, "", path)
    for mode, members in ledger["modes"].items():
        if mode not in MODES:
            raise ConfigError(f"{path}: modes has an unknown mode {mode!r}")
        if not isinstance(members, list):
            raise ConfigError(f"{path}: modes.{mode} must be a list, got {shown(members)}")
        for i, member in enumerate(members):
            where = f"modes.{mode}[{i}]"
            if not isinstance(member, dict):
                raise ConfigError(f"{path}: {where} must be a mapping, got {shown(member)}")
            _check_fields(member, _MEMBER_FIELDS, _MEMBER_REQUIRED, where + ".", path)
    return ledger


def read_ledger(out_dir: Path) -> dict:
    """The checked ledger of the family directory `out_dir`; {} when it has none."""
    path = FamilyDirectory(out_dir).ledger
    if not path.exists():
        return {}
    try:
        return check_ledger(read_json(path), path)
    except OSError as err:
        raise GrowfamError(f"cannot read {path}: {err.strerror or err}") from None


def write_ledger(out_dir: Path, ledger: dict) -> None:
    """Replace family.json atomically."""
    atomic_write_text(FamilyDirectory(out_dir).ledger, json.dumps(ledger, indent=2) + "\n")


def _check_same_run(ledger: dict, fresh: dict, out_dir: Path) -> None:
    """A resumed family must have the plan, the data, the growth options and the train section
    it started with (keys of `fresh` only; train keys that leave the loss trajectory alone,
    RESUME_FREE_KEYS, may change)."""
    for key in ("plan", "data_fingerprint", "growth", "fixed_data"):
        if key in ledger and key in fresh and ledger[key] != fresh[key]:
            raise ConfigError(f"{FamilyDirectory(out_dir).ledger} was made with a different {key.replace('_', ' ')}; "
                              "use another --out to build a different family")
    old, new = ledger.get("train"), fresh.get("train")
    if old is None or new is None:
        return  # a ledger from before the train section was recorded
    # keys in both only: a field added to TrainConfig later is not a change of the user's
    differ = [k for k in sorted(set(old) & set(new)) if k not in RESUME_FREE_KEYS and old[k] != new[k]]
    if differ:
        changes = "; ".join(f"{k}: {old[k]!r} then, {new[k]!r} now" for k in differ)
        raise ConfigError(f"{FamilyDirectory(out_dir).ledger} was made with a different train section ({changes}); "
                          "use the original train section, or another --out to build a different family")
