"""Waveform augmentation: exact SNR, speed, gain, deterministic views, noise files, config checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import soundfile as sf

from modaltune.audio.augment import AugmentConfig, augment, make_views
from modaltune.shared.config import field_docs, from_dict
from modaltune.shared.errors import ConfigError, DataError

SR = 16000


def _tone(seconds: float = 1.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    return (amp * np.sin(2 * np.pi * 220 * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def _only(**changes) -> AugmentConfig:
    """A config with every step off except the given ones."""
    return AugmentConfig(**{"noise_snr_db": [], "speed": [], "pitch_semitones": [], "gain_db": [], **changes})


def _snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    noise = noisy.astype(np.float64) - clean
    return 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(noise**2))


def test_every_field_has_help_and_defaults_validate():
    assert all(field_docs(AugmentConfig).values())
    cfg = AugmentConfig()
    cfg.validate("audio.augment")
    assert cfg.views == 0 and cfg.noise_snr_db == [20.0, 10.0] and cfg.speed == [0.9, 1.1]
    assert AugmentConfig().speed is not AugmentConfig().speed  # no shared mutable default


@pytest.mark.parametrize("snr", [20.0, 10.0, 3.0])
def test_white_noise_snr_matches_request(snr):
    clean = _tone()
    noisy = augment(clean, SR, _only(noise_snr_db=[snr, snr]), np.random.default_rng(0))
    assert noisy.dtype == np.float32 and noisy.shape == clean.shape
    assert abs(_snr_db(clean, noisy) - snr) < 0.5


def test_speed_changes_length_by_the_factor():
    clean = _tone(2.0)
    fast = augment(clean, SR, _only(speed=[1.1, 1.1]), np.random.default_rng(0))
    slow = augment(clean, SR, _only(speed=[0.9, 0.9]), np.random.default_rng(0))
    assert abs(fast.size - clean.size / 1.1) <= 2 and abs(slow.size - clean.size / 0.9) <= 2
    assert fast.dtype == np.float32


def test_gain_is_exact_and_output_is_clipped():
    clean = _tone(amp=0.2)
    louder = augment(clean, SR, _only(gain_db=[6.0, 6.0]), np.random.default_rng(0))
    np.testing.assert_allclose(louder, clean * 10 ** (6 / 20), rtol=1e-6, atol=1e-7)
    hot = augment(clean, SR, _only(gain_db=[20.0, 20.0]), np.random.default_rng(0))
    assert hot.max() <= 1.0 and hot.min() >= -1.0 and np.isclose(np.abs(hot).max(), 1.0)


def test_pitch_shift_keeps_length():
    clean = _tone(0.5)
    shifted = augment(clean, SR, _only(pitch_semitones=[2.0, 2.0]), np.random.default_rng(0))
    assert shifted.shape == clean.shape and shifted.dtype == np.float32
    assert not np.allclose(shifted, clean, atol=1e-3)


def test_views_are_deterministic_per_key():
    clean = _tone()
    cfg = AugmentConfig(views=3, pitch_semitones=[], seed=7)
    a, b = make_views(clean, SR, cfg, "train-0001"), make_views(clean, SR, cfg, "train-0001")
    assert len(a) == 3 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], a[1])  # each view draws anew
    other = make_views(clean, SR, cfg, "train-0002")
    assert not any(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, other))
    reseeded = make_views(clean, SR, dataclasses.replace(cfg, seed=8), "train-0001")
    assert not np.array_equal(a[0][: reseeded[0].size], reseeded[0][: a[0].size])
    assert make_views(clean, SR, AugmentConfig(), "x") == []


def test_noise_dir_crops_files_at_the_requested_snr(tmp_path):
    rng = np.random.default_rng(1)
    noise = (0.1 * rng.standard_normal(SR * 3)).astype(np.float32)
    sf.write(str(tmp_path / "hum.wav"), noise, 8000)  # other sample rate: resampled on load
    (tmp_path / "readme.txt").write_text("not audio")
    clean = _tone()
    cfg = _only(noise_snr_db=[15.0, 15.0], noise_dir=str(tmp_path))
    cfg.validate("augment")
    noisy = augment(clean, SR, cfg, np.random.default_rng(0))
    assert noisy.shape == clean.shape and abs(_snr_db(clean, noisy) - 15.0) < 0.5
    again = augment(clean, SR, cfg, np.random.default_rng(1))
    assert not np.array_equal(noisy, again)  # another crop


def test_empty_noise_dir_is_a_clear_error(tmp_path):
    cfg = _only(noise_snr_db=[10.0, 10.0], noise_dir=str(tmp_path))
    with pytest.raises(DataError, match="no .wav or .flac noise files"):
        augment(_tone(), SR, cfg, np.random.default_rng(0))


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"views": -1}, "views"),
        ({"speed": [0.0, 1.1]}, "speed"),
        ({"speed": [-0.9, 1.1]}, "speed"),
        ({"gain_db": [1.0]}, "gain_db"),
        ({"noise_snr_db": [5.0, 10.0, 20.0]}, "noise_snr_db"),
        ({"pitch_semitones": [float("nan"), 1.0]}, "pitch_semitones"),
        ({"noise_dir": "/no/such/folder"}, "noise_dir"),
    ],
)
def test_bad_ranges_raise_config_error(data, fragment):
    with pytest.raises(ConfigError, match=fragment) as err:
        from_dict(AugmentConfig, data, "audio.augment")
    assert "audio.augment." in str(err.value)


def test_config_loader_coerces_and_checks_types():
    cfg = from_dict(AugmentConfig, {"views": 2, "speed": [1, 1.2], "noise_dir": None})
    assert cfg.speed == [1.0, 1.2] and isinstance(cfg.speed[0], float)
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(AugmentConfig, {"snr": [1, 2]})
