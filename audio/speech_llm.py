"""The composed speech LLM's own parts: its encoder-feature cache, the held-out readings it learns from, and what
its word tokens spell by themselves."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from modaltune.audio.eval import score
from modaltune.shared.compose import check_heldout, heldout_readings, read_words, word_projector
from modaltune.shared.features import FeatureCache
from modaltune.shared.harness import timed
from modaltune.shared.loss import unwrap_peft


def reading_scores(model, tokenizer, rows: list[dict[str, Any]], cache, *, normalizer) -> dict[str, float]:
    """WER/CER of what the word tokens spell by themselves (``test/words_wer``, ``test/words_cer``): the greedy
    CTC reading a collapsing projector shows the LLM, on the transcription rows. It tells a misheard clip from
    one the LLM misread. Empty where there is no such reading: no collapse, no complete feature ``cache`` of
    encoder output states, or anchors whose token ids are unknown (a model loaded from a checkpoint)."""
    words = word_projector(model.projector)
    refs = [r for r in rows if r["task"] == "transcribe"]
    if (not refs or words is None or not words.collapse or cache is None or not cache.complete
            or min(words.word_ids.tolist()) < 0):
        return {}
    read = read_words(model, [cache.get(r["input"]) for r in refs])
    got = score([tokenizer.decode(t).strip() for t in read], [r["target"] for r in refs], 0.0, 1.0,
                normalizer=normalizer, terms=[])
    return {"test/words_wer": got["wer"], "test/words_cer": got["cer"]}


def speech_cache(model, cfg, ids: list[str], load: Callable[[str], Any], *, batch_size: int, dtype=None):
    """The encoder-feature cache of a composed speech model, filled for the clips ``ids`` (``load``: id -> wave), or
    None where ``cfg`` (a :class:`~modaltune.shared.features.CacheConfig`) turns it off or nothing of the encoder
    is frozen. It holds what the frozen part of the encoder gives, trimmed to each clip."""
    depth = unwrap_peft(model.encoder).cache_depth() if cfg.mode == "auto" else None
    if depth is None:
        return None
    cache = FeatureCache(model.encoder, depth=depth, batch_size=batch_size, autocast_dtype=dtype, directory=cfg.dir,
                         load=load)
    cache.fill(ids, desc="encoding speech (once)")
    return cache


def heldout_for(cfg, model, dataset: Callable[..., Any], rows: dict[str, list[dict]], *, precision: str,
                log: Callable[[str], None], report: dict) -> dict[str, dict[str, Any]]:
    """Stage name -> the cross-fitted readings of every training clip, for the stages ``cfg.heldout`` names (none
    when off): see :func:`~modaltune.shared.compose.heldout.heldout_readings`. Each fold reader trains like the first
    ``loss: grounding`` stage, on the transcription rows of the other folds."""
    used, steps, lr = check_heldout(cfg.heldout, cfg.stages, cfg.projector, cfg.train)
    if not used:
        return {}
    with timed(report, "heldout_seconds"):
        readings = heldout_readings(model, dataset(rows["transcribe"], "transcribe"),
                                    [r["input"] for r in rows["all"]], folds=cfg.heldout.folds, steps=steps, lr=lr,
                                    batch_size=cfg.train.batch_size * cfg.train.grad_accum, seed=cfg.train.seed,
                                    precision=precision, max_grad_norm=cfg.train.max_grad_norm, log=log)
    return dict.fromkeys(used, readings)
