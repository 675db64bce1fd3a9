"""The family directory's layout, named here and nowhere else:

    FAMILY/
      family.json              the ledger (family/ledger.py reads and writes it)
      <mode>/<member>/         each published member, a Hugging Face directory
      runs/<mode>/<member>/    its training run: metrics.jsonl, checkpoints/, growth_report.json;
                               for a member pruned from a larger one (mode shrink), a shrink
                               output (shrink.json, importance.json, pruned/, recovery/: the run)
      data/                    the dataset prepared from the YAML's data: section (unless that
                               names a folder of its own)
      report/                  where `growfam report` writes by default
      posttrain/               where `growfam posttrain` writes by default (posttrain/run.py)
      .growfam.lock            the lock a writer holds (growfam.lock)

<mode> is `progressive`, `independent` or `shrink`. growfam/outputs.py recognises a family directory by
its ledger's name too (it imports nothing of growfam; a test checks the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: The ways a family's members are built: grown (progressive), from scratch (independent), or
#: pruned from a larger member (shrink, a family with direction: shrink).
MODES = ("progressive", "independent", "shrink")
LEDGER = "family.json"


def mode_pairs(built: str) -> tuple[tuple[str, str], ...]:
    """(draft mode, target mode) in Table 5's order for a family whose direction builds `built`
    (progressive or shrink) beside independent."""
    return (built, built), ("independent", built), ("independent", "independent"), (built, "independent")


RUNS = "runs"
DATA = "data"
REPORT = "report"
POSTTRAIN = "posttrain"
GROWTH_REPORT = "growth_report.json"
RECOVERY_RUN = "recovery"  # a pruned member's recovery run, inside its shrink output


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

    def training_run(self, mode: str, name: str, pruned: bool = False) -> Path:
        """Where a member's metrics.jsonl and checkpoints are: its run, or inside it the recovery
        run of a member pruned from a larger one (its run folder is a shrink output)."""
        return self.run(mode, name) / RECOVERY_RUN if pruned else self.run(mode, name)

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
