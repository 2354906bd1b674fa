"""ASR evaluation: batched transcription, WER/CER raw and normalised, term recall, real-time factor."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

from modaltune.audio.whisper import log_mel
from modaltune.audio.io import SAMPLE_RATE
from modaltune.shared.config import doc
from modaltune.shared.features import FeatureCache
from modaltune.shared.generation import DecodingConfig, Inputs, generate
from modaltune.shared.metrics import alignment, char_error_rate, term_recall, word_error_rate


@dataclasses.dataclass
class ASREvalConfig(DecodingConfig):
    """How clips are decoded (the decoding settings) and scored."""

    prompt_terms: int = doc(40, "domain terms in the prompt-biased zero-shot baseline (0: skip that baseline)")
    normalizer: Literal["auto", "english", "basic"] = doc(
        "auto", "text normaliser for WER/CER: Whisper's English one for English models, the basic one otherwise")


def make_normalizer(kind: str, english: bool):
    """``(name, function)`` of the text normaliser used for the normalised scores."""
    if kind == "english" or (kind == "auto" and english):
        return "whisper-english", EnglishTextNormalizer({})
    return "whisper-basic", BasicTextNormalizer()


def prompt_ids(processor, terms: list[str], n: int) -> torch.Tensor | None:
    """Whisper ``prompt_ids`` listing the first ``n`` domain terms (a zero-training biasing baseline)."""
    if n <= 0 or not terms:
        return None
    text = "Medical dictation: " + ", ".join(terms[:n]) + "."
    ids = processor.get_prompt_ids(text, return_tensors="pt")
    return ids[:200]  # Whisper keeps the prompt within half of its 448-token context


class WhisperClips(Inputs):
    """Clips for :func:`~modaltune.shared.generation.generate` with a Whisper model, in order: their log-mel
    features, or (``keys`` of a filled ``cache``) their cached encoder states. Whisper reads the whole padded
    30 s window (its encoder takes no mask), so the attention mask over the feature frames is all ones."""

    def __init__(self, model, processor, waves: list[np.ndarray], *, cache: FeatureCache | None = None,
                 keys: list[str] | None = None) -> None:
        self.items = waves
        self.model = model
        self.processor = processor
        self.cache = cache
        self.keys = keys

    @contextlib.contextmanager
    def batch(self, indices: list[int], device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
        if self.keys is not None:
            states = self.cache.encoder_output([self.keys[i] for i in indices])
            with _cached_encoder(self.model, states) as feats:
                yield {"input_features": feats, "attention_mask": _frames(feats)}
        else:
            feats = log_mel(self.processor, [self.items[i] for i in indices]).to(device)
            yield {"input_features": feats, "attention_mask": _frames(feats)}


def _frames(feats: torch.Tensor) -> torch.Tensor:
    return torch.ones(feats.size(0), feats.size(-1), dtype=torch.long, device=feats.device)  # (B, frames)


@torch.no_grad()
def transcribe(model, processor, waves: list[np.ndarray], cfg: DecodingConfig, *, precision: str,
               language: str | None, task: str | None, cache: FeatureCache | None = None,
               prompt: torch.Tensor | None = None, desc: str = "decoding") -> tuple[list[str], float]:
    """Transcripts of ``waves`` and the seconds spent (features + encoder + decoding); decoded by
    :func:`~modaltune.shared.generation.generate` under ``precision``."""
    model.eval()
    args = {}
    if language is not None:
        args.update(language=language, task=task)
    if prompt is not None:
        args["prompt_ids"] = prompt.to(model.device)
    keys = cache.fill(waves, desc="encoding") if cache is not None else None
    # a pass that found its encoder states cached is still charged what encoding them cost, so RTFs compare
    charged = sum(cache.seconds[k] for k in keys) if keys is not None else 0.0
    started = time.perf_counter()
    with _beam_reorder_self_attention_only(model, cfg.num_beams):
        texts = generate(model.whisper, processor.tokenizer, WhisperClips(model, processor, waves, cache=cache,
                                                                          keys=keys),
                         cfg, precision=precision, desc=desc, **args)
    if prompt is not None:  # some transformers versions return the prompt text in front of the transcript
        prompt_text = processor.decode(prompt, skip_special_tokens=True).strip()
        texts = [t[len(prompt_text):].strip() if prompt_text and t.startswith(prompt_text) else t for t in texts]
    return texts, time.perf_counter() - started + charged


@contextlib.contextmanager
def _beam_reorder_self_attention_only(model, num_beams: int):
    """Beam search without copying the cross-attention cache at every step.

    After each step, ``generate`` reorders the whole key/value cache by the surviving beams. The cross-attention
    part holds, per beam, keys and values of all 1500 encoder frames in every layer, and every beam of one clip
    holds the same ones (beams never move between clips), so that copy changes nothing and was most of the time a
    beam step took (measured on whisper-tiny.en, 16 clips, 4 beams: 21.3 s -> 7.2 s, identical transcripts). Here
    only the self-attention cache is reordered; ``generate`` prefers a model's ``_reorder_cache`` when it has one.
    """
    base = model.base
    if num_beams <= 1 or "_reorder_cache" in vars(base) or hasattr(type(base), "_reorder_cache"):
        yield
        return

    def reorder(past, beam_idx):
        inner = getattr(past, "self_attention_cache", None)
        if inner is None:  # not an encoder-decoder cache: reorder all of it, as generate would
            past.reorder_cache(beam_idx)
        else:
            inner.reorder_cache(beam_idx)
        return past

    base._reorder_cache = reorder
    try:
        yield
    finally:
        del base._reorder_cache


@contextlib.contextmanager
def _cached_encoder(model, states: torch.Tensor):
    """Let ``generate`` take cached encoder states through ``input_features``.

    Passing ``encoder_outputs`` is wrong with beam search: Whisper's ``generate`` calls the generic ``generate`` more
    than once per batch, and each call expands the shared ``encoder_outputs`` in place for the beams again, so later
    calls attend to other clips' states (measured: batch 3 grew to 48). Here the encoder runs on every call, but as
    a lookup: the yielded placeholder features carry each row's index, and the encoder returns that row's cached
    states, whatever rows and order a call passes.
    """
    encoder = model.base.model.encoder
    cfg = model.config
    feats = torch.zeros(states.size(0), cfg.num_mel_bins, 2 * cfg.max_source_positions, device=states.device)
    index = torch.arange(states.size(0), device=states.device)
    feats[:, 0, 0], feats[:, 0, 1] = index // 256, index % 256  # exact even if generate casts to bf16/fp16

    def lookup(input_features=None, *args, **kwargs):
        rows = (input_features[:, 0, 0].float().round() * 256 + input_features[:, 0, 1].float().round()).long()
        return BaseModelOutput(last_hidden_state=states[rows].to(input_features.dtype))

    encoder.forward = lookup
    try:
        yield feats
    finally:
        del encoder.forward  # back to the class's forward


def score(predictions: list[str], references: list[str], seconds: float, audio_seconds: float, *,
          normalizer, terms: list[str]) -> dict[str, float]:
    """WER/CER (normalised and raw), term recall and real-time factor of one decoding pass."""
    norm_p = [normalizer(p) for p in predictions]
    norm_r = [normalizer(r) for r in references]
    metrics = {
        "wer": word_error_rate(norm_p, norm_r),
        "cer": char_error_rate(norm_p, norm_r),
        "wer_raw": word_error_rate(predictions, references),
        "cer_raw": char_error_rate(predictions, references),
        "rtf": seconds / max(audio_seconds, 1e-9),
    }
    if terms:
        metrics["term_recall"] = float(term_recall(predictions, references, terms)["recall"])
    return metrics


def speaker_wer(predictions: list[str], references: list[str], speakers: list[str], *, normalizer) -> dict[str, float]:
    """Normalised WER per speaker, keyed ``wer@<speaker>`` (empty when the clips have fewer than two speakers).

    Example:
        >>> from modaltune.audio.eval import make_normalizer
        >>> _, norm = make_normalizer("basic", english=True)
        >>> speaker_wer(["take aspirin", "take the aspirin"], ["take aspirin", "take aspirin"], ["a", "b"],
        ...             normalizer=norm)
        {'wer@a': 0.0, 'wer@b': 0.5}
    """
    names = sorted({s for s in speakers if s})
    if len(names) < 2:
        return {}
    out = {}
    for name in names:
        rows = [(normalizer(p), normalizer(r)) for p, r, s in zip(predictions, references, speakers) if s == name]
        out[f"wer@{name}"] = word_error_rate([p for p, _ in rows], [r for _, r in rows])
    return out


def utterance_rows(set_name: str, ids: list[str], references: list[str], hyps: dict[str, list[str]],
                   normalizer) -> list[dict]:
    """Per-utterance alignment of the last hypothesis column against the reference, with every column shown."""
    rows = []
    final = list(hyps)[-1]
    for i, ref in enumerate(references):
        a = alignment(normalizer(hyps[final][i]), normalizer(ref))
        row = {"set": set_name, "id": ids[i], "reference": ref}
        row.update({name: texts[i] for name, texts in hyps.items()})
        row.update({"wer": round(a["wer"], 4), "sub": a["substitutions"], "del": a["deletions"],
                    "ins": a["insertions"], "errors": "; ".join(f"{o['op']}: {o['ref']!r}->{o['hyp']!r}"
                                                                 for o in a["ops"])})
        rows.append(row)
    return rows


def audio_seconds(waves: list[np.ndarray]) -> float:
    return float(sum(len(w) for w in waves)) / SAMPLE_RATE
