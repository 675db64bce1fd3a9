"""What growfam writes, recognised on disk by its marker files, so that `--force` replaces only
the kind of thing the command itself writes: a report folder for `report`, a model directory for
`expand`, a shrink output for `shrink`, a dataset for `data prepare`; never a family or anything
inside one, a training run, a checkpoint, nor a user's own folder or file.

Imports nothing of growfam (io.check_output uses it, and every stage uses io). The marker names
belong to the stages that write them; tests/test_io.py checks them against family/ledger.py,
data/dataset.py, train/ and report/.
"""

from __future__ import annotations

from pathlib import Path

FAMILY = "a family directory"
REPORT = "a growfam report"
CHECKPOINT = "a training checkpoint"
RUN = "a training run"
DATASET = "a prepared dataset"
MODEL = "a model directory"
SHRINK = "a shrink output"
FILE = "a file"
LINK = "a link"

# The marker files and folders (the owners' names; see the module docstring).
LEDGER_FILE = "family.json"
REPORT_FILE, REPORT_TITLE = "REPORT.md", "# growfam report"
TRAINER_STATE_FILE, CHECKPOINTS_DIR, METRICS_FILE = "trainer_state.json", "checkpoints", "metrics.jsonl"
DATASET_INDEX, DATASET_SETTINGS = "index.json", "prepare.json"  # a dataset; one being prepared
SHRINK_FILE = "shrink.json"
MODEL_CONFIG, MODEL_WEIGHTS = "config.json", ("model.safetensors", "model.safetensors.index.json")


def _is_report(path: Path) -> bool:
    try:
        with open(path / REPORT_FILE, encoding="utf-8") as file:
            return file.read(len(REPORT_TITLE)) == REPORT_TITLE
    except (OSError, UnicodeDecodeError):
        return False


def kind_of(path: str | Path) -> str | None:
    """What growfam made at `path`: FAMILY, REPORT, SHRINK, CHECKPOINT, RUN, DATASET or MODEL; a folder
    inside a family directory is "part of the family directory F"; FILE and LINK for those;
    None for nothing there, an empty folder, or a folder growfam did not make."""
    path = Path(path)
    if path.is_symlink():
        return LINK
    if not path.exists():
        return None
    if not path.is_dir():
        return FILE
    if _is_report(path):
        return REPORT
    for folder in (path, *path.resolve().parents):
        if (folder / LEDGER_FILE).is_file():
            return FAMILY if folder == path.resolve() else f"part of the family directory {folder}"
    if (path / SHRINK_FILE).is_file():
        return SHRINK
    if (path / TRAINER_STATE_FILE).is_file():
        return CHECKPOINT
    if (path / CHECKPOINTS_DIR).is_dir() or (path / METRICS_FILE).is_file():
        return RUN
    if (path / DATASET_INDEX).is_file() or (path / DATASET_SETTINGS).is_file():
        return DATASET
    if (path / MODEL_CONFIG).is_file() and any((path / name).is_file() for name in MODEL_WEIGHTS):
        return MODEL
    return None
