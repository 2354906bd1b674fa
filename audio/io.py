"""Audio reading: any format soundfile/librosa can decode, any rate and channel count, to 16 kHz mono float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000


class AudioReadError(Exception):
    """A file could not be decoded (the message says why)."""


def load_audio(path: str | Path, *, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode ``path`` to mono float32 at ``sample_rate``.

    WAV/FLAC/OGG (and MP3 with a recent libsndfile) go through soundfile, anything else through librosa/audioread;
    ``.raw`` files are read as 16 kHz 16-bit little-endian mono PCM (the pocketsphinx convention).
    """
    path = Path(path)
    if not path.is_file():
        raise AudioReadError(f"{path}: file does not exist")
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
    return _resample(np.asarray(wave, dtype=np.float32), int(rate), sample_rate)


def _resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return wave.astype(np.float32, copy=False)
    import soxr

    return soxr.resample(wave, rate, target).astype(np.float32)


def rms(wave: np.ndarray) -> float:
    """Root-mean-square level of a waveform."""
    return float(np.sqrt(np.mean(np.square(wave, dtype=np.float64)))) if wave.size else 0.0
