"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename over the target."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from modaltune.shared.errors import ModaltuneError


SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # out of disk space, over the user's quota


def human_bytes(n: float) -> str:
    """``n`` bytes as a short figure.

    Example:
        >>> human_bytes(512), human_bytes(3 * 2**20), human_bytes(5.5 * 2**30)
        ('512 B', '3.0 MB', '5.5 GB')
    """
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def free_bytes(path: str | Path) -> int | None:
    """Free space on the file system that holds ``path`` (its nearest existing folder), or None if unknown."""
    for part in [Path(path), *Path(path).parents]:
        if part.exists():
            try:
                return shutil.disk_usage(part).free
            except OSError:
                return None
    return None


class WriteFailure(ModaltuneError):
    """A write into the run folder failed (a full disk, no permission); ``os_error`` is what the system said."""

    def __init__(self, os_error: OSError, message: str) -> None:
        super().__init__(message)
        self.os_error = os_error


_SPACE_WORDS = ("no space left on device", "os error 28", "errno 28", "disk quota exceeded", "os error 122")


def as_os_error(exc: BaseException, path: str | Path | None = None) -> OSError | None:
    """``exc`` as an OSError when it is one, or when a library reported a full disk in its own error type
    (safetensors' ``SafetensorError``, torch's ``RuntimeError: ... file write failed``); else None."""
    if isinstance(exc, OSError):
        return exc
    text = str(exc).lower()
    if any(word in text for word in _SPACE_WORDS):
        code = errno.EDQUOT if "quota" in text or "122" in text else errno.ENOSPC
        return OSError(code, str(exc).splitlines()[0][:200], str(path) if path else None)
    return None


def write_failure(exc: BaseException, folder: str | Path, *, needed: int | None = None) -> BaseException:
    """The one-line error for an OSError (or a library's report of a full disk, see :func:`as_os_error`) met while
    writing into ``folder``: for a full disk (or quota), the folder, the free space and about how much the write
    needed; for a permission or I/O error, the file and the system's reason. Other errors come back as they are.

    Example:
        >>> import errno
        >>> message = str(write_failure(OSError(errno.ENOSPC, "No space left", "/r/x.bin"), "/r", needed=2**30))
        >>> message.startswith("out of disk space writing /r/x.bin (in /r): "), "about 1.0 GB needed" in message
        (True, True)
    """
    original, exc = exc, as_os_error(exc, folder)
    if exc is None or exc.errno is None:
        return original
    file = exc.filename or folder
    if exc.errno in SPACE_ERRNOS:
        free = free_bytes(folder)
        need = f", about {human_bytes(needed)} needed" if needed else ""
        return WriteFailure(exc,
            f"out of disk space writing {file} (in {folder}): {human_bytes(free or 0) if free is not None else '?'} "
            f"free{need}; free space there, or give --out a folder on a larger disk, then continue the run with "
            "train.resume=true (its last complete checkpoint is kept)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO):
        return WriteFailure(exc, f"cannot write {file} (in {folder}): {exc.strerror}; check the folder's permissions "
                                 "and disk, or give --out another folder")
    return exc


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


def read_text(path: str | Path) -> str:
    """A UTF-8 text file (a byte-order mark is dropped).

    Raises:
        DataError: the file is missing or not UTF-8.
    """
    from modaltune.shared.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file does not exist")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8") from None


def read_rows(path: str | Path, *, what: str = "data file") -> list[tuple[str, Any]]:
    """Rows of a JSONL, JSON (a list), CSV, Parquet or Arrow file as ``(id, row)`` pairs; ids point back at the
    item (``file:line`` for JSONL and CSV, ``file[i]`` otherwise), so errors and skip reports can name it. A
    ``.json`` file that holds one object per line is read as JSONL. Rows are returned as parsed: callers decide
    what a row that is not an object means.

    Raises:
        DataError: the file is missing, not UTF-8, has an invalid JSON line, or another extension.

    Example:
        >>> import tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> _ = open(os.path.join(folder, "a.csv"), "w").write("text,label\\nhi,1\\n")
        >>> read_rows(os.path.join(folder, "a.csv"))
        [('a.csv:2', {'text': 'hi', 'label': '1'})]
    """
    import csv

    from modaltune.shared.errors import DataError

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{what} {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in {".jsonl", ".json", ".csv", ".parquet", ".arrow"}:
        raise DataError(f"{what} {str(path)!r}: unsupported extension {path.suffix!r} "
                        "(use .jsonl, .json, .csv, .parquet or .arrow)")
    if suffix in {".parquet", ".arrow"}:
        return [(f"{path.name}[{i}]", row) for i, row in enumerate(_read_table(path, what))]
    text = read_text(path)
    if suffix == ".csv":
        import io

        rows = csv.DictReader(io.StringIO(text, newline=""))  # splits at \n and \r only, quoted newlines kept
        return [(f"{path.name}:{i + 2}", dict(row)) for i, row in enumerate(rows)]
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg}); fix the file") from None
        return [(f"{path.name}[{i}]", row) for i, row in enumerate(data)]
    return [(f"{path.name}:{lineno}", row) for lineno, row in iter_jsonl(path, text)]


def _read_table(path: Path, what: str) -> list[Any]:
    """The rows of a Parquet file or an Arrow IPC file/stream (what ``datasets`` writes) as dicts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from modaltune.shared.errors import DataError

    try:
        if path.suffix.lower() == ".parquet":
            return pq.read_table(path).to_pylist()
        with pa.memory_map(str(path)) as source:
            try:
                return pa.ipc.open_file(source).read_all().to_pylist()
            except pa.ArrowInvalid:  # datasets' cache files are IPC streams
                source.seek(0)
                return pa.ipc.open_stream(source).read_all().to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{what} {str(path)!r} is not a readable {path.suffix[1:]} file: {exc}") from None


def read_hf_rows(spec: str, split: str, prepare: Callable[[Any], Any] | None = None) -> list[tuple[str, dict]]:
    """Rows of a ``datasets`` dataset: a hub name (``name`` or ``name:config``) or a folder saved with
    ``save_to_disk``; ``prepare`` may transform the dataset first (e.g. decode an audio column).

    Raises:
        DataError: it cannot be loaded (the message gives the name, the split and why).
    """
    import datasets

    from modaltune.shared.errors import DataError

    name, _, config = spec.partition(":")
    try:
        folder = Path(name).expanduser()
        if folder.is_dir() and (folder / "dataset_info.json").exists():
            ds = datasets.load_from_disk(str(folder))
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(name, config or None, split=split)
        if prepare is not None:
            ds = prepare(ds)
    except Exception as exc:  # datasets raises many types; the user needs the name and the reason
        raise DataError(f"cannot load dataset {spec!r} split {split!r}: {str(exc).splitlines()[0][:200]}") from None
    return [(f"{name}[{i}]", dict(row)) for i, row in enumerate(ds)]


def seeded_split(items: list, sizes: list[int], seed: int) -> list[list]:
    """Consecutive parts of a seeded shuffle of ``items``: one part per size, then the rest. The same seed gives
    the same parts on every machine (Python's ``random``), whatever the model seed.

    Example:
        >>> seeded_split(list(range(6)), [2, 1], seed=0)
        [[4, 2], [1], [0, 5, 3]]
    """
    import random

    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    parts, start = [], 0
    for size in sizes:
        parts.append([items[i] for i in order[start : start + size]])
        start += size
    parts.append([items[i] for i in order[start:]])
    return parts
