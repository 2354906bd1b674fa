"""ASR data: manifests (JSONL/CSV), audiofolders, ``datasets`` Audio columns; validation with counted skips.

Every clip is checked before training: fields of the wrong type (``"audio": 12345``, a list as ``text``),
unreadable or empty files, NaN or infinite samples, silence, empty transcripts and clips longer than the model's
window are skipped with their reason counted (or, for long clips with segment timestamps and ``long_clips: split``,
cut into segments). Nothing is dropped silently, and no value is stringified into a transcript.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np

from modaltune.audio.io import SAMPLE_RATE, AudioReadError, finite, load_audio, rms
from modaltune.shared.errors import ConfigError, DataError
from modaltune.shared.io import read_hf_rows, read_rows, within
from modaltune.shared.skips import Skips


@dataclasses.dataclass
class Clip:
    """One utterance: 16 kHz mono audio and its transcript."""

    id: str
    wave: np.ndarray  # (N,) float32
    text: str
    speaker: str = ""
    path: str = ""
    replay: bool = False  # general speech replayed against forgetting (see ``replay.kl_weight`` of domain-asr)
    meta: dict = dataclasses.field(default_factory=dict)  # the row's task columns (:data:`META_COLUMNS`), if any

    @property
    def seconds(self) -> float:
        return len(self.wave) / SAMPLE_RATE


META_COLUMNS = ("task", "prompt", "answer", "slots")  # other tasks on a clip (audio-llm), kept as the row gives them
SEGMENTS = "segments: expected a list of objects with numeric start/end and string text"


def _meta(row: dict, columns: dict[str, str]) -> dict:
    return {k: row[columns.get(k, k)] for k in META_COLUMNS if not _absent(row.get(columns.get(k, k)))}


def _absent(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value)


def _kind(value: object) -> str:
    return type(value).__name__


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def row_problem(row: dict) -> tuple[str, str | None] | None:
    """Why a reader's row cannot be used as typed: ``(reason, detail)`` for its first field of the wrong type (the
    detail, if any, says where inside the field), or None. Fields are named as the data names them (the row's
    ``columns`` map); a reader keeps an id of the wrong type under ``bad_id``. A CSV gives strings only; JSONL,
    Parquet and ``datasets`` give typed values, and a number, list or object where text belongs is never turned
    into its Python text (only an ``answer`` may also be a number: "how many tablets?" -> 3).

    Example:
        >>> row_problem({"id": "m.jsonl:3", "audio": 12345, "text": "hello"})
        ('audio: expected a path, got int', None)
        >>> row_problem({"id": "m.jsonl:4", "audio": "a.wav", "text": ["hi"], "columns": {"text": "sentence"}})
        ('sentence: expected a string, got list', None)
        >>> row_problem({"id": "m.jsonl:5", "audio": "a.wav", "text": "hi", "segments": [{"start": 0, "end": "2"}]})
        ('segments: expected a list of objects with numeric start/end and string text', 'segments[0].end is a str')
    """
    name = (row.get("columns") or {}).get
    if "bad_id" in row:
        return f"id: expected a string or an integer, got {_kind(row['bad_id'])}", None
    audio = row.get("audio")
    if isinstance(audio, np.ndarray):
        if audio.ndim != 1 or not np.issubdtype(audio.dtype, np.number):
            return f"{name('audio', 'audio')}: expected a mono waveform", f"shape {audio.shape}, dtype {audio.dtype}"
    elif not (audio is None or isinstance(audio, (str, os.PathLike))):
        return f"{name('audio', 'audio')}: expected a path, got {_kind(audio)}", None
    meta = row.get("meta") or {}
    fields = [(name("text", "text"), row.get("text"), "a string"), ("speaker", row.get("speaker"), "a string"),
              ("task", meta.get("task"), "a string"), ("prompt", meta.get("prompt"), "a string"),
              ("answer", meta.get("answer"), "a string or a number")]
    for field, value, expected in fields:
        if value is not None and not (isinstance(value, str) or (expected.endswith("number") and _number(value))):
            return f"{field}: expected {expected}, got {_kind(value)}", None
    segments = row.get("segments")
    if not _absent(segments) and (where := _segments_problem(segments)):
        return SEGMENTS, where
    slots = meta.get("slots")
    if slots is not None and not isinstance(slots, dict):
        return f"slots: expected an object, got {_kind(slots)}", None
    for key, value in (slots or {}).items():
        if value is not None and not isinstance(value, str):
            return "slots: expected string values", f"slots.{key} is a {_kind(value)}"
    return None


def _segments_problem(segments: object) -> str | None:
    """Where a ``segments`` value breaks :data:`SEGMENTS` (e.g. ``segments[1].start is a str``), or None."""
    if not isinstance(segments, list):
        return f"got {_kind(segments)}"
    for k, seg in enumerate(segments):
        if not isinstance(seg, dict):
            return f"segments[{k}] is a {_kind(seg)}"
        for key, ok in (("start", _number), ("end", _number), ("text", lambda v: isinstance(v, str))):
            if key not in seg:
                return f"segments[{k}] has no {key}"
            value = seg[key]
            if not ok(value):  # a float here is NaN or infinite
                return f"segments[{k}].{key} is {value!r}" if isinstance(value, float) else \
                    f"segments[{k}].{key} is a {_kind(value)}"
    return None


@dataclasses.dataclass
class ClipFilter:
    """Validation limits."""

    max_seconds: float = 30.0
    silence_rms: float = 1e-4
    long_clips: str = "skip"
    min_seconds: float = 0.1
    root_only: bool = False  # audio files must lie inside their manifest's folder


def read_manifest(source: str, *, columns: dict[str, str] | None = None, hf_split: str = "train") -> list[dict]:
    """Rows with ``audio`` (a path, or a decoded array) and ``text``; ids point back at the line or row.

    Values keep the type the file gives them: :func:`validate` skips a row whose field has the wrong one
    (:func:`row_problem`)."""
    columns = columns or {}
    audio_col, text_col = columns.get("audio", "audio"), columns.get("text", "text")
    if source.startswith("hf:"):
        return _read_hf(source[3:], hf_split, audio_col, text_col, columns)
    if Path(source).expanduser().suffix == ".json":
        raise DataError(f"manifest {source!r}: use .jsonl or .csv (or an audiofolder, or hf:NAME)")
    path = Path(source).expanduser()
    if path.is_dir():
        meta = path / "metadata.csv"
        if not meta.is_file():
            raise DataError(f"audiofolder {source!r} has no metadata.csv (columns: file_name, transcription/text)")
        rows = read_rows(meta, what="audiofolder metadata")
        out = []
        for rid, row in rows:
            name = row.get("file_name") or row.get(audio_col)
            text = row.get("transcription", row.get(text_col))
            out.append({"id": rid, "audio": str(path / name) if isinstance(name, str) and name else name,
                        "text": text, "root": str(path), "speaker": row.get("speaker"),
                        "replay": _flag(row.get("replay"), f"{rid}: replay"), "meta": _meta(row, columns)})
        return out
    if path.is_file() and path.suffix not in {".jsonl", ".csv"}:
        raise DataError(f"manifest {source!r}: use .jsonl or .csv (or an audiofolder, or hf:NAME)")
    raw = read_rows(path, what="manifest")
    for rid, row in raw:
        if not isinstance(row, dict):
            raise DataError(f"{rid}: expected a JSON object")
    out = []
    for rid, row in raw:
        audio = row.get(audio_col)
        if isinstance(audio, str) and audio and not Path(audio).is_absolute():
            audio = str(path.parent / audio)  # manifests name files relative to themselves
        given = rid if _absent(row.get("id")) else row["id"]
        named = isinstance(given, str) or (isinstance(given, int) and not isinstance(given, bool))
        out.append({"id": str(given) if named else rid, "audio": audio, "text": row.get(text_col),
                    "root": str(path.parent), "speaker": row.get("speaker"), "segments": row.get("segments"),
                    "replay": _flag(row.get("replay"), f"{rid}: replay"), "meta": _meta(row, columns),
                    "columns": columns, **({} if named else {"bad_id": given})})
    return out


def _flag(value, where: str) -> bool:
    """A manifest's optional boolean column: JSON true/false, or true/false/1/0/yes/no/empty in a CSV."""
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip().lower()
    if text in {"", "0", "false", "no"}:
        return False
    if text in {"1", "true", "yes"}:
        return True
    raise DataError(f"{where}: {value!r} is not a boolean; use true or false (or leave it empty)")


