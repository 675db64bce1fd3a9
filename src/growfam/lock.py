"""One writer per folder: the advisory lock a command holds on the folder it writes into (a
training run's out_dir, a family directory).

`folder_lock(folder)` takes an exclusive `flock` on FOLDER/.growfam.lock and writes the holder's
pid, host and command into it. A second process that tries gets one GrowfamError naming that
pid instead of interleaving its writes with the first's. The operating system releases a flock
when its process ends, however it ends (kill -9 included), so a lock is never stale and the
next run simply takes it; the file itself stays (deleting it would race with a process about
to lock it). Taking the lock is also the check that the folder can be written, made before any
work. Re-entrant within a process: a family run holds its directory's lock while it evaluates
its members, which takes the same lock again.

Under torchrun only rank 0 takes it (see `growfam.train.parallel.on_main`). Imports only
growfam.errors and growfam.io.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from growfam.errors import GrowfamError
from growfam.io import check_writable

LOCK_FILE = ".growfam.lock"

_held: dict[str, list[int]] = {}  # real path of a folder -> [lock file descriptor, depth]


def _holder(fd: int) -> str:
    """What the lock file says of its holder ("pid 123 on HOST: growfam train ..."), as far as
    it can be read."""
    try:
        text = os.pread(fd, 1000, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown"


@contextmanager
def folder_lock(folder: str | Path, purpose: str = "") -> Iterator[None]:
    """Hold `folder`'s lock (the folder is created if need be) for the `with` block.

    GrowfamError, before anything else is written, when the folder cannot be created or
    written (`purpose` ends that message) or another process holds the lock (the message names
    its pid, host and command)."""
    folder = Path(folder)
    key = os.path.realpath(folder)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GrowfamError(f"cannot create {folder}: {err.strerror or err}{purpose}") from None
    check_writable(folder, purpose)
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise GrowfamError(f"cannot write in {folder}: {err.strerror or err}{purpose}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise GrowfamError(f"{folder} is in use by another growfam process ({holder}); wait for it to "
                           "finish or stop it, then run this again") from None
    except OSError as err:  # a file system without locks
        os.close(fd)
        raise GrowfamError(f"cannot lock {folder / LOCK_FILE}: {err.strerror or err}") from None
    command = " ".join(sys.argv)[:300]
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}: {command}\n".encode(), 0)
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            del _held[key]
            os.close(fd)  # releases the lock
