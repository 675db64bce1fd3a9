"""The family directory's layout, named here and nowhere else:

    FAMILY/
      family.json              the ledger (family/ledger.py reads and writes it)
      <mode>/<member>/         each published member, a Hugging Face directory
      runs/<mode>/<member>/    its training run: metrics.jsonl, checkpoints/, growth_report.json
      data/                    the dataset prepared from the YAML's data: section (unless that
                               names a folder of its own)
      report/                  where `growfam report` writes by default
      posttrain/               where `growfam posttrain` writes by default (posttrain/run.py)
      .growfam.lock            the lock a writer holds (growfam.lock)

<mode> is `progressive` or `independent`. growfam/outputs.py recognises a family directory by
its ledger's name too (it imports nothing of growfam; a test checks the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: The two ways a family is built.
MODES = ("progressive", "independent")
LEDGER = "family.json"
RUNS = "runs"
DATA = "data"
REPORT = "report"
POSTTRAIN = "posttrain"
GROWTH_REPORT = "growth_report.json"


@dataclass(frozen=True)
class FamilyDirectory:
    """The paths of the family directory `root`."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def ledger(self) -> Path:
        return self.root / LEDGER

    def mode(self, mode: str) -> Path:
        """The folder of a mode's published members."""
        return self.root / mode

    def member(self, mode: str, name: str) -> Path:
        """A published member's Hugging Face directory."""
        return self.root / mode / name

    def run(self, mode: str, name: str) -> Path:
        """A member's training run (its train config's out_dir)."""
        return self.root / RUNS / mode / name

    def growth_report(self, mode: str, name: str) -> Path:
        """The report of the expansion a progressive member started from."""
        return self.run(mode, name) / GROWTH_REPORT

    @property
    def data(self) -> Path:
        """The dataset's default folder."""
        return self.root / DATA

    @property
    def report(self) -> Path:
        """`growfam report`'s default output."""
        return self.root / REPORT

    @property
    def posttrain(self) -> Path:
        """`growfam posttrain`'s default output."""
        return self.root / POSTTRAIN

    def protected(self) -> list[Path]:
        """What an output of another command must never be, hold or lie inside: the ledger,
        the members, the runs, the dataset and the post-trained members."""
        return [self.ledger, self.root / RUNS, *(self.mode(m) for m in MODES), self.data, self.posttrain]

    @staticmethod
    def of_member(path: str | Path) -> tuple["FamilyDirectory", str] | None:
        """(the family, the mode) when `path` is FAMILY/<mode>/<member> of a family directory;
        None otherwise (links followed)."""
        path = Path(path).resolve()
        family = FamilyDirectory(path.parent.parent)
        if path.parent.name in MODES and family.ledger.is_file():
            return family, path.parent.name
        return None
