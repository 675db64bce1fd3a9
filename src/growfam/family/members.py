"""A family's members as the commands that use them see them (eval, consistency, speculate): a
family directory (every finished member of every mode) or one member directory (any Hugging
Face Llama directory; one inside a family directory, FAMILY/<mode>/<member>, is that family's
member), and LoadedMembers, the models loaded a pair at a time.

Everything is checked here, before any model is loaded: every member is a model directory
whose weight files' headers hold the tensors its config needs (a cut or corrupt file is
refused before any member is evaluated), and a family's dataset is the one its ledger names
(by fingerprint).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from growfam.errors import GrowfamError
from growfam.family.directory import LEDGER, MODES, FamilyDirectory
from growfam.family.ledger import Ledger, read_ledger
from growfam.lock import folder_lock
from growfam.model import check_pretrained, load_pretrained
from growfam.model.config import ModelConfig


@dataclass
class Member:
    """One model to evaluate: `mode` is None for a directory outside any family."""

    name: str
    mode: str | None
    path: Path
    config: ModelConfig


@dataclass
class Target:
    """The members to evaluate and, for a family, its directory and ledger."""

    members: list[Member]
    family_dir: Path | None = None
    ledger: Ledger | None = None

    def dataset(self):
        """The family's prepared dataset: the ledger's `data`, or FAMILY/data, whichever has the
        ledger's fingerprint; GrowfamError when neither does."""
        from growfam.data import MIXTURE_FILE, open_dataset

        if self.family_dir is None:
            raise GrowfamError("the validation split needs a family directory (this member is not in one)")
        recorded = self.ledger.data
        for candidate in dict.fromkeys((Path(recorded), FamilyDirectory(self.family_dir).data)):
            if (candidate / "index.json").is_file() or (candidate / MIXTURE_FILE).is_file():
                dataset = open_dataset(candidate)
                if dataset.fingerprint() == self.ledger.data_fingerprint:
                    return dataset
        raise GrowfamError(f"{self.family_dir}: its dataset ({recorded}) is missing or is not the one the "
                           "family was trained on (family.json data / data_fingerprint)")

    def recording(self, command: str) -> contextlib.AbstractContextManager:
        """The family directory's lock (growfam.lock) while `command` records its results in the
        ledger: a read-only directory or another writer is one GrowfamError, before any work.
        Nothing to hold for a member outside a family."""
        if self.family_dir is None:
            return contextlib.nullcontext()
        return folder_lock(self.family_dir, f"; {command} records its results in {LEDGER} there")

    def variants(self, kind: str | None = None) -> list[tuple[Member, Member, Member]]:
        """(member, variant, teacher) of each distilled variant the ledger records (of `kind`,
        retro or draft, when given), in each mode, their weights checked from the headers."""
        out = []
        for mode, entries in ((self.ledger.variants or {}) if self.ledger is not None else {}).items():
            for entry in entries:
                names = (entry.extra.get("of"), entry.name, entry.extra.get("teacher_member"))
                if not all(isinstance(n, str) for n in names):
                    raise GrowfamError(f"{FamilyDirectory(self.family_dir).ledger}: variants.{mode} entry "
                                       f"{entry.name!r} lacks its member (`of`) or teacher (`teacher_member`)")
                if kind is None or entry.extra.get("kind") == kind:
                    out.append(tuple(_member(name, mode, FamilyDirectory(self.family_dir).member(mode, name))
                                     for name in names))
        return out

    def window(self) -> int:
        """Context of the perplexity and consistency windows: the family's training seq_len (the
        same windows for every member), else the member's max_seq_len."""
        stages = self.ledger.plan.get("stages") or [] if self.ledger is not None else []
        lengths = [s["seq_len"] for s in stages if isinstance(s, dict) and isinstance(s.get("seq_len"), int)]
        return min(lengths + [m.config.max_seq_len for m in self.members])


class LoadedMembers:
    """Members' models, loaded on first use in float32 on `device` and kept `keep` at a time
    (the one loaded first goes first): a pair walk over a family holds a pair in memory.
    on_load(model) runs once after each load (e.g. a warm-up)."""

    def __init__(self, device: torch.device, keep: int = 2, on_load=None):
        self.device, self.keep, self.on_load = device, keep, on_load
        self.loaded: dict[Path, torch.nn.Module] = {}

    def __call__(self, member: Member) -> torch.nn.Module:
        if member.path not in self.loaded:
            if len(self.loaded) >= self.keep:
                self.loaded.pop(next(iter(self.loaded)))
            model = load_pretrained(member.path, dtype=torch.float32, device=self.device).eval()
            if self.on_load is not None:
                self.on_load(model)
            self.loaded[member.path] = model
        return self.loaded[member.path]


def _member(name: str, mode: str | None, path: Path) -> Member:
    """The member at `path`, its weights checked from their headers (model.check_pretrained):
    a corrupt member is refused before any other is evaluated."""
    return Member(name, mode, path, check_pretrained(path))


def resolve_target(path: str | Path) -> Target:
    """A family directory (it holds family.json) or a model directory (config.json);
    GrowfamError for anything else, a family without finished members, or a listed member
    whose directory is not a model."""
    path = Path(path)
    if not path.is_dir():
        raise GrowfamError(f"{path}: {'not a directory' if path.exists() else 'no such directory'}")
    if FamilyDirectory(path).ledger.is_file():
        ledger = read_ledger(path)
        members = [_member(m.name, mode, FamilyDirectory(path).member(mode, m.name))
                   for mode in MODES for m in ledger.members(mode) if m.done]
        if not members:
            raise GrowfamError(f"{path}: the family has no finished member yet")
        return Target(members, path, ledger)
    if not (path / "config.json").is_file():
        raise GrowfamError(f"{path}: not a model directory (no config.json) nor a family directory "
                           f"(no {LEDGER})")
    inside = FamilyDirectory.of_member(path)
    if inside is not None:
        family, mode = inside
        ledger = read_ledger(family.root)
        entry = ledger.member(mode, path.name)
        if entry is not None and entry.done:
            return Target([_member(path.name, mode, path)], family.root, ledger)
    return Target([_member(path.name, None, path)])
