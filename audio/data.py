"""ASR data: manifests (JSONL/CSV), audiofolders, ``datasets`` Audio columns; validation with counted skips.

Every clip is checked before training: unreadable or empty files, silence, empty transcripts and clips longer than
the model's window are skipped with their reason counted (or, for long clips with segment timestamps and
``long_clips: split``, cut into segments). Nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import numpy as np

from modaltune.audio.io import SAMPLE_RATE, AudioReadError, load_audio, rms
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


def _meta(row: dict, columns: dict[str, str]) -> dict:
    return {k: row[columns.get(k, k)] for k in META_COLUMNS if row.get(columns.get(k, k)) not in (None, "")}


@dataclasses.dataclass
class ClipFilter:
    """Validation limits."""

    max_seconds: float = 30.0
    silence_rms: float = 1e-4
    long_clips: str = "skip"
    min_seconds: float = 0.1
    root_only: bool = False  # audio files must lie inside their manifest's folder


def read_manifest(source: str, *, columns: dict[str, str] | None = None, hf_split: str = "train") -> list[dict]:
    """Rows with ``audio`` (a path, or a decoded array) and ``text``; ids point back at the line or row."""
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
            out.append({"id": rid, "audio": str(path / name) if name else None, "text": text, "root": str(path),
                        "speaker": row.get("speaker", ""), "replay": _flag(row.get("replay"), f"{rid}: replay"),
                        "meta": _meta(row, columns)})
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
        out.append({"id": str(row.get("id", rid)), "audio": audio, "text": row.get(text_col), "root": str(path.parent),
                    "speaker": str(row.get("speaker", "") or ""), "segments": row.get("segments"),
                    "replay": _flag(row.get("replay"), f"{rid}: replay"), "meta": _meta(row, columns)})
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
        audio = row[audio_col]
        array = audio["array"] if isinstance(audio, dict) else audio.get_all_samples().data.mean(0).numpy()
        out.append({"id": f"{name}[{i}]", "audio": np.asarray(array, dtype=np.float32), "text": row.get(text_col),
                    "speaker": str(row.get("speaker", "") or ""), "meta": _meta(row, columns)})
    return out


def validate(rows: list[dict], limits: ClipFilter, skipped: Skips, *, need_text: bool = True) -> list[Clip]:
    """Decode and check every row; returns the usable clips and counts each skip reason in ``skipped``.

    With ``need_text=False`` a row without a transcript is kept when it has another task's ``answer``."""
    clips = []
    for row in rows:
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
            wave = audio if isinstance(audio, np.ndarray) else load_audio(audio)
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
        clip = Clip(row["id"], wave, " ".join(str(text or "").split()), row.get("speaker", ""),
                    audio if isinstance(audio, str) else "", bool(row.get("replay", False)), dict(meta))
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
    for k, seg in enumerate(segments):
        try:
            start, end, text = float(seg["start"]), float(seg["end"]), str(seg["text"]).strip()
        except (KeyError, TypeError, ValueError):
            return []
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


LongClips = Literal["skip", "split"]
