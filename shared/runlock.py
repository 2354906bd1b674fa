"""One run per folder: an exclusive lock on the run folder for as long as the run's process lives.

Two runs writing one folder interleave their logs and leave one run's weights beside the other's report. The lock
is a ``flock`` on ``.modaltune.lock`` inside the folder: the kernel releases it when the process ends, however it
ends (``kill -9`` included), so a lock is never stale; the file keeps the holder's PID, start time and command so
the refusal can name them.

Example:
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with RunLock(folder):
    ...     try:
    ...         RunLock(folder).acquire()
    ...     except FolderInUse as exc:
    ...         print("in use by another modaltune run (PID" in str(exc))
    True
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

from modaltune.shared.errors import ModaltuneError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not locked
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".modaltune.lock"


class FolderInUse(ModaltuneError):
    """Another live process holds the run folder."""


def check_out_folder(path: str | Path, option: str = "--out") -> Path:
    """Make sure ``path`` is, or can become, a folder this process can write; returns it.

    Raises:
        ModaltuneError: ``path`` is a file, lies under a file, or cannot be created or written.
    """
    path = Path(path)
    for part in [path, *path.parents]:
        if part.exists() and not part.is_dir():
            where = "is" if part == path else f"lies under {str(part)!r}, which is"
            raise ModaltuneError(f"{option} {str(path)!r} {where} a file, not a folder; give a folder")
        if part.exists():
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModaltuneError(f"{option} {str(path)!r} cannot be created ({exc.strerror}); give a folder you can "
                             "write") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ModaltuneError(f"{option} {str(path)!r} is not writable by this user; give a folder you can write")
    return path


class RunLock:
    """An exclusive, non-blocking lock on a run folder (see the module's docstring)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.fd: int | None = None

    def holder(self) -> dict[str, Any]:
        """What the lock file says about its holder (``{}`` when unreadable)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`FolderInUse` naming the holder."""
        if fcntl is None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ModaltuneError(f"cannot lock the run folder {str(self.folder)!r} ({exc.strerror}); give --out a "
                                 "folder you can write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            who = self.holder()
            raise FolderInUse(
                f"{str(self.folder)!r} is in use by another modaltune run (PID {who.get('pid', '?')} on "
                f"{who.get('host', '?')}, started {who.get('started', '?')}: {who.get('command', '?')}); wait for it "
                "to finish, or give this run another --out"
            ) from None
        self.fd = fd
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": "modaltune " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
        try:
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(record) + "\n").encode())
        except OSError:  # a full disk: the lock holds even when its note cannot be written
            pass
        return self

    def release(self) -> None:
        """Give the lock up (the process's end does the same)."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
