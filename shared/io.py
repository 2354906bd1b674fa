"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename over the target."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the result to ``path`` so readers never see a partial file.

    The file gets the permissions a plain ``open(path, "w")`` would give (``mkstemp`` alone makes it owner-only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def within(path: str | Path, root: str | Path) -> bool:
    """True when ``path`` (relative paths taken from the current folder) resolves inside ``root``; symbolic links
    and ``..`` are followed first, so neither can lead out.

    Example:
        >>> within("/data/set/a.wav", "/data/set"), within("/data/set/../other/a.wav", "/data/set")
        (True, False)
    """
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def lines(text: str) -> list[str]:
    """``text`` split at line ends (``\\n``, ``\\r\\n``) only.

    ``str.splitlines`` also splits at U+2028, U+2029, form feeds and other separators that may stand unescaped
    inside a JSON string or a CSV/TSV field, which would cut one valid row in two.

    Example:
        >>> lines("a\\u2028b\\r\\nc\\n")
        ['a\\u2028b', 'c']
    """
    out = text.split("\n")
    if out and out[-1] == "":
        out.pop()
    return [line[:-1] if line.endswith("\r") else line for line in out]


def iter_jsonl(path: str | Path, text: str | None = None) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line of a JSONL file (``text``: its contents if already read).

    Raises:
        DataError: the file is missing or not UTF-8, or a line is not valid JSON (named as ``file:line``).
    """
    from modaltune.shared.errors import DataError

    path = Path(path)
    if text is None:
        if not path.is_file():
            raise DataError(f"{path}: file does not exist")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8") from None
    for lineno, line in enumerate(lines(text), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg}); fix or remove that line") from None
