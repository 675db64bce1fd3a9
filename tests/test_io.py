import os
import subprocess
import sys

import pytest

from growfam.errors import GrowfamError
from growfam.io import atomic_directory, atomic_write_text, remove_stale_temporaries


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_written_directories_get_the_umask_permissions_not_0700(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_directory(tmp_path / "out", lambda d: ((d / "sub").mkdir(), (d / "sub" / "w").write_bytes(b"x")))
        atomic_write_text(tmp_path / "f.json", "{}")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "out") == 0o755
    assert _mode(tmp_path / "out" / "sub") == 0o755
    assert _mode(tmp_path / "out" / "sub" / "w") == 0o644
    assert _mode(tmp_path / "f.json") == 0o644


def test_a_failed_write_keeps_the_old_directory_and_leaves_no_temporary(tmp_path):
    atomic_directory(tmp_path / "out", lambda d: (d / "a").write_text("old"))

    def fail(d):
        (d / "a").write_text("new")
        raise OSError(28, "No space left on device")

    with pytest.raises(GrowfamError, match="No space left"):
        atomic_directory(tmp_path / "out", fail)
    assert (tmp_path / "out" / "a").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_stale_temporaries_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / f".step_0000010.tmp-{dead}-abc").mkdir()
    (tmp_path / f".latest.tmp-{dead}").write_text("x")
    (tmp_path / f".m.old-{dead}").mkdir()
    live = tmp_path / f".step_0000020.tmp-{os.getpid()}-xyz"
    live.mkdir()
    (tmp_path / "step_0000005").mkdir()
    removed = remove_stale_temporaries(tmp_path)
    assert len(removed) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "step_0000005"])


def test_a_failed_final_rename_puts_the_old_directory_back(tmp_path, monkeypatch):
    atomic_directory(tmp_path / "out", lambda d: (d / "a").write_text("old"))
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the new directory into place
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(GrowfamError, match="Input/output error"):
        atomic_directory(tmp_path / "out", lambda d: (d / "a").write_text("new"))
    monkeypatch.undo()
    assert (tmp_path / "out" / "a").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_the_output_markers_are_the_names_their_owners_write():
    from growfam import outputs
    from growfam.family.directory import LEDGER
    from growfam.report.markdown import TITLE
    from growfam.report.run import REPORT
    from growfam.train.checkpoint import STATE_FILE, checkpoint_root

    assert outputs.LEDGER_FILE == LEDGER and (outputs.REPORT_FILE, outputs.REPORT_TITLE) == (REPORT, TITLE)
    assert outputs.TRAINER_STATE_FILE == STATE_FILE and checkpoint_root("x").name == outputs.CHECKPOINTS_DIR


def test_kind_of_tells_what_growfam_made_from_what_it_did_not(tmp_path):
    from growfam.outputs import CHECKPOINT, DATASET, FAMILY, FILE, LINK, MODEL, REPORT, RUN, SHRINK, kind_of

    layout = {"fam/family.json": "{}", "fam/progressive/m1/config.json": "{}",
              "fam/progressive/m1/model.safetensors": "", "model/config.json": "{}",
              "model/model.safetensors": "", "run/metrics.jsonl": "", "run/checkpoints/step_1/trainer_state.json": "{}",
              "ds/index.json": "{}", "report/REPORT.md": "# growfam report: x", "notes/a.txt": "mine",
              "small/shrink.json": "{}", "small/model/config.json": "{}", "small/model/model.safetensors": "",
              "fake-report/REPORT.md": "# my report", "file.txt": "mine"}
    for name, text in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "link").symlink_to(tmp_path / "model")
    assert {name: kind_of(tmp_path / name) for name in (
        "fam", "model", "run", "run/checkpoints/step_1", "ds", "report", "notes", "fake-report", "file.txt", "link",
        "nothing", "small", "small/model")} == {"fam": FAMILY, "model": MODEL, "small": SHRINK, "small/model": MODEL, "run": RUN, "run/checkpoints/step_1": CHECKPOINT,
                        "ds": DATASET, "report": REPORT, "notes": None, "fake-report": None, "file.txt": FILE,
                        "link": LINK, "nothing": None}
    for inside in ("fam/progressive", "fam/progressive/m1"):
        assert kind_of(tmp_path / inside) == f"part of the family directory {(tmp_path / 'fam').resolve()}"


def _record_syncs(monkeypatch, fail=None):
    """Log ("sync", path) for each fsync and ("replace", src, dst) for each os.replace, in
    order; with fail=(errno, predicate), an fsync of a path the predicate takes raises."""
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if fail and fail[1](path):
            raise OSError(fail[0], os.strerror(fail[0]))
        events.append(("sync", path))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name a file descriptor")
def test_atomic_writes_are_on_the_disk_before_the_rename_and_the_rename_after(tmp_path, monkeypatch):
    events = _record_syncs(monkeypatch)
    out = atomic_directory(tmp_path / "out", lambda d: ((d / "sub").mkdir(), (d / "sub" / "a").write_text("1"),
                                                         (d / "b").write_text("2")))
    rename = next(i for i, e in enumerate(events) if e[0] == "replace")
    tmp = events[rename][1]
    synced_before = {e[1] for e in events[:rename]}
    assert {tmp, f"{tmp}/sub", f"{tmp}/sub/a", f"{tmp}/b"} <= synced_before  # every file and folder
    assert ("sync", str(tmp_path)) in events[rename + 1:]  # the rename itself
    assert (out / "sub" / "a").read_text() == "1"
    events.clear()
    atomic_write_text(tmp_path / "f.json", "{}")
    assert [e[0] for e in events] == ["sync", "replace", "sync"] and events[-1][1] == str(tmp_path)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name a file descriptor")
def test_a_failed_sync_is_a_failed_write_and_a_folder_that_cannot_sync_is_not(tmp_path, monkeypatch):
    atomic_directory(tmp_path / "out", lambda d: (d / "a").write_text("old"))
    _record_syncs(monkeypatch, fail=(5, lambda path: path.endswith("/a")))  # EIO on the file
    with pytest.raises(GrowfamError, match="cannot write .*out: Input/output error"):
        atomic_directory(tmp_path / "out", lambda d: (d / "a").write_text("new"))
    monkeypatch.undo()
    assert (tmp_path / "out" / "a").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out"]
    _record_syncs(monkeypatch, fail=(22, os.path.isdir))  # EINVAL on folders: a mount that cannot sync them
    atomic_directory(tmp_path / "out", lambda d: (d / "a").write_text("new"))
    assert (tmp_path / "out" / "a").read_text() == "new"
