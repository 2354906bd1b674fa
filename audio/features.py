"""Log-mel features, the frozen-encoder cache, and the training dataset built on them.

When the encoder is frozen, its output for a clip never changes: :class:`EncoderCache` computes it once per clip
(and per augmented view), keeps it in memory and, when given a folder, on disk keyed by the audio's content and the
model, and the decoder then trains on the stored states. The encoder is the bulk of a Whisper step, so this is the
difference between seconds and a fraction of a second per batch on a CPU.

When only the top encoder blocks train (``encoder.layers``), the cache keeps the input of the lowest trained block
instead (its *depth*, :attr:`WhisperASR.cache_depth`), and each step runs only the blocks above it.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from modaltune.audio.io import SAMPLE_RATE
from modaltune.shared.loss import IGNORE_INDEX


def log_mel(processor, waves: list[np.ndarray]) -> torch.Tensor:
    """Whisper log-mel features ``(B, n_mels, 3000)`` (30 s windows, zero-padded)."""
    return processor.feature_extractor(waves, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features


def audio_key(wave: np.ndarray) -> str:
    """Content hash of a waveform (identical audio -> identical key, whatever its file name)."""
    return hashlib.sha256(np.ascontiguousarray(wave, dtype=np.float32).tobytes()).hexdigest()[:32]


def model_fingerprint(model, depth: int | None = None) -> str:
    """A hash of the encoder weights below ``depth`` blocks (None: all of them) and of the depth: cached states
    are only reused for the same frozen part of the same encoder."""
    h = hashlib.sha256()
    n = len(model.base.model.encoder.layers)
    depth = n if depth is None else depth
    h.update(f"depth={depth}/{n}".encode())
    for name, p in model.get_submodule(model.components["encoder"]).named_parameters():
        parts = name.split(".")
        if depth < n and (name.startswith("layer_norm") or (parts[0] == "layers" and int(parts[1]) >= depth)):
            continue  # trained (or above the cached depth): not part of what the cache holds
        h.update(name.encode())
        h.update(p.detach().float().sum().item().hex().encode())
    return h.hexdigest()[:16]


class EncoderCache:
    """Encoder states per audio content, computed once; optionally persisted as safetensors files.

    ``depth`` is how many encoder blocks the cached states went through (:attr:`WhisperASR.cache_depth`; None:
    all of them, i.e. the encoder output).
    """

    def __init__(self, model, processor, *, directory: str | Path | None = None, batch_size: int = 8,
                 autocast_dtype: torch.dtype | None = None, depth: int | None = None) -> None:
        self.model = model
        self.processor = processor
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype
        n = len(model.base.model.encoder.layers)
        self.depth = n if depth is None or depth >= n else depth
        self.complete = self.depth == n  # the states are the encoder output
        self.fingerprint = model_fingerprint(model, self.depth)
        self.directory = Path(directory) / self.fingerprint if directory else None
        self.states: dict[str, torch.Tensor] = {}
        self.seconds: dict[str, float] = {}  # encoder seconds spent per clip (RTF charges them to every pass)
        self.computed = 0
        self.loaded = 0

    def _file(self, key: str) -> Path | None:
        return self.directory / f"{key}.safetensors" if self.directory else None

    @torch.no_grad()
    def fill(self, waves: list[np.ndarray], desc: str = "encoding") -> list[str]:
        """Make sure every wave has cached states; returns their keys."""
        from safetensors.torch import load_file, save_file

        from modaltune.shared.io import atomic_write

        keys = [audio_key(w) for w in waves]
        todo = []
        for key, wave in zip(keys, waves):
            if key in self.states:
                continue
            path = self._file(key)
            if path is not None and path.is_file():
                began = time.perf_counter()
                self.states[key] = load_file(str(path))["states"]
                self.seconds[key] = time.perf_counter() - began
                self.loaded += 1
            else:
                todo.append((key, wave))
        unique = list(dict(todo).items())
        was_training = self.model.training
        self.model.eval()
        try:
            for start in tqdm(range(0, len(unique), self.batch_size), desc=desc, leave=False,
                              disable=len(unique) <= self.batch_size):
                chunk = unique[start : start + self.batch_size]
                began = time.perf_counter()
                feats = log_mel(self.processor, [w for _, w in chunk]).to(self.model.device)
                with torch.autocast(feats.device.type, dtype=self.autocast_dtype or torch.float32,
                                    enabled=self.autocast_dtype is not None):
                    states = self.model.encode_prefix(feats, self.depth).float().cpu()  # (B, 1500, D)
                per_clip = (time.perf_counter() - began) / len(chunk)
                for (key, _), state in zip(chunk, states):
                    state = state.contiguous()
                    self.states[key] = state
                    self.seconds[key] = per_clip
                    self.computed += 1
                    path = self._file(key)
                    if path is not None:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        atomic_write(path, lambda tmp, s=state: save_file({"states": s}, tmp))
        finally:
            self.model.train(was_training)
        return keys

    def encoder_output(self, keys: list[str]) -> torch.Tensor:
        """Encoder output ``(B, 1500, D)`` of cached clips (runs the blocks above the cached depth)."""
        states = torch.stack([self.states[k] for k in keys]).to(self.model.device)
        if self.complete:
            return states
        with torch.autocast(states.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            return self.model.encode_rest(states, self.depth).float()


class ASRDataset(torch.utils.data.Dataset):
    """Training examples: labels plus either cached encoder states or log-mel features."""

    def __init__(self, waves: list[np.ndarray], labels: list[list[int]], processor, *,
                 cache: EncoderCache | None = None, replay: list[bool] | None = None) -> None:
        if len(waves) != len(labels) or (replay is not None and len(replay) != len(waves)):
            raise ValueError("one label sequence (and replay flag) per wave")
        self.waves = waves
        self.labels = labels
        self.replay = replay
        self.processor = processor
        self.cache = cache
        self.keys = cache.fill(waves, desc="caching encoder states") if cache else None

    def __len__(self) -> int:
        return len(self.waves)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"labels": self.labels[i]}
        if self.replay is not None:
            item["replay"] = self.replay[i]
        if self.cache is not None:
            item["encoder_hidden"] = self.cache.states[self.keys[i]]
            if not self.cache.complete:
                item["encoder_depth"] = self.cache.depth
        else:
            item["input_features"] = log_mel(self.processor, [self.waves[i]])[0]
        return item


class ASRCollator:
    """Stacks features or encoder states, right-pads labels with ``-100``, and stacks replay flags if any."""

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(b["labels"]) for b in batch)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for i, b in enumerate(batch):
            labels[i, : len(b["labels"])] = torch.tensor(b["labels"])
        out = {"labels": labels}
        key = "encoder_hidden" if "encoder_hidden" in batch[0] else "input_features"
        out[key] = torch.stack([b[key] for b in batch])
        if "encoder_depth" in batch[0]:
            out["encoder_depth"] = batch[0]["encoder_depth"]
        if "replay" in batch[0]:
            out["replay"] = torch.tensor([bool(b["replay"]) for b in batch])  # (B,)
        return out
