"""The ASR training dataset and collator, on cached encoder states when the encoder is frozen.

When the encoder is frozen, its output for a clip never changes: :class:`modaltune.shared.features.FeatureCache`
computes it once per clip (and per augmented view), keyed by the audio's content, and the decoder then trains on
the stored states. The encoder is the bulk of a Whisper step, so this is the difference between seconds and a
fraction of a second per batch on a CPU. When only the top encoder blocks train (``encoder.layers``), the cache
keeps the input of the lowest trained block instead, and each step runs only the blocks above it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from modaltune.audio.whisper import log_mel
from modaltune.shared.errors import DataError
from modaltune.shared.features import FeatureCache
from modaltune.shared.loss import IGNORE_INDEX
from modaltune.shared.provenance import fingerprint
from modaltune.shared.sequences import pad_sequences

__all__ = ["ASRCollator", "ASRDataset", "log_mel"]


class ASRDataset(torch.utils.data.Dataset):
    """Training examples: labels plus either cached encoder states (``features``) or log-mel features.

    ``names`` (a clip id per wave) name a wave whose encoder states are not finite in the cache's error.
    """

    def __init__(self, waves: list[np.ndarray], labels: list[list[int]], processor, *,
                 cache: FeatureCache | None = None, replay: list[bool] | None = None,
                 names: list[str] | None = None) -> None:
        if len(waves) != len(labels) or (replay is not None and len(replay) != len(waves)):
            raise DataError(f"{len(waves)} waves, {len(labels)} label sequences: give one label sequence (and "
                            "replay flag) per wave")
        self.waves = waves
        self.labels = labels
        self.replay = replay
        self.processor = processor
        self.cache = cache
        self.keys = cache.fill(waves, desc="caching encoder states", names=names) if cache else None

    def __len__(self) -> int:
        return len(self.waves)

    def fingerprint(self) -> str:
        """The training content: each wave's content key (or its samples), labels and replay flags."""
        return fingerprint(self.keys if self.keys is not None else self.waves, self.labels, self.replay)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"labels": self.labels[i]}
        if self.replay is not None:
            item["replay"] = self.replay[i]
        if self.cache is not None:
            item["features"] = self.cache.states[self.keys[i]]
            item.update(self.cache.batch_fields())
        else:
            item["input_features"] = log_mel(self.processor, [self.waves[i]])[0]
        return item


class ASRCollator:
    """Stacks features or encoder states, right-pads labels with ``-100``, and stacks replay flags if any."""

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        out = {"labels": pad_sequences([b["labels"] for b in batch], IGNORE_INDEX)[0]}  # (B, T)
        key = "features" if "features" in batch[0] else "input_features"
        out[key] = torch.stack([b[key] for b in batch])
        if "features_depth" in batch[0]:
            out["features_depth"] = batch[0]["features_depth"]
        if "replay" in batch[0]:
            out["replay"] = torch.tensor([bool(b["replay"]) for b in batch])  # (B,)
        return out
