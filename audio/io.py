"""Audio reading: any format soundfile/librosa can decode, any rate and channel count, to 16 kHz mono float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from modaltune.shared.errors import DataError

SAMPLE_RATE = 16_000


class AudioReadError(DataError):
    """A file could not be decoded (the message says why; ``reason`` is the short skip reason)."""

    def __init__(self, message: str, reason: str = "unreadable audio") -> None:
        super().__init__(message)
        self.reason = reason


TRUNCATION_TOLERANCE = (0.1, 0.02)  # seconds, fraction: a shortfall above both is a truncated file


def declared_frames(path: str | Path) -> int | None:
    """How many frames the file's header says it holds, or None when it does not say.

    For WAV this is read from the RIFF ``data`` chunk itself: libsndfile silently shrinks a truncated file's frame
    count to what is there, which would hide the truncation. Other containers report what libsndfile reads from
    their header (e.g. FLAC's STREAMINFO).
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            head = fh.read(12)
            if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
                block_align = None
                while True:
                    chunk = fh.read(8)
                    if len(chunk) < 8:
                        return None
                    cid, size = chunk[:4], int.from_bytes(chunk[4:], "little")
                    if cid == b"fmt ":
                        fmt = fh.read(size + (size & 1))
                        block_align = int.from_bytes(fmt[12:14], "little") if len(fmt) >= 14 else None
                    elif cid == b"data":
                        if not block_align or size in (0, 0xFFFFFFFF):  # streaming writers leave it unset
                            return None
                        return size // block_align
                    else:
                        fh.seek(size + (size & 1), 1)
        import soundfile as sf

        frames = sf.info(str(path)).frames
        return frames if 0 < frames < 2**62 else None
    except Exception:
        return None


def load_audio(path: str | Path, *, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode ``path`` to mono float32 at ``sample_rate``.

    WAV/FLAC/OGG (and MP3 with a recent libsndfile) go through soundfile, anything else through librosa/audioread;
    ``.raw`` files are read as 16 kHz 16-bit little-endian mono PCM (the pocketsphinx convention).
    """
    path = Path(path)
    if not path.is_file():
        raise AudioReadError(f"{path}: file does not exist", reason="missing audio file")
    if path.suffix.lower() == ".raw":
        data = np.fromfile(path, dtype="<i2").astype(np.float32) / 32768.0
        return _resample(data, SAMPLE_RATE, sample_rate)
    try:
        import soundfile as sf

        data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (N, C)
        wave = data.mean(axis=1)
    except Exception as sf_exc:  # unsupported container: try librosa's decoders
        try:
            import librosa

            wave, rate = librosa.load(str(path), sr=None, mono=True)
        except Exception as exc:
            raise AudioReadError(f"{path}: cannot decode audio ({sf_exc.__class__.__name__}: {sf_exc}; "
                                 f"librosa: {exc.__class__.__name__})") from None
    declared = declared_frames(path)
    if declared is not None:
        missing = declared - len(wave)
        seconds, fraction = TRUNCATION_TOLERANCE
        if missing > seconds * rate and missing > fraction * declared:
            raise AudioReadError(
                f"{path}: truncated: its header says {declared / rate:.2f} s, only {len(wave) / rate:.2f} s decode; "
                "re-export or re-copy the file", reason="truncated audio")
    return _resample(finite(np.asarray(wave, dtype=np.float32), path), int(rate), sample_rate)


def finite(wave: np.ndarray, where: object) -> np.ndarray:
    """``wave`` itself when every sample is a finite number.

    A float file (or a decoded array) can hold NaN or infinity: it is not silence (NaN compares false with any
    level), and one such sample turns every loss, gradient and trained weight into NaN.

    Raises:
        AudioReadError: some samples are NaN or infinite (reason ``non-finite samples``); ``where`` names the item.
    """
    bad = wave.size - int(np.count_nonzero(np.isfinite(wave)))
    if bad:
        raise AudioReadError(f"{where}: {bad:,} of {wave.size:,} samples are NaN or infinite; re-export the audio",
                             reason="non-finite samples")
    return wave


def _resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return wave.astype(np.float32, copy=False)
    import soxr

    return soxr.resample(wave, rate, target).astype(np.float32)


def read_recording(path: str | Path | None, *, max_seconds: float = 30.0) -> np.ndarray:
    """One recording for ``modaltune generate --input``: 16 kHz mono, refused when missing or longer than the
    model takes (Whisper's 30 s)."""
    from modaltune.shared.errors import ModaltuneError

    if path is None:
        raise ModaltuneError("this recipe works on a recording: give it with --input AUDIO")
    wave = load_audio(path)
    if len(wave) > max_seconds * SAMPLE_RATE:
        raise ModaltuneError(f"{path} is {len(wave) / SAMPLE_RATE:.1f} s long; Whisper's encoder takes up to "
                             f"{max_seconds:g} s: cut the recording")
    return wave


def rms(wave: np.ndarray) -> float:
    """Root-mean-square level of a waveform."""
    return float(np.sqrt(np.mean(np.square(wave, dtype=np.float64)))) if wave.size else 0.0