def _read_hf(name: str, split: str, audio_col: str, text_col: str, columns: dict[str, str]) -> list[dict]:
    import datasets

    def decode(ds):
        return ds.cast_column(audio_col, datasets.Audio(sampling_rate=SAMPLE_RATE))

    out = []
    for i, (_, row) in enumerate(read_hf_rows(name, split, decode)):
        audio = row.get(audio_col)
        if isinstance(audio, dict) and audio.get("array") is not None:
            with np.errstate(over="ignore"):  # a value over float32's range becomes inf: validate skips it
                audio = np.asarray(audio["array"], dtype=np.float32)
        elif isinstance(audio, dict):
            audio = None
        elif hasattr(audio, "get_all_samples"):  # a torchcodec AudioDecoder (datasets 4+)
            audio = audio.get_all_samples().data.mean(0).numpy().astype(np.float32)
        speaker = row.get("speaker")
        if isinstance(speaker, int) and not isinstance(speaker, bool):
            speaker = str(speaker)  # a typed integer column is a speaker id by its schema, not a stray value
        out.append({"id": f"{name}[{i}]", "audio": audio, "text": row.get(text_col), "speaker": speaker,
                    "meta": _meta(row, columns), "columns": columns})
    return out


def validate(rows: list[dict], limits: ClipFilter, skipped: Skips, *, need_text: bool = True) -> list[Clip]:
    """Decode and check every row; returns the usable clips and counts each skip reason in ``skipped``.

    With ``need_text=False`` a row without a transcript is kept when it has another task's ``answer``."""
    clips = []
    for row in rows:
        problem = row_problem(row)
        if problem is not None:
            reason, detail = problem
            skipped.add(reason, row["id"] if detail is None else f"{row['id']}: {detail}")
            continue
        text = row.get("text")
        meta = row.get("meta") or {}
        if (text is None or not str(text).strip()) and (need_text or "answer" not in meta):
            skipped.add("empty transcript", row["id"])
            continue
        audio = row.get("audio")
        if audio is None or (isinstance(audio, str) and not audio):
            skipped.add("no audio file named", row["id"])
            continue
        if limits.root_only and isinstance(audio, str) and row.get("root") and not within(audio, row["root"]):
            skipped.add("audio path outside the manifest's folder (data.root_only)", f"{row['id']}: {audio}")
            continue
        try:
            wave = finite(audio, row["id"]) if isinstance(audio, np.ndarray) else load_audio(audio)
        except AudioReadError as exc:
            skipped.add(exc.reason, row["id"])
            continue
        if wave.size == 0:
            skipped.add("empty audio", row["id"])
            continue
        if wave.size < limits.min_seconds * SAMPLE_RATE:
            skipped.add(f"shorter than {limits.min_seconds:g} s", row["id"])
            continue
        if rms(wave) < limits.silence_rms:
            skipped.add("silence", row["id"])
            continue
        clip = Clip(row["id"], wave, " ".join((text or "").split()), row.get("speaker") or "",
                    str(audio) if isinstance(audio, (str, os.PathLike)) else "", bool(row.get("replay", False)),
                    dict(meta))
        if clip.seconds > limits.max_seconds:
            segments = row.get("segments")
            if limits.long_clips == "split" and segments:
                parts = _split(clip, segments, limits.max_seconds)
                if parts:
                    clips.extend(parts)
                    continue
                skipped.add(f"longer than {limits.max_seconds:g} s: segments unusable", row["id"])
                continue
            skipped.add(f"longer than {limits.max_seconds:g} s (the model's window)", row["id"])
            continue
        clips.append(clip)
    return clips


