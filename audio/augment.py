"""Waveform augmentation for speech fine-tuning: speed, pitch, gain and additive noise.

:func:`make_views` turns one training clip into ``cfg.views`` augmented copies, deterministically for a given
``(cfg.seed, key)``, so a run can be repeated exactly. Each view draws its parameters uniformly from the
configured ranges and applies, in order:

1. speed perturbation by resampling (tempo and pitch change together, like Kaldi's speed perturbation);
2. pitch shift in semitones (``librosa.effects.pitch_shift``; a phase vocoder, slow: set ``pitch_semitones: []``
   to skip it when views are made on the fly);
3. gain in dB;
4. additive noise at a drawn signal-to-noise ratio: white noise, or a random crop of a random file of ``noise_dir``;
5. clipping to [-1, 1].

Example:
    >>> import numpy as np
    >>> wave = 0.1 * np.sin(np.linspace(0, 2000, 16000)).astype(np.float32)  # one second at 16 kHz
    >>> cfg = AugmentConfig(views=2, pitch_semitones=[])
    >>> views = make_views(wave, 16000, cfg, key="train-0007")
    >>> len(views), all(np.array_equal(a, b) for a, b in zip(views, make_views(wave, 16000, cfg, key="train-0007")))
    (2, True)
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from modaltune.shared.config import doc
from modaltune.shared.errors import ConfigError, DataError

NOISE_SUFFIXES = (".wav", ".flac")


@dataclasses.dataclass
class AugmentConfig:
    """Waveform augmentation of training clips (test clips are never augmented)."""

    views: int = doc(0, "extra augmented views per training clip; 0 = off")
    noise_snr_db: list[float] = doc([20.0, 10.0], "[a, b] signal-to-noise range in dB to draw from; [] = no noise")
    noise_dir: str | None = doc(None, "folder of noise WAV/FLAC files cropped at random; None = white noise")
    speed: list[float] = doc([0.9, 1.1], "[a, b] speed factor range (resampling, changes tempo and pitch); [] = off")
    pitch_semitones: list[float] = doc([-2.0, 2.0], "[a, b] pitch shift range in semitones (slow); [] = off")
    gain_db: list[float] = doc([-6.0, 6.0], "[a, b] gain range in dB; [] = off")
    seed: int = doc(0, "seed of the augmentation draws (with each clip's id)")

    def validate(self, where: str = "") -> None:
        """Check the ranges.

        Raises:
            ConfigError: ``views`` is negative, a range is not ``[]`` or ``[a, b]``, a speed is not positive, a
                value is not finite, or ``noise_dir`` is not a folder.
        """
        prefix = f"{where}." if where else ""
        if self.views < 0:
            raise ConfigError(f"{prefix}views: {self.views} is negative; use 0 (off) or more")
        for name in ("noise_snr_db", "speed", "pitch_semitones", "gain_db"):
            values = getattr(self, name)
            if len(values) not in (0, 2):
                raise ConfigError(f"{prefix}{name}: {values!r} must be [] (off) or a range [a, b]")
            if not all(math.isfinite(v) for v in values):
                raise ConfigError(f"{prefix}{name}: {values!r} must hold finite numbers")
        if any(v <= 0 for v in self.speed):
            raise ConfigError(f"{prefix}speed: {self.speed!r} must be positive factors such as [0.9, 1.1]")
        if self.noise_dir is not None and not Path(self.noise_dir).expanduser().is_dir():
            raise ConfigError(
                f"{prefix}noise_dir: {self.noise_dir!r} is not a folder; give a folder of noise WAV/FLAC files "
                "or null for white noise"
            )


def _draw(values: list[float], rng: np.random.Generator) -> float | None:
    """A uniform draw from ``[a, b]`` (either order), or None when the range is empty (off)."""
    if not values:
        return None
    lo, hi = sorted(float(v) for v in values)
    return float(rng.uniform(lo, hi)) if hi > lo else lo


@lru_cache(maxsize=8)
def _noise_bank(folder: str, sr: int) -> tuple[np.ndarray, ...]:
    """Every noise file of ``folder`` as mono float32 at ``sr``, loaded once per (folder, sr)."""
    import soundfile as sf
    import soxr

    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in NOISE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{root}: no .wav or .flac noise files; add some or set noise_dir to null for white noise")
    bank = []
    for path in files:
        try:
            data, file_sr = sf.read(str(path), dtype="float32", always_2d=True)
        except Exception as exc:  # soundfile raises its own error types for unreadable files
            raise DataError(f"{path}: cannot read this noise file ({exc}); convert it to WAV or remove it") from None
        noise = data.mean(axis=1)
        if file_sr != sr and noise.size:
            noise = soxr.resample(noise, file_sr, sr, quality="HQ").astype(np.float32)
        if noise.size and float(np.mean(noise.astype(np.float64) ** 2)) > 0:
            bank.append(np.ascontiguousarray(noise, dtype=np.float32))
    if not bank:
        raise DataError(f"{root}: every noise file is empty or silent; add noise recordings")
    return tuple(bank)


def _noise(n: int, sr: int, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    if cfg.noise_dir is None:
        return rng.standard_normal(n).astype(np.float32)
    bank = _noise_bank(str(Path(cfg.noise_dir).expanduser().resolve()), sr)
    source = bank[int(rng.integers(len(bank)))]
    if source.size < n:  # loop a short recording
        source = np.tile(source, -(-n // source.size))
    start = int(rng.integers(0, source.size - n + 1))
    return source[start:start + n]


def augment(wave: np.ndarray, sr: int, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """One augmented copy of a mono clip, with parameters drawn from ``cfg``'s ranges by ``rng``.

    Args:
        wave: Mono samples in [-1, 1].
        sr: Sample rate in Hz.
        cfg: Ranges to draw from; an empty range turns that step off.
        rng: Source of the draws.

    Returns:
        float32 mono samples in [-1, 1], at ``sr``; speed perturbation changes the length by ``1 / factor``.
    """
    y = np.asarray(wave, dtype=np.float32)
    if y.ndim != 1:
        raise DataError(f"augment: expected a mono 1-D waveform, got shape {y.shape}; average the channels first")
    speed = _draw(cfg.speed, rng)
    if speed is not None and abs(speed - 1.0) > 1e-6 and y.size:
        import soxr

        # Treat the clip as recorded at sr * speed and bring it back to sr: `speed` times shorter, pitch up.
        y = soxr.resample(y, sr * speed, sr, quality="HQ").astype(np.float32)
    semitones = _draw(cfg.pitch_semitones, rng)
    if semitones is not None and abs(semitones) > 1e-3 and y.size:
        import librosa

        y = librosa.effects.pitch_shift(y, sr=sr, n_steps=semitones).astype(np.float32)
    gain = _draw(cfg.gain_db, rng)
    if gain is not None:
        y = y * np.float32(10.0 ** (gain / 20.0))
    snr = _draw(cfg.noise_snr_db, rng)
    if snr is not None and y.size:
        signal_power = float(np.mean(y.astype(np.float64) ** 2))
        noise = _noise(y.size, sr, cfg, rng).astype(np.float64)
        noise_power = float(np.mean(noise**2))
        if signal_power > 0 and noise_power > 0:
            scale = math.sqrt(signal_power / (noise_power * 10.0 ** (snr / 10.0)))
            y = (y + scale * noise).astype(np.float32)
    return np.clip(y, -1.0, 1.0).astype(np.float32, copy=False)


def view_seed(seed: int, key: str) -> int:
    """A stable 64-bit seed for ``(seed, key)`` (the same in every process, unlike ``hash()``)."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def make_views(wave: np.ndarray, sr: int, cfg: AugmentConfig, key: str) -> list[np.ndarray]:
    """The ``cfg.views`` augmented copies of one clip, the same for the same ``(cfg.seed, key)``.

    Args:
        wave: Mono samples in [-1, 1].
        sr: Sample rate in Hz.
        cfg: Augmentation settings; ``cfg.views == 0`` gives an empty list.
        key: A stable name of the clip, such as its id.
    """
    rng = np.random.default_rng(view_seed(cfg.seed, key))
    return [augment(wave, sr, cfg, rng) for _ in range(cfg.views)]
