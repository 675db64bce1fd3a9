"""What a report reads from a family directory: its checked ledger and its members' curves,
labelled by the directory's name (several families in one report are told apart by it)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from growfam.errors import ConfigError
from growfam.family.directory import LEDGER, MODES, FamilyDirectory
from growfam.family.ledger import Ledger, MemberEntry, read_ledger
from growfam.report.curves import MemberCurve, member_curves
from growfam.report.equal_flops import EqualLoss, flops_to_equal_loss


@dataclass
class FamilySource:
    """One family directory. curves: per mode, the members that can be drawn; missing: a note
    per member that cannot (no metrics.jsonl, not finished)."""

    path: Path
    label: str
    ledger: Ledger
    curves: dict[str, list[MemberCurve]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The family's name as its plan records it ("family" when it does not)."""
        name = self.ledger.plan.get("name")
        return name if isinstance(name, str) else "family"

    @property
    def slug(self) -> str:
        """The label as a file-name prefix."""
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.label).strip("-.") or "family"

    def members(self, mode: str) -> list[MemberEntry]:
        return self.ledger.members(mode)

    @property
    def built(self) -> str:
        """The mode compared with independent: progressive, or shrink (a family built downward)."""
        return self.ledger.built_mode

    def equal_loss(self) -> list[EqualLoss]:
        """FLOPs to equal loss per member (report/equal_flops.py); built downward, the independent
        family's cost of a member counts the members from the largest down to it."""
        cost = None
        if self.built == "shrink":
            cost, total = {}, 0.0
            for entry in reversed(self.members("independent")):
                total += entry.spent_flops
                cost[entry.name] = total
        return flops_to_equal_loss(self.curves.get(self.built, []), self.curves.get("independent", []), cost)

    def protected(self) -> list[Path]:
        """What a report must never write over or into: the ledger, the members, the runs and
        the dataset."""
        return [*FamilyDirectory(self.path).protected(), Path(self.ledger.data)]


def load_family(path: str | Path, label: str | None = None) -> FamilySource:
    """The family directory at `path`, checked; ConfigError when it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: not a family directory ({'a file' if path.exists() else 'no such directory'})")
    ledger = read_ledger(path)
    if ledger is None:
        raise ConfigError(f"{path}: not a family directory (no {LEDGER}; `growfam family run` writes one)")
    source = FamilySource(path, label or path.resolve().name, ledger)
    for mode in MODES:
        source.curves[mode], missing = member_curves(path, ledger, mode)
        source.missing += missing
    return source


def load_families(paths: list[str | Path]) -> list[FamilySource]:
    """Every family directory, checked, labelled by its name; a name two of them share is
    labelled by the path as given. The same directory twice is an error."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ConfigError("no family directory given")
    seen = {}
    for p in paths:
        key = p.resolve()
        if key in seen:
            raise ConfigError(f"{p}: the same family directory is given twice ({seen[key]})")
        seen[key] = p
    names = [p.resolve().name for p in paths]
    return [load_family(p, name if names.count(name) == 1 else str(p)) for p, name in zip(paths, names)]
