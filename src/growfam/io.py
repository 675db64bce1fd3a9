"""Files on disk: readers of YAML and JSON that fail in one line, and atomic writes (a file or
directory appears whole or not at all, and what it replaces survives every failure before the
final rename). Imports only growfam.errors.

Atomic means durable too: what is published is fsynced before the rename (its files and
folders) and the folder holding it after, so a power cut leaves the old version or the whole new
one, never a renamed file whose blocks were not yet written.

Temporaries are siblings named `.NAME.tmp-PID-XXXX` (so a rename never crosses a file system),
and `remove_stale_temporaries` deletes those a killed process left behind. Everything written
gets the usual permissions (0666/0777 less the umask), not the 0600/0700 of `tempfile`:
published members are shared.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from contextlib import suppress
from pathlib import Path

import yaml

from growfam.errors import ConfigError, GrowfamError
from growfam.outputs import FILE, LINK, kind_of

_TMP = ".tmp-"
_OLD = ".old-"


def _parse(path: str | Path, parse: Callable[[str], object], error: type[Exception],
           describe: Callable[[Exception], str]):
    """parse(the file's text); ConfigError naming the file when it is missing, not text, or
    `parse` raises `error` (described by `describe`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        return parse(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    except error as err:
        raise ConfigError(f"{path}: {describe(err)}") from None


def _yaml_problem(err: Exception) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"malformed YAML{where}: {problem}"


def read_yaml(path: str | Path):
    """Parse a YAML (or JSON, a YAML subset) file; ConfigError on a missing or malformed file."""
    return _parse(path, yaml.safe_load, yaml.YAMLError, _yaml_problem)


def read_json(path: str | Path):
    """Parse a JSON file; ConfigError on a missing, non-text or malformed file."""
    return _parse(path, json.loads, json.JSONDecodeError, lambda err: f"malformed JSON: {err}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _open_permissions(root: Path) -> None:
    """chmod root and everything under it to the umask's defaults."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


def _describe(err: OSError) -> str:
    return err.strerror or str(err)


# How the Rust writers (safetensors, tokenizers) name the OS error behind a failed write.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def os_error_of(err: BaseException) -> OSError | None:
    """The OSError behind a failed write, or None when there is none (a bug keeps its traceback).

    Writers report a full disk in their own ways: Python raises the OSError; torch.save into a
    Python file object raises a RuntimeError whose context is the OSError; safetensors and
    tokenizers raise their own exception naming "(os error 28)"; torch.distributed.checkpoint
    gathers each rank's exception in `failures`. A GrowfamError is already a user's message: no
    OSError is looked for behind it, nor behind a context suppressed with `raise ... from None`."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        err = todo.pop(0)
        if err is None or id(err) in seen or isinstance(err, GrowfamError):
            continue
        seen.add(id(err))
        if isinstance(err, OSError):
            return err
        match = _RUST_OS_ERROR.search(str(err))
        if match:
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
        failures = getattr(err, "failures", None)
        if isinstance(failures, dict):  # DCP's CheckpointException: {rank: (exception, traceback)}
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [err.__cause__, None if err.__suppress_context__ else err.__context__]
    return None


def write_error(path: str | Path, err: BaseException) -> GrowfamError | None:
    """The one-line GrowfamError for a write of `path` that failed with `err`: "cannot write
    PATH: REASON"; None when no OSError lies behind `err` (see os_error_of)."""
    problem = os_error_of(err)
    return None if problem is None else GrowfamError(f"cannot write {path}: {_describe(problem)}")


def sync_file(file) -> None:
    """Flush an open binary or text file object to the disk (fsync)."""
    file.flush()
    os.fsync(file.fileno())


def sync_path(path: str | Path) -> None:
    """fsync a file or a folder by its path (a folder: the names in it, e.g. after a rename). A
    file system that cannot sync it (EINVAL, ENOTSUP: some network and FUSE mounts refuse
    folders) is left as it is; any other failure (EIO) is the OSError."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    """fsync every file and folder under `root`, then `root` (links are not followed)."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                sync_path(path)
        sync_path(folder)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary sibling and os.replace, durably (see the module
    docstring); GrowfamError on an OSError (the old file, if any, is left as it was)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{_TMP}{os.getpid()}")
    try:
        with open(tmp, "w") as file:
            file.write(text)
            sync_file(file)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        sync_path(path.parent)
    except OSError as err:
        with suppress(OSError):  # cleaning up must not hide the first error (a read-only folder)
            tmp.unlink(missing_ok=True)
        raise GrowfamError(f"cannot write {path}: {_describe(err)}") from None
    return path


def atomic_directory(out_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)`, then move tmp_dir to `out_dir`, replacing any old one last.

    The old directory (or file) survives until the new one is complete; a failed write (an
    unwritable path, a full disk: an OSError, or a writer's exception with one behind it, see
    os_error_of) becomes a GrowfamError and leaves the old one untouched. The temporaries a
    killed write of the same `out_dir` left are removed first.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_dir.parent, name=out_dir.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{_TMP}{os.getpid()}-", dir=out_dir.parent))
    except OSError as err:
        raise GrowfamError(f"cannot write to {out_dir.parent}: {_describe(err)}") from None
    try:
        write(tmp)
        _open_permissions(tmp)
        _sync_tree(tmp)
        publish_directory(tmp, out_dir)
        sync_path(out_dir.parent)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, GrowfamError):  # a nested writer's, or bad input met on the way: as it is
            if str(tmp) not in str(err):
                raise
            raise type(err)(str(err).replace(str(tmp), str(out_dir))) from None  # users never see temporaries
        # not an interruption (torch.distributed.checkpoint's CheckpointException is a BaseException)
        failed = None if isinstance(err, (KeyboardInterrupt, SystemExit)) else write_error(out_dir, err)
        if failed is None:
            raise
        raise failed from None
    return out_dir


def publish_directory(tmp: Path, out_dir: Path) -> None:
    """Move the complete directory `tmp` to `out_dir` (a sibling), replacing whatever is there
    last: the old one is moved aside, the new one renamed in, then the old one deleted (put
    back if the rename fails). OSError as it comes."""
    if out_dir.exists() or out_dir.is_symlink():
        old = out_dir.with_name(f".{out_dir.name}{_OLD}{os.getpid()}")
        os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            os.replace(old, out_dir)  # put the old one back before reporting
            raise
        remove_path(old)
    else:
        os.replace(tmp, out_dir)


def remove_path(path: Path) -> None:
    """Delete a file, link or directory tree; a missing one is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | Path, name: str | None = None) -> list[Path]:
    """Delete the `.NAME.tmp-PID…` / `.NAME.old-PID` entries of `folder` whose process is gone
    (a killed write), only those of `name` when it is given; returns what was removed. Entries
    of live processes are left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if not entry.name.startswith("."):
            continue
        for marker in (_TMP, _OLD):
            head, sep, tail = entry.name.rpartition(marker)
            pid = tail.split("-", 1)[0]
            ours = head != "" if name is None else head == f".{name}"
            if sep and ours and pid.isdigit() and not _alive(int(pid)):
                remove_path(entry)
                removed.append(entry)
                break
    return removed


def check_output(path: str | Path, *, force: bool, makes: str, sources: Iterable[str | Path] = (),
                 what: str = "output") -> None:
    """GrowfamError unless `path` may be written as a new file or directory, before any work.

    makes: what the command writes there, a kind of growfam.outputs (MODEL, DATASET, REPORT or
    FILE). An existing path of that kind (or a link) is replaced only with `force`; anything else
    there (a family or part of one, a run, a checkpoint, a user's own folder or file) is refused
    even with `force`: --force replaces only what the same command makes. An empty folder is
    fine for a folder. Never one of `sources`, a path inside one or a folder holding one (links
    followed). The nearest existing folder above `path` must be writable. `what` names the path
    in messages (e.g. "--out").
    """
    path = Path(path)
    real = Path(os.path.realpath(path))
    for source in sources:
        src = Path(os.path.realpath(source))
        if real == src or src in real.parents or real in src.parents:
            relation = "is" if real == src else "is inside" if src in real.parents else "contains"
            raise GrowfamError(f"{what} {path} {relation} the source directory {source}; "
                               "growfam never writes there (choose another path)")
    try:
        folder = next(p for p in path.absolute().parents if p.exists())
        if not folder.is_dir():
            raise GrowfamError(f"{what} {path}: cannot write in {folder} (not a folder)")
        check_writable(folder)
        if path.exists() and not (path.is_symlink() or path.is_file() or path.is_dir()):
            raise GrowfamError(f"{what} {path} is not a file or folder growfam can replace")  # a device, a pipe
        empty = path.is_dir() and not path.is_symlink() and not any(path.iterdir())
        kind = None if empty else kind_of(path)
    except OSError as err:  # a name too long, a folder we may not list
        raise GrowfamError(f"cannot use {what} {path}: {_describe(err)}") from None
    if empty and makes == FILE:
        raise GrowfamError(f"{what} {path} is a folder; give a file name")
    if empty or not (path.exists() or path.is_symlink()):
        return
    if kind not in (makes, LINK):
        raise GrowfamError(f"{what} {path} is {kind or 'a folder growfam did not make'}; growfam replaces only "
                           f"{makes} there, even with --force (move it away or choose another path)")
    if not force:
        raise GrowfamError(f"{what} {path} already exists as {kind}; pass --force to replace it")


def check_folder(path: str | Path, what: str) -> None:
    """GrowfamError unless `path` can be a folder to write into: it, or the nearest folder
    above it that exists, is a directory (new and existing folders are both fine)."""
    path = Path(path)
    for entry in (path, *path.parents):
        if entry.exists() or entry.is_symlink():
            if not entry.is_dir():
                raise GrowfamError(f"cannot write to {what} {path}: {entry} is not a directory")
            return


def check_writable(folder: str | Path, purpose: str = "") -> None:
    """GrowfamError unless a file can be created and removed in the existing folder `folder`,
    tried for real: `os.access` passes root in a folder without write permission. `purpose`
    ends the message (e.g. "; eval records its results there")."""
    probe = Path(folder) / f".growfam-probe{_TMP}{os.getpid()}"
    try:
        with open(probe, "w"):
            pass
        probe.unlink()
    except OSError as err:
        raise GrowfamError(f"cannot write in {folder}: {_describe(err)}{purpose}") from None