def _split(clip: Clip, segments: list[dict], max_seconds: float) -> list[Clip]:
    parts = []
    for k, seg in enumerate(segments):  # typed by row_problem: numeric start/end, string text
        start, end, text = float(seg["start"]), float(seg["end"]), seg["text"].strip()
        if not text or end <= start or end - start > max_seconds:
            return []
        wave = clip.wave[int(start * SAMPLE_RATE) : int(end * SAMPLE_RATE)]
        parts.append(Clip(f"{clip.id}#{k}", wave, text, clip.speaker, clip.path, clip.replay))
    return parts


def builtin_general_set() -> list[dict]:
    """Real LibriVox speech from Debian's ``pocketsphinx-testdata`` (``[]`` when the package is absent)."""
    root = Path("/usr/share/pocketsphinx/test/data/librivox")
    listing = root / "transcription"
    if not listing.is_file():
        return []
    rows = []
    for line in listing.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line.endswith(")") or "(" not in line:
            continue
        text, _, fileid = line[:-1].rpartition("(")
        text = text.replace("<s>", "").replace("</s>", "").strip()
        wav = root / f"{fileid.strip()}.wav"
        if wav.is_file() and text:
            rows.append({"id": f"librivox/{wav.stem}", "audio": str(wav), "text": text, "speaker": "librivox"})
    return rows


def check_columns(columns: dict[str, str], where: str) -> None:
    unknown = set(columns) - {"audio", "text"}
    if unknown:
        raise ConfigError(f"{where}.columns: unknown field(s) {sorted(unknown)}; map 'audio' and 'text'")

