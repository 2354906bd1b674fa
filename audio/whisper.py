"""Whisper for ASR fine-tuning: loading, per-component PEFT (encoder / decoder), frozen-encoder outputs.

:class:`WhisperASR` wraps a ``WhisperForConditionalGeneration`` (possibly PEFT-wrapped) as two components,
``encoder`` and ``decoder``. Its forward takes either log-mel ``input_features`` or precomputed encoder states
(``features``, from :class:`modaltune.shared.features.FeatureCache`); the second is what makes frozen-encoder
training cheap. It implements the cache's encoder protocol (:class:`modaltune.shared.features.CachedEncoder`).

The cache works at a *depth*: the number of encoder blocks below the first one that trains. With a frozen encoder
that is every block (the cached states are the encoder's output); with ``encoder.layers: [-1]`` it is all but the
top block, whose input is cached and which then runs (with its adapters) on every step. Anything that trains
below block 0 (the convolutions, ``full`` without ``layers``) or SpecAugment leaves nothing to cache.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from modaltune.audio.io import SAMPLE_RATE
from modaltune.shared.config import doc
from modaltune.shared.errors import ConfigError, ModaltuneError
from modaltune.shared.loss import IGNORE_INDEX, label_logits_cross_entropy, unwrap_peft
from modaltune.shared.model import ModaltuneModel, block_input
from modaltune.shared.peft import ComponentConfig, ComponentSpec, apply_peft, method_of
from modaltune.shared.quant import quantized_load_kwargs
from modaltune.shared.zoo import load_error, resolve_model

WHISPER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@dataclasses.dataclass
class WhisperModelConfig:
    """Which Whisper to load."""

    name: str = doc("whisper-tiny.en", "zoo name (whisper-tiny.en, whisper-base), local folder or hub id")
    revision: str | None = doc(None, "hub revision")
    language: str | None = doc(None, "spoken language for multilingual models (e.g. en); null for .en models")
    task: Literal["transcribe", "translate"] = doc("transcribe", "multilingual models: transcribe or translate")
    spec_augment: bool = doc(False, "SpecAugment masking of input features while training (turns the encoder cache off)")
    mask_time_prob: float = doc(0.05, "SpecAugment: fraction of time steps masked")
    mask_feature_prob: float = doc(0.0, "SpecAugment: fraction of mel channels masked")


def whisper_components() -> dict[str, ComponentConfig]:
    """Default per-component methods: frozen encoder, LoRA on the decoder."""
    return {
        "encoder": ComponentConfig(method="frozen", targets=list(WHISPER_TARGETS)),
        "decoder": ComponentConfig(method="lora", r=32, alpha=64, dropout=0.0, targets=list(WHISPER_TARGETS)),
    }


def load_whisper(cfg: WhisperModelConfig, *, encoder: ComponentConfig, decoder: ComponentConfig,
                 compute_dtype: torch.dtype = torch.float32, log_fn=print):
    """Load model and processor; QLoRA/int8 quantise only the components that ask for it."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    path, kind = resolve_model(cfg.name, log=log_fn, revision=cfg.revision)
    kwargs: dict[str, Any] = {"revision": cfg.revision, "dtype": torch.float32}
    quantised = {c.method for c in (encoder, decoder) if method_of(c).quantised}
    if len(quantised) > 1:
        raise ConfigError("encoder and decoder ask for different quantisation (qlora vs lora8bit); pick one")
    if quantised:
        method = quantised.pop()
        skip = ["proj_out"] + [f"model.{n}" for n, c in (("encoder", encoder), ("decoder", decoder))
                               if not method_of(c).quantised]
        kwargs.update(quantized_load_kwargs(method, compute_dtype=compute_dtype, skip_modules=skip))
    try:
        model = WhisperForConditionalGeneration.from_pretrained(path, **kwargs)
        processor = WhisperProcessor.from_pretrained(path, revision=cfg.revision)
    except (OSError, ValueError) as exc:
        raise load_error(cfg.name, kind, path, "Whisper", exc) from None
    tok = processor.tokenizer
    if tok.pad_token is None:
        tok.pad_token = "<|endoftext|>"
    multilingual = bool(getattr(model.generation_config, "is_multilingual", False))
    if multilingual and cfg.language is None:
        raise ConfigError(f"{cfg.name!r} is multilingual: set model.language (e.g. en) so training and decoding agree")
    if not multilingual and cfg.language not in (None, "en", "english"):
        raise ConfigError(f"{cfg.name!r} is English-only; model.language={cfg.language!r} does not apply")
    tok.set_prefix_tokens(language=cfg.language if multilingual else None,
                          task=cfg.task if multilingual else None, predict_timestamps=False)
    model.config.apply_spec_augment = cfg.spec_augment
    model.config.mask_time_prob = cfg.mask_time_prob
    model.config.mask_feature_prob = cfg.mask_feature_prob
    return model, processor, {"name": cfg.name, "kind": kind, "path": path, "multilingual": multilingual}


