"""The run folder: one run per folder, nothing of another run overwritten, leftovers cleared, and how a run ended.

- :class:`RunLock`: a run holds an exclusive lock on its folder while its process lives. Two runs writing one
  folder interleave their logs and leave one run's weights beside the other's report. The lock is a ``flock`` on
  ``.modaltune.lock`` inside the folder: the kernel releases it when the process ends, however it ends (``kill -9``
  included), so a lock is never stale; the file keeps the holder's PID, host, start time and command so a refusal
  can name them.
- :func:`check_out_folder` / :func:`check_run_folder`: an ``--out`` that is a file or cannot be written, or that
  holds a finished or unfinished run a new one would overwrite, is refused before any work.
- :func:`remove_stale_temp_files`: the temporary files an interrupted atomic write left.
- :func:`regressions`: a finished run whose key metrics ended worse than before tuning (``status: regressed``).

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modaltune.shared import checkpoint as ckpt
from modaltune.shared.errors import ModaltuneError
from modaltune.shared.spread import lower_is_better

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not locked
    fcntl = None  # type: ignore[assignment]

FINISHED = ("ok", "regressed")  # statuses of a run that trained and measured to the end
EXIT_REGRESSED = 3  # exit code of a run that finished but measured worse than before (see Recipe.regression_margins)


def regressions(before: dict[str, float], after: dict[str, float], margins: dict[str, float]) -> list[str]:
    """The metrics of ``margins`` that ended worse than they started by more than their margin.

    Example:
        >>> regressions({"test/wer": 0.43, "test/acc": 0.5}, {"test/wer": 1.0, "test/acc": 0.6},
        ...             {"test/wer": 0.02, "test/acc": 0.02})
        ['test/wer 0.4300 -> 1.0000 (worse by more than 0.02)']
    """
    out = []
    for key, margin in margins.items():
        b, a = before.get(key), after.get(key)
        if not isinstance(b, (int, float)) or not isinstance(a, (int, float)):
            continue
        worse = a - b if lower_is_better(key) else b - a
        if worse > margin or a != a:  # NaN after: worse than anything
            out.append(f"{key} {b:.4f} -> {a:.4f} (worse by more than {margin:g})")
    return out


def unfinished(run_dir: Path) -> str | None:
    """What in ``run_dir`` belongs to a run that did not finish (a stage's checkpoint, a partial final one)."""
    final = run_dir / "checkpoint"
    if final.is_dir() and ckpt.problem(final, hashes=False) is not None:
        return f"{final} is incomplete ({ckpt.problem(final, hashes=False)})"
    stages = run_dir / "stages"
    if stages.is_dir():
        for folder in sorted(stages.glob("*/checkpoint-*")) + sorted(stages.glob("*/final")):
            if folder.is_dir():
                return f"it holds {folder.relative_to(run_dir)}"
    return None


def remove_stale_temp_files(run_dir: Path, log: Callable[[str], None]) -> None:
    """Delete the temporary files of atomic writes a killed process left in its run folder (the lock is ours, so
    no live writer owns them)."""
    stale = [f for f in run_dir.rglob(".*.tmp") if f.is_file()]
    for f in stale:
        f.unlink(missing_ok=True)
    if stale:
        log(f"removed {len(stale)} temporary file(s) an interrupted write left behind (e.g. {stale[0].name})")


def check_run_folder(run_dir: Path, *, mode: str, resume: bool) -> None:
    """Refuse a ``--out`` that holds another run (finished or not) this one would overwrite."""
    if mode != "run" or resume:
        return
    if ckpt.problem(run_dir / "checkpoint", hashes=False) is None:
        raise ModaltuneError(
            f"{str(run_dir)!r} already holds a finished run; choose another --out, or pass train.resume=true"
        )
    left = unfinished(run_dir)
    if left is not None:
        raise ModaltuneError(f"{str(run_dir)!r} holds a run that did not finish ({left}); continue it with "
                             "train.resume=true, or choose another --out")


def keep_traceback(run_dir: Path, exc_text: str, name: str) -> None:
    """Keep a failure's traceback in the run folder when the disk allows; else say so on stderr."""
    try:
        (run_dir / name).write_text(exc_text, encoding="utf-8")
    except OSError as err:
        print(f"[modaltune] could not write {run_dir / name} ({err.strerror}); the traceback:\n{exc_text}",
              file=sys.stderr, flush=True)


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
