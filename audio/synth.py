"""Synthetic medical dictation spoken by espeak-ng: the built-in speech data set of the Whisper recipe.

The set is built to measure generalisation rather than memorisation:

* **Phrasings**: training sentences fill the ``train`` templates of ``data/dictation_templates.json``; test
  sentences fill the ``test`` templates, which share no wording with them.
* **Voices**: :data:`DEFAULT_TRAIN_VOICES` and :data:`DEFAULT_TEST_VOICES` share no base voice and no variant.
* **Vocabulary**: the drug names, conditions and procedures of ``data/medical_terms.json`` are drawn for both
  splits; learning to transcribe them is the point of fine-tuning.

Numbers are spelled out in words (``"twenty five milligrams"``) so the reference text is unambiguous.

Every clip has a stretch of silence before and after the speech (drawn per clip, 0.2-0.8 s by default), as a
recording does: espeak-ng starts its output at the first phoneme, and Whisper mishears words at the very start of
its window (zero-shot WER on the default test split: 0.73 with no lead-in, 0.59 with 0.5 s).

Layout of a built folder::

    out_dir/wav/train/train-0000.wav ...   16 kHz mono 16-bit PCM
    out_dir/wav/test/test-0000.wav ...
    out_dir/train.jsonl, out_dir/test.jsonl  {"id", "audio" (relative path), "text", "speaker", "duration", "template"}
                                             and "replay": true on the general-English rows
    out_dir/BUILD.json                       parameters and counts, written last: a folder without it is incomplete

Example:
    >>> from modaltune.audio.synth import build_dictation_set  # ~300 clips in about a minute on two cores
    >>> manifests = build_dictation_set("data/dictation")  # doctest: +SKIP
    >>> manifests["test"]  # doctest: +SKIP
    PosixPath('data/dictation/test.jsonl')
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import string
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from modaltune.shared.errors import DataError, ModaltuneError

SAMPLE_RATE = 16_000
MAX_SECONDS = 30.0  # Whisper's input window: every clip must fit in it
BUILD_FORMAT = 5  # bump when the folder layout or sentence sampling changes, so old builds are rebuilt

# Spelled out so the reference text and Whisper's normalised output agree.
DOSES: tuple[str, ...] = (
    "two point five milligrams", "five milligrams", "ten milligrams", "twelve point five milligrams",
    "twenty milligrams", "twenty five milligrams", "forty milligrams", "fifty milligrams", "eighty milligrams",
    "one hundred milligrams", "two hundred milligrams", "two hundred fifty milligrams", "five hundred milligrams",
    "one thousand milligrams",
)
FREQUENCIES: tuple[str, ...] = (
    "once daily", "twice daily", "three times daily", "at night", "every morning", "every eight hours",
    "every twelve hours", "once weekly", "as needed",
)

# espeak-ng voice specs ``<base voice>+<variant>``, from the non-mbrola English voices (espeak-ng >= 1.51).
# The splits share no base voice and no variant.
DEFAULT_TRAIN_VOICES: tuple[str, ...] = (
    "en-us+m3", "en-us+f2", "en-gb+m1", "en-gb+f3", "en-gb-scotland+m2", "en-gb-scotland+f1",
    "en-029+m4", "en-029+f2", "en-gb-x-gbclan+m2", "en-gb-x-gbclan+f3",
)
DEFAULT_TEST_VOICES: tuple[str, ...] = (
    "en-gb-x-rp+f4", "en-gb-x-rp+m6", "en-us-nyc+m5", "en-us-nyc+f5", "en-gb-x-gbcwmd+m7", "en-gb-x-gbcwmd+f4",
)

_SLOTS = ("drug", "drug2", "condition", "procedure", "dose", "frequency")
_TERM_KEYS = ("drugs", "conditions", "procedures")
_MISSING_ESPEAK = "espeak-ng is not installed: apt-get install espeak-ng (needed to build the synthetic dictation set)"


# ---- built-in vocabulary and templates --------------------------------------------------------------------------


def _data_file(name: str) -> Path:
    path = Path(str(resources.files("modaltune.audio").joinpath("data", name)))
    if not path.is_file():
        raise DataError(f"{path}: built-in file missing; reinstall modaltune (pip install -e .)")
    return path


def _load_json_lists(name: str, keys: Sequence[str]) -> dict[str, list[str]]:
    path = _data_file(name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); restore the file from the repository") from None
    for key in keys:
        value = data.get(key) if isinstance(data, dict) else None
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise DataError(f"{path}: {key!r} must be a non-empty list of strings; restore the file from the repository")
    return {key: list(data[key]) for key in keys}


def load_terms() -> dict[str, list[str]]:
    """The built-in domain vocabulary: ``{"drugs": [...], "conditions": [...], "procedures": [...]}``."""
    return _load_json_lists("medical_terms.json", _TERM_KEYS)


def load_templates() -> dict[str, list[str]]:
    """The built-in dictation templates: ``{"train": [...], "test": [...]}``, with ``{drug}``-style slots."""
    return _load_json_lists("dictation_templates.json", ("train", "test"))


def load_general_sentences() -> list[str]:
    """The built-in general-English sentences (no medical terms): replayed in training against forgetting."""
    return _load_json_lists("general_sentences.json", ("sentences",))["sentences"]


def all_terms() -> list[str]:
    """Every drug, condition and procedure as one flat list (for term-recall metrics)."""
    terms = load_terms()
    return [term for key in _TERM_KEYS for term in terms[key]]


# ---- espeak-ng ------------------------------------------------------------------------------------------------


def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise ModaltuneError(_MISSING_ESPEAK)
    return exe


@lru_cache(maxsize=4)
def _voice_listing(exe: str) -> tuple[frozenset[str], frozenset[str]]:
    """(base voices, variants) that espeak-ng at ``exe`` knows; mbrola voices are left out."""

    def table(arg: str) -> list[list[str]]:
        proc = subprocess.run([exe, arg], capture_output=True, text=True, check=False)
        return [line.split() for line in proc.stdout.splitlines()[1:] if len(line.split()) >= 5]

    bases = {row[1] for row in table("--voices=en") if row[1] != "variant" and not row[4].startswith("mb/")}
    variants = {row[4].split("/", 1)[1] for row in table("--voices=variant") if row[4].startswith("!v/")}
    return frozenset(bases), frozenset(variants)


def check_voices(voices: Sequence[str]) -> None:
    """Fail with a clear error when espeak-ng lacks a voice spec (it would silently fall back to its default).

    Raises:
        ModaltuneError: espeak-ng is missing, or a base voice or variant is unknown to it.
    """
    bases, variants = _voice_listing(_espeak())
    for spec in voices:
        base, _, variant = spec.partition("+")
        if base not in bases:
            raise ModaltuneError(
                f"espeak-ng has no voice {base!r} (in {spec!r}); known English voices: {', '.join(sorted(bases))}. "
                "Upgrade espeak-ng (>= 1.51) or pass other voices"
            )
        if variant and variant not in variants:
            raise ModaltuneError(
                f"espeak-ng has no variant {variant!r} (in {spec!r}); see `espeak-ng --voices=variant` for the list"
            )


def speak(text: str, voice: str, *, speed_wpm: int = 165, pitch: int = 50, path: str | Path,
          lead_in: float = 0.0, tail: float = 0.0) -> float:
    """Speak ``text`` with espeak-ng and write it as a 16 kHz mono 16-bit PCM WAV.

    Args:
        text: What to say.
        voice: An espeak-ng voice spec such as ``"en-us+m3"`` (base voice ``+`` variant).
        speed_wpm: Speaking rate in words per minute.
        pitch: Base pitch, 0-99 (espeak-ng's scale; 50 is the voice's default).
        path: Where to write the WAV file.
        lead_in: Seconds of silence before the speech.
        tail: Seconds of silence after it.

    Returns:
        The clip's duration in seconds, silence included.

    Raises:
        ModaltuneError: espeak-ng is missing or fails.
    """
    import soundfile as sf  # lazy: the audio extra (modaltune[audio])
    import soxr  # lazy: the audio extra

    exe = _espeak()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="espeak-", dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.wav"
        cmd = [exe, "-v", voice, "-s", str(int(speed_wpm)), "-p", str(int(pitch)), "-w", str(raw), "--stdin"]
        try:
            proc = subprocess.run(cmd, input=text, capture_output=True, text=True, check=False, timeout=120)
        except FileNotFoundError:
            raise ModaltuneError(_MISSING_ESPEAK) from None
        if proc.returncode != 0 or not raw.is_file():
            raise ModaltuneError(
                f"espeak-ng failed (exit {proc.returncode}) for voice {voice!r}: {proc.stderr.strip()[-500:]}; "
                "check the voice with `espeak-ng --voices=en`"
            )
        wave, sr = sf.read(str(raw), dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    if sr != SAMPLE_RATE:
        wave = soxr.resample(wave, sr, SAMPLE_RATE, quality="HQ").astype(np.float32)
    if wave.size == 0:
        raise ModaltuneError(f"espeak-ng produced no audio for {text!r} with voice {voice!r}")
    if lead_in > 0 or tail > 0:
        wave = np.concatenate([np.zeros(round(lead_in * SAMPLE_RATE), np.float32), wave,
                               np.zeros(round(tail * SAMPLE_RATE), np.float32)])
    sf.write(str(path), np.clip(wave, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16")
    return wave.size / SAMPLE_RATE


# ---- building the data set ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    split: str
    id: str
    text: str
    template: str
    voice: str
    speed: int
    pitch: int
    lead_in: float = 0.0
    tail: float = 0.0
    replay: bool = False
    slots: tuple[tuple[str, str], ...] = ()  # the template's fill-ins: gold for extraction tasks


class _Deck:
    """Draws items in shuffled rounds, so every item is used about equally often."""

    def __init__(self, items: Sequence[Any], rng: random.Random) -> None:
        self.items = list(items)
        self.rng = rng
        self.queue: list[Any] = []

    def draw(self, avoid: Any = None) -> Any:
        if not self.queue:
            self.queue = self.items.copy()
            self.rng.shuffle(self.queue)
        for i in range(len(self.queue) - 1, -1, -1):  # the next item that differs from ``avoid``
            if self.queue[i] != avoid or len(self.items) == 1:
                return self.queue.pop(i)
        self.queue = []
        return self.draw(avoid)


def _rng(seed: int, name: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _fill(template: str, values: dict[str, str]) -> str:
    text = template.format(**values)
    return text[0].upper() + text[1:]


def plan_sentences(
    split: str, n: int, *, seed: int, voices: Sequence[str], speeds: Sequence[int], pitches: Sequence[int],
    silence: Sequence[float] = (0.0, 0.0),
) -> list[_Job]:
    """The deterministic list of clips of one split: sentence, template, voice, speed, pitch and the silence
    before and after the speech (each drawn uniformly from the ``silence`` range, rounded to 10 ms)."""
    templates = load_templates()[split]
    terms = load_terms()
    rng = _rng(seed, split)
    pauses = _rng(seed, f"{split}:silence")  # its own stream: the sentences do not depend on the silence range
    lo, hi = (float(x) for x in silence)
    decks = {
        "template": _Deck(range(len(templates)), rng),
        "voice": _Deck(voices, rng),
        "drug": _Deck(terms["drugs"], rng),
        "condition": _Deck(terms["conditions"], rng),
        "procedure": _Deck(terms["procedures"], rng),
        "dose": _Deck(DOSES, rng),
        "frequency": _Deck(FREQUENCIES, rng),
    }
    jobs = []
    for i in range(n):
        t = decks["template"].draw()
        used = {name for _, name, _, _ in string.Formatter().parse(templates[t]) if name}
        unknown = used - set(_SLOTS)
        if unknown:
            raise DataError(
                f"{_data_file('dictation_templates.json')}: {split} template {t} has unknown slots {sorted(unknown)}; "
                f"use only {', '.join('{' + s + '}' for s in _SLOTS)}"
            )
        values = {}  # draw only the slots the template uses, so every term comes round equally often
        for slot in ("drug", "condition", "procedure", "dose", "frequency"):
            if slot in used or (slot == "drug" and "drug2" in used):
                values[slot] = decks[slot].draw()
        if "drug2" in used:
            values["drug2"] = decks["drug"].draw(avoid=values["drug"])
        jobs.append(_Job(
            split=split, id=f"{split}-{i:04d}", text=_fill(templates[t], values), template=f"{split}-{t:02d}",
            voice=decks["voice"].draw(), speed=int(rng.choice(list(speeds))), pitch=int(rng.choice(list(pitches))),
            lead_in=round(pauses.uniform(lo, hi), 2), tail=round(pauses.uniform(lo, hi), 2),
            slots=tuple((k, values[k]) for k in _SLOTS if k in values and k in used),
        ))
    return jobs


def plan_general(n: int, *, seed: int, voices: Sequence[str], speeds: Sequence[int], pitches: Sequence[int],
                 silence: Sequence[float] = (0.0, 0.0)) -> list[_Job]:
    """The deterministic list of general-English replay clips (training split, ids ``general-0000`` ...): built-in
    sentences in shuffled rounds, each spoken by a training voice."""
    sentences = load_general_sentences()
    rng = _rng(seed, "general")
    pauses = _rng(seed, "general:silence")
    lo, hi = (float(x) for x in silence)
    deck, voice = _Deck(range(len(sentences)), rng), _Deck(voices, rng)
    jobs = []
    for i in range(n):
        k = deck.draw()
        jobs.append(_Job(
            split="train", id=f"general-{i:04d}", text=sentences[k], template=f"general-{k:03d}", voice=voice.draw(),
            speed=int(rng.choice(list(speeds))), pitch=int(rng.choice(list(pitches))),
            lead_in=round(pauses.uniform(lo, hi), 2), tail=round(pauses.uniform(lo, hi), 2), replay=True,
        ))
    return jobs


def _data_digest() -> str:
    """A hash of the built-in terms and templates: editing them invalidates earlier builds."""
    h = hashlib.sha256()
    for name in ("medical_terms.json", "dictation_templates.json", "general_sentences.json"):
        h.update(_data_file(name).read_bytes())
    h.update(json.dumps([DOSES, FREQUENCIES]).encode())
    return h.hexdigest()[:16]


def _read_build(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "BUILD.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _synthesise(job: _Job, root: Path) -> dict[str, Any]:
    rel = Path("wav") / job.split / f"{job.id}.wav"
    duration = speak(job.text, job.voice, speed_wpm=job.speed, pitch=job.pitch, path=root / rel,
                     lead_in=job.lead_in, tail=job.tail)
    if duration >= MAX_SECONDS:
        raise DataError(
            f"{job.id}: {duration:.1f} s of speech is longer than Whisper's {MAX_SECONDS:.0f} s window; "
            f"raise the speeds (got {job.speed} words per minute) or shorten template {job.template}"
        )
    row = {"id": job.id, "audio": rel.as_posix(), "text": job.text, "speaker": job.voice,
           "duration": round(duration, 4), "template": job.template}
    if job.replay:
        row["replay"] = True
    if job.slots:
        row["slots"] = dict(job.slots)
    return row


_OURS = {"wav", "train.jsonl", "test.jsonl", "BUILD.json"}


def build_dictation_set(
    out_dir: str | Path,
    *,
    n_train: int = 240,
    n_test: int = 60,
    n_general: int = 0,
    seed: int = 0,
    train_voices: Sequence[str] | None = None,
    test_voices: Sequence[str] | None = None,
    speeds: Sequence[int] = (140, 165, 190),
    pitches: Sequence[int] = (35, 50, 65),
    silence: Sequence[float] = (0.2, 0.8),
    workers: int = 2,
    progress: bool = True,
) -> dict[str, Path]:
    """Build (or reuse) the synthetic dictation set in ``out_dir``.

    Sentences, voices, speeds and pitches are drawn deterministically from ``seed``. The build happens in a
    temporary folder next to ``out_dir`` that is renamed into place at the end, so an interrupted build leaves
    nothing half-done. When ``out_dir/BUILD.json`` records the same parameters, nothing is rebuilt.

    Args:
        out_dir: Folder to build into; it must be absent, empty, or an earlier build.
        n_train: Number of training clips.
        n_test: Number of test clips.
        n_general: Number of general-English clips (no medical terms) added to the training split, spoken by the
            training voices: replay that keeps the decoder a general English model while it learns the domain.
        seed: Seed of the sentence, voice, speed and pitch draws.
        train_voices: espeak-ng voice specs of the training split; :data:`DEFAULT_TRAIN_VOICES` when None.
        test_voices: espeak-ng voice specs of the test split; :data:`DEFAULT_TEST_VOICES` when None.
        speeds: Speaking rates (words per minute) drawn per clip.
        pitches: espeak-ng pitches (0-99) drawn per clip.
        silence: ``(min, max)`` seconds of silence before and after each clip's speech, drawn per clip.
        workers: Number of espeak-ng processes run at once.
        progress: Show a progress bar.

    Returns:
        ``{"train": out_dir/train.jsonl, "test": out_dir/test.jsonl}``.

    Raises:
        ModaltuneError: espeak-ng or a voice is missing, the parameters are invalid, or ``out_dir`` holds other files.
    """
    out = Path(out_dir).expanduser().resolve()
    train_voices = list(DEFAULT_TRAIN_VOICES if train_voices is None else train_voices)
    test_voices = list(DEFAULT_TEST_VOICES if test_voices is None else test_voices)
    _check_build(n_train, n_test, n_general, train_voices=train_voices, test_voices=test_voices, speeds=speeds,
                 pitches=pitches, silence=silence, workers=workers)
    params = {
        "format": BUILD_FORMAT, "n_train": n_train, "n_test": n_test, "n_general": n_general, "seed": seed,
        "train_voices": train_voices, "test_voices": test_voices,
        "speeds": [int(s) for s in speeds], "pitches": [int(p) for p in pitches],
        "silence": [float(x) for x in silence], "sample_rate": SAMPLE_RATE, "data": _data_digest(),
    }
    manifests = {split: out / f"{split}.jsonl" for split in ("train", "test")}
    previous = _read_build(out)
    if previous is not None and previous.get("params") == params and all(p.is_file() for p in manifests.values()):
        return manifests
    if out.exists() and (not out.is_dir() or any(p.name not in _OURS for p in out.iterdir())):
        raise ModaltuneError(
            f"{out}: exists and holds files that are not a dictation build; choose an empty or new folder"
        )
    check_voices(train_voices + test_voices)

    plan = dict(seed=seed, speeds=speeds, pitches=pitches, silence=silence)
    jobs = (plan_sentences("train", n_train, voices=train_voices, **plan)
            + plan_general(n_general, voices=train_voices, **plan)
            + plan_sentences("test", n_test, voices=test_voices, **plan))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    start = time.perf_counter()
    try:
        rows = _synthesise_all(jobs, tmp, workers=workers, progress=progress)
        _write_build(tmp, jobs, rows, params, start)
        _swap_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifests


def _check_build(n_train: int, n_test: int, n_general: int, *, train_voices: list[str], test_voices: list[str],
                 speeds: Sequence[int], pitches: Sequence[int], silence: Sequence[float], workers: int) -> None:
    """Refuse parameters :func:`build_dictation_set` cannot build from (before any file is touched)."""
    if min(n_train, n_test, n_general) < 0 or n_train + n_test + n_general == 0:
        raise ModaltuneError(f"build_dictation_set: n_train={n_train}, n_test={n_test}, n_general={n_general}; "
                             "all >= 0 and at least one > 0")
    for name, values in (("train_voices", train_voices), ("test_voices", test_voices),
                         ("speeds", speeds), ("pitches", pitches)):
        if not values:
            raise ModaltuneError(f"build_dictation_set: {name} is empty; give at least one")
    shared = sorted(set(train_voices) & set(test_voices))
    if shared:
        raise ModaltuneError(f"build_dictation_set: voices {shared} are in both splits; the test voices must be unseen")
    if workers < 1:
        raise ModaltuneError(f"build_dictation_set: workers={workers}; use 1 or more")
    if len(silence) != 2 or not 0 <= silence[0] <= silence[1] <= 5:
        raise ModaltuneError(
            f"build_dictation_set: silence={list(silence)}; give [min, max] seconds with 0 <= min <= max <= 5")


def _synthesise_all(jobs: list[_Job], tmp: Path, *, workers: int, progress: bool) -> dict[str, dict[str, Any]]:
    """Speak every planned clip into ``tmp`` (``workers`` espeak-ng processes at once); manifest row by clip id."""
    rows: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_synthesise, job, tmp) for job in jobs]
        bar = tqdm(as_completed(futures), total=len(futures), desc="espeak-ng dictation", unit="clip",
                   disable=not progress)
        for future in bar:
            row = future.result()
            rows[row["id"]] = row
    return rows


def _write_build(tmp: Path, jobs: list[_Job], rows: dict[str, dict[str, Any]], params: dict[str, Any],
                 start: float) -> None:
    """The manifests (rows in plan order) and ``BUILD.json`` (parameters, counts, durations) of a build in ``tmp``."""
    counts, seconds = {}, {}
    for split in ("train", "test"):
        split_rows = [rows[job.id] for job in jobs if job.split == split]
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in split_rows)
        (tmp / f"{split}.jsonl").write_text(lines, encoding="utf-8")
        counts[split] = len(split_rows)
        seconds[split] = round(sum(row["duration"] for row in split_rows), 2)
    (tmp / "wav" / "train").mkdir(parents=True, exist_ok=True)
    (tmp / "wav" / "test").mkdir(parents=True, exist_ok=True)
    build = {"params": params, "counts": counts, "seconds": seconds,
             "build_seconds": round(time.perf_counter() - start, 1), "espeak_ng": _espeak_version()}
    (tmp / "BUILD.json").write_text(json.dumps(build, indent=2) + "\n", encoding="utf-8")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished build ``tmp`` to ``out``; an earlier build there (other parameters) or an empty folder
    is swapped out first, then deleted."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _espeak_version() -> str:
    proc = subprocess.run([_espeak(), "--version"], capture_output=True, text=True, check=False)
    return proc.stdout.strip()