def _path_of(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ModaltuneError("internal: component module not found in the model")


class WhisperASR(ModaltuneModel):
    """Whisper as two components; forward accepts log-mel features or precomputed encoder states."""

    shifted_labels = False  # the decoder input is already shifted: position t predicts labels[t]

    def __init__(self, whisper: nn.Module, *, pad_token_id: int, decoder_start_token_id: int) -> None:
        super().__init__()
        self.whisper = whisper
        base = unwrap_peft(whisper)
        self.components = {
            "encoder": _path_of(self, base.model.encoder),
            "decoder": _path_of(self, base.model.decoder),
        }
        self.pad_token_id = pad_token_id
        self.decoder_start_token_id = decoder_start_token_id
        self.replay_kl_weight = 0.0  # > 0: keep replay rows' token distributions close to the zero-shot model's
        self.feature_extractor = None  # the processor's log-mel extractor (build_whisper sets it)

    @property
    def base(self) -> nn.Module:
        return unwrap_peft(self.whisper)

    @property
    def config(self):
        return self.base.config

    def encode(self, input_features: torch.Tensor) -> torch.Tensor:
        """Encoder states ``(B, 1500, D)`` for log-mel features ``(B, n_mels, 3000)``; SpecAugment when training."""
        base = self.base
        if self.training and base.config.apply_spec_augment:
            input_features = base.model._mask_input_features(input_features)
        return base.model.encoder(input_features).last_hidden_state

    # -- the encoder protocol of modaltune.shared.features (the feature cache) ---------------------------------
    @property
    def preprocessing_key(self) -> str:
        return whisper_preprocessing_key(self.feature_extractor)

    @property
    def out_dim(self) -> int:
        return int(self.config.d_model)

    @property
    def output_depth(self) -> int:
        return len(self.base.model.encoder.layers)

    def preprocess(self, waves: list[np.ndarray]) -> torch.Tensor:
        """Log-mel features ``(B, n_mels, 3000)`` (30 s windows, zero-padded)."""
        return log_mel(self.feature_extractor, waves)

    def cache_depth(self) -> int | None:
        """Encoder blocks whose output can be cached: all of them for a frozen encoder, those below the lowest
        trainable block otherwise; None when something below block 0 trains (nothing to cache)."""
        return whisper_cache_depth(self.base.model.encoder)

    def cached_weights(self, depth: int):
        return whisper_cached_weights(self.base.model.encoder, depth)

    def encode_prefix(self, input_features: torch.Tensor, depth: int) -> torch.Tensor:
        """The states the cache keeps: the encoder output when ``depth`` covers every block, else the input of
        block ``depth`` (the lower blocks' output), without running the blocks above it."""
        encoder = self.base.model.encoder
        if depth >= len(encoder.layers):
            return self.encode(input_features)
        return block_input(encoder.layers[depth], lambda: encoder(input_features))

    def encode_rest(self, states: torch.Tensor, depth: int) -> torch.Tensor:
        """Encoder output from cached states at ``depth`` (runs the blocks above it and the final norm)."""
        return whisper_encode_rest(self.base.model.encoder, states, depth)

    def forward(self, labels=None, input_features=None, features=None, features_depth=None, replay=None,
                **kwargs):
        """Training loss; ``features`` are cached encoder states at ``features_depth`` blocks (None: the output).

        ``replay`` (B,) flags general-speech rows: with :attr:`replay_kl_weight` > 0 their loss also counts the KL
        divergence from the zero-shot model's next-token distributions (the decoder with its adapters off, on the
        same encoder states) to the tuned one's, at every label position.
        """
        num_items = kwargs.pop("num_items_in_batch", None)
        if features is None:
            if input_features is None:
                raise ModaltuneError("WhisperASR needs input_features or cached features")
            encoder_hidden = self.encode(input_features)
        elif features_depth is not None:
            encoder_hidden = self.encode_rest(features, int(features_depth))
        else:
            encoder_hidden = features
        if labels is None:
            raise ModaltuneError("WhisperASR.forward computes the training loss: pass labels")
        from transformers.models.whisper.modeling_whisper import shift_tokens_right

        base = self.base
        decoder_input = shift_tokens_right(
            labels.masked_fill(labels == IGNORE_INDEX, self.pad_token_id), self.pad_token_id,
            self.decoder_start_token_id,
        )  # (B, T)
        hidden = base.model.decoder(input_ids=decoder_input, encoder_hidden_states=encoder_hidden,
                                    use_cache=False).last_hidden_state  # (B, T, D)
        loss = label_logits_cross_entropy(hidden, labels, base.proj_out, num_items_in_batch=num_items, shift=False)
        if self.replay_kl_weight > 0 and replay is not None and bool(replay.any()):
            loss = loss + self.replay_kl_weight * self.replay_kl(hidden, labels, decoder_input, encoder_hidden, replay)
        return {"loss": loss}

    def replay_kl(self, hidden: torch.Tensor, labels: torch.Tensor, decoder_input: torch.Tensor,
                  encoder_hidden: torch.Tensor, replay: torch.Tensor) -> torch.Tensor:
        """Mean KL(zero-shot || tuned) over the label positions of the ``replay`` rows."""
        disable = getattr(self.whisper, "disable_adapter", None)
        if disable is None:
            raise ConfigError("replay.kl_weight needs an adapter method on the decoder (lora, dora, qlora, lora8bit, "
                              "ia3): with full or frozen there is no zero-shot model left to stay close to")
        rows = replay.to(hidden.device)
        mask = labels[rows] != IGNORE_INDEX  # (R, T)
        base = self.base
        with torch.no_grad(), disable():
            teacher = base.model.decoder(input_ids=decoder_input[rows], encoder_hidden_states=encoder_hidden[rows],
                                         use_cache=False).last_hidden_state  # (R, T, D)
            teacher_logp = torch.log_softmax(base.proj_out(teacher[mask]).float(), dim=-1)  # (N, V)
        student_logp = torch.log_softmax(base.proj_out(hidden[rows][mask]).float(), dim=-1)  # (N, V)
        return torch.nn.functional.kl_div(student_logp, teacher_logp, log_target=True, reduction="batchmean")


def build_whisper(cfg: WhisperModelConfig, components: dict[str, ComponentConfig], *,
                  compute_dtype: torch.dtype = torch.float32, log_fn=print):
    """Load Whisper, apply each component's method, wrap; returns ``(model, processor, source)``."""
    unknown = set(components) - {"encoder", "decoder"}
    if unknown:
        raise ConfigError(f"unknown Whisper component(s) {sorted(unknown)}; use encoder and decoder")
    enc, dec = components["encoder"], components["decoder"]
    for name, comp in (("encoder", enc), ("decoder", dec)):
        if method_of(comp).virtual_tokens:
            raise ConfigError(f"{name}.method={comp.method} is for causal LMs; use lora, dora, ia3, full or frozen")
    if not method_of(enc).trains and not method_of(dec).trains:
        raise ConfigError("encoder and decoder are both frozen: nothing would train")
    whisper, processor, source = load_whisper(cfg, encoder=enc, decoder=dec, compute_dtype=compute_dtype,
                                              log_fn=log_fn)
    whisper = apply_peft(whisper, [ComponentSpec("encoder", "model.encoder", enc),
                                   ComponentSpec("decoder", "model.decoder", dec)], causal_lm=False)
    tok = processor.tokenizer
    model = WhisperASR(whisper, pad_token_id=tok.pad_token_id,
                       decoder_start_token_id=unwrap_peft(whisper).config.decoder_start_token_id)
    model.feature_extractor = processor.feature_extractor
    model.record_trained(full_components=[n for n, c in (("encoder", enc), ("decoder", dec))
                                          if method_of(c).full_weights])
    return model, processor, source


def label_ids(processor, text: str) -> list[int]:
    """Training labels for one transcript: prefix tokens, text, end-of-text; the start token is dropped because
    the decoder input re-inserts it."""
    ids = processor.tokenizer(" " + text.strip()).input_ids
    start = processor.tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    return ids[1:] if ids and ids[0] == start else ids



def log_mel(feature_extractor, waves: list[np.ndarray]) -> torch.Tensor:
    """Whisper log-mel features ``(B, n_mels, 3000)`` (30 s windows, zero-padded) of 16 kHz waveforms."""
    extract = getattr(feature_extractor, "feature_extractor", feature_extractor)  # a processor works too
    return extract(waves, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features


def whisper_preprocessing_key(feature_extractor) -> str:
    """What the log-mel features depend on besides the audio."""
    fe = getattr(feature_extractor, "feature_extractor", feature_extractor)
    return (f"whisper-logmel:{getattr(fe, 'feature_size', '?')}:{getattr(fe, 'sampling_rate', '?')}:"
            f"{getattr(fe, 'n_samples', '?')}:{getattr(fe, 'hop_length', '?')}")


def whisper_cache_depth(encoder: nn.Module) -> int | None:
    """Blocks of a Whisper encoder whose output a cache may hold (see :meth:`WhisperASR.cache_depth`)."""
    n = len(encoder.layers)
    depth = n
    for name, param in encoder.named_parameters():
        if not param.requires_grad:
            continue
        parts = name.split(".")
        if parts[0] == "layers":
            depth = min(depth, int(parts[1]))
        elif parts[0] != "layer_norm":
            return None
        else:
            depth = min(depth, n - 1)  # the final norm trains: cache below the top block
    return depth


def whisper_cached_weights(encoder: nn.Module, depth: int) -> list[tuple[str, torch.Tensor]]:
    """The encoder weights below ``depth`` blocks (all of them at the output's depth)."""
    n = len(encoder.layers)
    out = []
    for name, p in encoder.named_parameters():
        parts = name.split(".")
        if depth < n and (name.startswith("layer_norm") or (parts[0] == "layers" and int(parts[1]) >= depth)):
            continue  # trained (or above the cached depth): not part of what the cache holds
        out.append((name, p))
    return out


def whisper_encode_rest(encoder: nn.Module, states: torch.Tensor, depth: int) -> torch.Tensor:
    """Encoder output from states cached at ``depth`` (runs the blocks above it and the final norm)."""
    if depth >= len(encoder.layers):
        return states
    for layer in encoder.layers[depth:]:
        out = layer(states, None)
        states = out[0] if isinstance(out, tuple) else out
    return encoder.layer_norm(states)
