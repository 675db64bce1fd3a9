"""`growfam report` as a function: check the family directories and the output folder, render
REPORT.md, then draw the figures and write everything into the folder at once (atomically: an
old report survives every failure until the new one is complete)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from growfam import outputs
from growfam.errors import ConfigError
from growfam.family.directory import FamilyDirectory
from growfam.io import atomic_directory, check_output
from growfam.report.figures import equal_flops_chart, figure2, posttrain_curves, training_curves
from growfam.report.markdown import FIGURES, figure_names, headline, render
from growfam.report.source import FamilySource, load_families

REPORT = "REPORT.md"


@dataclass
class Report:
    """What `write_report` wrote: the folder, its files, and each family's headline lines."""

    folder: Path
    files: list[str]
    headlines: list[tuple[str, list[str]]]  # (family label, lines)

    @property
    def path(self) -> Path:
        return self.folder / REPORT


def check_report(paths: list[str | Path], out: str | Path | None, force: bool) -> tuple[list[FamilySource], Path]:
    """The families and the output folder, checked before anything is drawn or written. out:
    default FAMILY_DIR/report for one family; several need one. The folder may not hold or lie
    inside a family's ledger, members, runs or dataset, even with `force`."""
    sources = load_families(paths)
    if out is None:
        if len(sources) > 1:
            raise ConfigError("a report of several families needs --out DIR")
        out = FamilyDirectory(sources[0].path).report
    check_output(out, force=force, makes=outputs.REPORT, sources=[p for s in sources for p in s.protected()],
                 what="--out")
    return sources, Path(out)


def write_report(paths: list[str | Path], out: str | Path | None = None, force: bool = False) -> Report:
    """Write REPORT.md and its PNG figures for one family directory, or several side by side."""
    sources, out = check_report(paths, out, force)
    several = len(sources) > 1
    figures = [figure_names(s, several) for s in sources]
    overlay = {}
    if several:
        overlay = {key: FIGURES[key] for key in ("figure2", "equal_flops") if any(key in f for f in figures)}
    text = render(sources, figures, overlay)  # a malformed ledger section fails here, before any write
    files = [REPORT, *overlay.values(), *(name for f in figures for name in f.values())]

    def write(folder: Path) -> None:
        for source, names in zip(sources, figures):
            if "figure2" in names:
                figure2([(source.label, source.curves)], folder / names["figure2"])
                training_curves(source.label, source.curves, folder / names["training"])
            if "equal_flops" in names:
                equal_flops_chart([(source.label, source.equal_loss())], folder / names["equal_flops"])
            if "posttrain" in names:
                posttrain_curves(source.ledger.extra.get("posttrain"), folder / names["posttrain"])
        if "figure2" in overlay:
            figure2([(s.label, s.curves) for s in sources], folder / overlay["figure2"])
        if "equal_flops" in overlay:
            equal_flops_chart([(s.label, s.equal_loss()) for s in sources], folder / overlay["equal_flops"])
        (folder / REPORT).write_text(text + "\n")

    atomic_directory(out, write)
    return Report(out, files, [(s.label, headline(s)) for s in sources])
