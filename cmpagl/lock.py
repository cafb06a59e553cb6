"""One training process per run folder: a lock file that names its owner.

Two processes training into one folder would overwrite each other's checkpoints and interleave
their logs. :func:`run_lock` holds ``<folder>/.cmpagl.lock`` while a run trains there:

* the mutual exclusion is an ``flock`` on that file, which the kernel drops when its process
  dies, however it dies; the file's content (pid, host, start time, command) only *names* the
  owner, for the message a second process gets;
* the file is removed when the lock is released, so one left behind comes from a process that
  was killed (SIGKILL, out of memory). On the same host the flock tells that it is free, and the
  next run takes it over with a one-line note. A lock written on another host is not taken over:
  from here nothing can tell whether that process still runs, so the message says which file to
  delete once it does not;
* a process that already holds the lock may take it again (a notebook's ``train_or_resume``
  around :func:`cmpagl.train.train`): the inner hold does nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cmpagl.config import ConfigError

__all__ = ["LOCK_FILE", "LockOwner", "RunFolderInUse", "read_lock", "run_lock"]

LOCK_FILE = ".cmpagl.lock"
# After a SIGKILL the flock lives on in the dead process's data-loader workers until they notice
# (they check every 5 s); a lock whose named owner is dead is waited for this long.
_ORPHAN_WAIT_S = 12.0


class RunFolderInUse(ConfigError):
    """Another process trains in the run folder (``cmpagl train`` exits with status 2)."""


@dataclass(frozen=True)
class LockOwner:
    """What a lock file says about the process that holds it."""

    pid: int
    host: str
    started: str  # local time, "2024-05-01 12:03:07 +0200"
    command: str = ""

    @classmethod
    def this_process(cls) -> LockOwner:
        return cls(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=time.strftime("%Y-%m-%d %H:%M:%S %z"),
            command=shlex.join(sys.argv),
        )

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started}"

    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def is_this_process(self) -> bool:
        return self.on_this_host() and self.pid == os.getpid()

    def alive(self) -> bool:
        """On this host: whether the pid runs (True for another host: nothing to ask)."""
        if not self.on_this_host():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process
            return True
        return True


def read_lock(folder: str | os.PathLike[str], name: str = LOCK_FILE) -> LockOwner | None:
    """The owner named by ``folder``'s lock file ``name``; None without one (or while it is
    written)."""
    try:
        text = (Path(folder) / name).read_text(encoding="utf-8")
        data = json.loads(text)
        return LockOwner(
            int(data["pid"]), str(data["host"]), str(data["started"]), str(data.get("command", ""))
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _flock(fd: int) -> bool | None:
    """Try the exclusive flock: True taken, False held by another open file, None when the
    file system has no flock (then only the file's content can tell)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            return False
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a releasing owner removes it)."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _busy(folder: Path, owner: LockOwner | None, name: str) -> RunFolderInUse:
    path = folder / name
    if owner is None:
        who = "another process (starting up)"
    elif not owner.on_this_host():
        return RunFolderInUse(
            f"{folder} is locked by a training run ({owner.describe()}); cmpagl cannot check a "
            f"process on another host: if that run has ended, delete {path}",
            key="output_dir",
        )
    elif not owner.alive():
        who = f"a leftover process of {owner.describe()}, which has ended"
    else:
        who = owner.describe()
    return RunFolderInUse(
        f"{folder} is in use by another training run ({who}); wait for it to finish, or "
        "train elsewhere with --set output_dir=...",
        key="output_dir",
    )


def _note(text: str) -> None:
    print(f"cmpagl: {text}", file=sys.stderr, flush=True)


def _take(fd: int, path: Path, previous: LockOwner | None) -> None:
    """Write this process into the lock file (after a note if it takes over a stale one)."""
    if previous is not None:
        _note(f"taking over {path} left by {previous.describe()}, which has ended")
    owner = LockOwner.this_process()
    data = json.dumps(dataclasses.asdict(owner)) + "\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, data.encode("utf-8"), 0)
    os.fsync(fd)


def _acquire(folder: Path, wait_s: float, name: str) -> int | None:
    """The locked file's descriptor, or None when this process holds the lock already.

    Raises:
        RunFolderInUse: another process holds it after ``wait_s`` seconds.
    """
    path = folder / name
    start = time.monotonic()
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        taken = _flock(fd)
        if taken and not _same_file(fd, path):  # released and removed while we opened it
            os.close(fd)
            continue
        owner = read_lock(folder, name)
        if taken is None:  # no flock on this file system: the content is all there is
            taken = owner is None or (owner.on_this_host() and not owner.alive())
        if taken and owner is not None and not owner.on_this_host():
            os.close(fd)  # network file systems do not always share flocks between hosts
            raise _busy(folder, owner, name)
        if taken:
            _take(fd, path, owner)
            return fd
        os.close(fd)
        if owner is not None and owner.is_this_process():
            return None
        if owner is None:  # the owner is writing its name: a moment
            limit = max(wait_s, 1.0)
        elif not owner.alive():  # its data-loader workers still hold the flock
            limit = max(wait_s, _ORPHAN_WAIT_S)
        else:
            limit = wait_s
        if time.monotonic() - start >= limit:
            raise _busy(folder, owner, name)
        time.sleep(0.2)


def _release(path: Path, fd: int) -> None:
    try:
        if _same_file(fd, path):
            os.unlink(path)  # while still locked: no one can take the file being removed
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def run_lock(
    folder: str | os.PathLike[str], wait_s: float = 0.0, name: str = LOCK_FILE
) -> Iterator[None]:
    """Hold ``folder``'s training lock for the ``with`` block (the folder is created if needed,
    and removed again if it is still empty at the end).

    Args:
        folder: the run folder (``cfg.output_dir``).
        wait_s: how long to wait for another holder to finish before giving up.
        name: the lock file's name in ``folder``: the training lock by default; a sweep runner
            claims a run with another (:data:`cmpagl.experiments.CLAIM_FILE`).

    Raises:
        RunFolderInUse: another live process holds the lock, or a process on another host
            left one (one line naming it: pid, host, start time).
    """
    folder = Path(folder)
    created = not folder.exists()
    fd = _acquire(folder, wait_s, name)
    if fd is None:  # held by this very process further up the stack
        yield
        return
    try:
        yield
    finally:
        _release(folder / name, fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: nothing was written
