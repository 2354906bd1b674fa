"""Whisper's speech encoder as a token encoder for composed models (``encoder.kind: whisper``).

It yields ``(B, 1500, D)`` frames (50 per second of a 30 s window), of which a clip's own are the first
``ceil(samples / 320)`` (:meth:`WhisperEncoder.token_count`): the feature cache keeps only those, and a composed
model projects only those into the prompt, so a 4 s clip costs 200 frames, not 1500. It implements the feature cache's encoder
protocol (:class:`modaltune.shared.features.CachedEncoder`), so a frozen encoder is run once per clip and, with
top-block tuning (``encoder_tuning.layers``), only the blocks above the cached depth run each step. The ASR model
(:class:`modaltune.audio.whisper.WhisperASR`) shares the block logic below.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from modaltune.audio.whisper import (log_mel, whisper_cache_depth, whisper_cached_weights, whisper_encode_rest,
                                     whisper_preprocessing_key)
from modaltune.shared.compose import EncoderConfig
from modaltune.shared.errors import ConfigError
from modaltune.shared.model import block_input
from modaltune.shared.registry import ENCODERS
from modaltune.shared.zoo import load_error, resolve_model


class WhisperEncoder(nn.Module):
    """A Whisper encoder and its log-mel feature extractor; ``forward(input_features) -> (B, 1500, D)``."""

    def __init__(self, encoder: nn.Module, feature_extractor, *, layer: int | None = None, trim: bool = True) -> None:
        super().__init__()
        self.trim = trim
        self.encoder = encoder
        self.feature_extractor = feature_extractor
        self.layer = layer
        self.out_dim = int(encoder.config.d_model)
        if layer is not None:
            raise ConfigError("encoder.layer is not supported for whisper yet: leave it null (the last block)")

    @property
    def preprocessing_key(self) -> str:
        return whisper_preprocessing_key(self.feature_extractor) + (":trim" if self.trim else "")

    def token_count(self, wave: np.ndarray) -> int | None:
        """Output frames that hold ``wave`` (two mel hops each, at most the window's); None without trimming.

        Example:
            >>> from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel
            >>> enc = WhisperEncoder(WhisperModel(WhisperConfig(d_model=8, encoder_layers=1, decoder_layers=1,
            ...     encoder_attention_heads=2, decoder_attention_heads=2)).get_encoder(), WhisperFeatureExtractor())
            >>> enc.token_count(np.zeros(16_000)), enc.token_count(np.zeros(40 * 16_000))
            (50, 1500)
        """
        if not self.trim:
            return None
        fe = getattr(self.feature_extractor, "feature_extractor", self.feature_extractor)
        hop = 2 * int(getattr(fe, "hop_length", 160))  # the conv stem halves the mel frame rate
        return max(1, min(int(self.encoder.config.max_source_positions), -(-len(wave) // hop)))

    @property
    def output_depth(self) -> int:
        return len(self.encoder.layers)

    def preprocess(self, waves: list[np.ndarray]) -> torch.Tensor:
        return log_mel(self.feature_extractor, waves)  # (B, n_mels, 3000)

    def cache_depth(self) -> int | None:
        return whisper_cache_depth(self.encoder)

    def cached_weights(self, depth: int):
        return whisper_cached_weights(self.encoder, depth)

    def encode_prefix(self, input_features: torch.Tensor, depth: int) -> torch.Tensor:
        if depth >= self.output_depth:
            return self(input_features)
        return block_input(self.encoder.layers[depth], lambda: self.encoder(input_features))

    def encode_rest(self, states: torch.Tensor, depth: int) -> torch.Tensor:
        return whisper_encode_rest(self.encoder, states, depth)

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_features).last_hidden_state  # (B, 1500, D)

    def architecture(self) -> dict[str, Any]:
        """What :func:`build_whisper_encoder` rebuilds this encoder from without its weights: Whisper's config and
        the feature extractor's settings (JSON)."""
        return {"whisper": self.encoder.config.to_dict(), "feature_extractor": self.feature_extractor.to_dict()}


@ENCODERS.register("whisper")
def build_whisper_encoder(cfg: EncoderConfig, log=print, *, architecture: dict[str, Any] | None = None
                          ) -> WhisperEncoder:
    """The encoder of the Whisper model ``cfg.name`` (zoo name, local folder or hub id; default whisper-tiny.en), or,
    with ``architecture`` (:meth:`WhisperEncoder.architecture`), that encoder with no weights loaded."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as WhisperBlocks

    if architecture is not None:
        blocks = WhisperBlocks(WhisperConfig.from_dict(architecture["whisper"]))
        return WhisperEncoder(blocks.eval(), WhisperFeatureExtractor.from_dict(architecture["feature_extractor"]),
                              layer=cfg.layer)
    name = cfg.name or "whisper-tiny.en"
    path, kind = resolve_model(name, log=log)
    try:
        encoder = WhisperModel.from_pretrained(path, dtype=torch.float32).get_encoder()
        extractor = WhisperFeatureExtractor.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise load_error(name, kind, path, "Whisper encoder", exc) from None
    return WhisperEncoder(encoder.eval(), extractor, layer=cfg.layer)
