"""ASR data sets, the encoder cache, evaluation passes and charts that the Whisper recipes share.

:func:`load_asr_sets` reads and validates train / validation / test / general-speech clips (the built-in synthetic
dictation set by default); :func:`asr_cache` is the frozen encoder part's :class:`~modaltune.shared.features.
FeatureCache`; :func:`evaluate_asr` decodes the test and general sets once per column (zero-shot, prompt-biased,
fine-tuned) and scores them; :func:`asr_train_set` tokenises transcripts (skipping those over the decoder's length)
and adds augmented views; :func:`wer_plots` draws the before/after WER charts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from modaltune.audio.augment import AugmentConfig, make_views
from modaltune.audio.data import Clip, ClipFilter, builtin_general_set, check_columns, read_manifest, validate
from modaltune.audio.eval import audio_seconds, make_normalizer, score, speaker_wer, transcribe, utterance_rows
from modaltune.audio.features import ASRDataset
from modaltune.audio.io import SAMPLE_RATE
from modaltune.audio.whisper import label_ids
from modaltune.shared.config import ConfigError, doc
from modaltune.shared.errors import DataError
from modaltune.shared.features import CacheConfig, FeatureCache
from modaltune.shared.plots import grouped_bars
from modaltune.shared.io import seeded_split
from modaltune.shared.skips import Skips, add_to_summary
from modaltune.shared.training import autocast_dtype
from modaltune.shared.zoo import home


@dataclasses.dataclass
class ASRDataConfig:
    """Where speech data comes from and how it is checked."""

    source: str = doc("builtin:medical-dictation", "manifest .jsonl/.csv, audiofolder, hf:NAME, or builtin:medical-dictation")
    test: str | None = doc(None, "test manifest (the built-in set brings its own held-out one)")
    general: str | None = doc("builtin:librivox", "general-speech check set (catches forgetting); null: none")
    columns: dict[str, str] = doc({}, "map our fields (audio, text) to your columns")
    hf_split: str = doc("train", "split read from a datasets dataset")
    validation_fraction: float = doc(0.1, "fraction of training clips held out for validation loss")
    split_seed: int = doc(0, "seed of the validation split")
    max_seconds: float = doc(30.0, "clips longer than this (Whisper's window) are skipped or split")
    long_clips: Literal["skip", "split"] = doc("skip", "skip | split (split needs per-row segment timestamps)")
    silence_rms: float = doc(1e-4, "clips quieter than this RMS level count as silence and are skipped")
    min_seconds: float = doc(0.1, "clips shorter than this (a few 20 ms encoder frames) are skipped")
    root_only: bool = doc(False, "skip audio paths that lead outside the manifest's folder (absolute, .., links); "
                                 "turn on for manifests from others")
    max_train_clips: int | None = doc(None, "use at most this many training clips")
    max_eval_clips: int | None = doc(None, "use at most this many test clips")
    max_validation_clips: int | None = doc(None, "use at most this many validation clips")
    synth_train: int = doc(960, "built-in set: training sentences")
    synth_test: int = doc(60, "built-in set: test sentences (held-out phrasings and voices)")
    synth_general: int = doc(120, "built-in set: general-English replay clips added to training (against forgetting)")
    synth_seed: int = doc(0, "built-in set: seed")
    terms: str | None = doc("builtin:medical", "domain term list for term recall and prompt biasing (file: one per line)")

    def validate(self, where: str) -> None:
        if not 0.0 <= self.validation_fraction < 0.5:
            raise ConfigError(f"{where}.validation_fraction must be in [0, 0.5)")
        check_columns(self.columns, where)


def builtin_manifests(d: ASRDataConfig, log=print) -> dict[str, Path]:
    """Build (once) the built-in synthetic dictation set that ``data.synth_*`` describe; its manifests."""
    from modaltune.audio.synth import build_dictation_set

    name = f"medical-dictation-{d.synth_train}-{d.synth_test}-{d.synth_seed}"
    folder = home() / "data" / (name + (f"-g{d.synth_general}" if d.synth_general else ""))
    from modaltune.shared import dist

    built = (folder / "BUILD.json").is_file()
    log(f"the synthetic dictation set in {folder}" if built else f"building the synthetic dictation set in {folder} (once)")
    with dist.local_main_first("building the synthetic dictation set"):  # once per node under a launcher
        return build_dictation_set(folder, n_train=d.synth_train, n_test=d.synth_test, n_general=d.synth_general,
                                   seed=d.synth_seed)


def load_asr_sets(d: ASRDataConfig, log=print, *, need_text: bool = True
                  ) -> tuple[dict[str, list[Clip]], dict[str, dict]]:
    """Validated clips per set (``train``, ``validation``: a seeded share of the training clips, ``test``,
    ``general``) and the report's data counts (with audio minutes). ``need_text=False`` keeps clips that have no
    transcript but another task's answer (audio-llm).

    Raises:
        DataError: a source is missing or unknown, or no training or test clip is usable.
    """
    limits = ClipFilter(d.max_seconds, d.silence_rms, d.long_clips, d.min_seconds, d.root_only)
    skipped = {s: Skips() for s in ("train", "validation", "test", "general")}
    if d.source == "builtin:medical-dictation":
        manifests = builtin_manifests(d, log)
        train_src, test_src = str(manifests["train"]), d.test or str(manifests["test"])
    elif d.source.startswith("builtin:"):
        raise DataError(f"unknown built-in speech set {d.source!r}; known: builtin:medical-dictation")
    else:
        train_src, test_src = d.source, d.test
        if test_src is None:
            raise DataError("data.test is not set: give a held-out test manifest (WER on training clips "
                            "measures memorisation)")
    train = validate(read_manifest(train_src, columns=d.columns, hf_split=d.hf_split), limits, skipped["train"],
                     need_text=need_text)
    test = validate(read_manifest(test_src, columns=d.columns, hf_split="test"), limits, skipped["test"],
                    need_text=need_text)
    general: list[Clip] = []
    if d.general == "builtin:librivox":
        rows = builtin_general_set()
        if not rows:
            log("general-speech set skipped: Debian package pocketsphinx-testdata is not installed")
        general = validate(rows, limits, skipped["general"])
    elif d.general:
        general = validate(read_manifest(d.general, columns=d.columns), limits, skipped["general"])
    if not train:
        raise DataError(f"no usable training clips in {train_src!r}: {dict(skipped['train'])}")
    if not test:
        raise DataError(f"no usable test clips in {test_src!r}: {dict(skipped['test'])}")
    validation, train = seeded_split(train, [int(round(d.validation_fraction * len(train)))], d.split_seed)
    for name, clips, key in (("train", train, "max_train_clips"), ("validation", validation, "max_validation_clips"),
                             ("test", test, "max_eval_clips")):
        cap = getattr(d, key)
        if cap is not None and len(clips) > cap:
            skipped[name].cap(f"{key}={cap}", len(clips) - cap)
            del clips[cap:]
    sets = {"train": train, "validation": validation, "test": test, "general": general}
    counts = {n: {**skipped[n].summary(len(c)), "audio_minutes": round(audio_seconds([x.wave for x in c]) / 60, 2)}
              for n, c in sets.items()}
    return sets, counts


def read_terms(spec: str | None) -> list[str]:
    """The domain term list: ``builtin:medical``, a file with one term per line, or none."""
    if not spec:
        return []
    if spec == "builtin:medical":
        from modaltune.audio.synth import all_terms

        return all_terms()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"term list {spec!r} does not exist (one term per line)")
    return [t.strip() for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]


def cache_depth(model, cache: CacheConfig, spec_augment: bool) -> int | None:
    """Encoder blocks whose output is cached (all of them for a frozen encoder, those below the lowest trained
    block with ``encoder.layers``); None: no cache (off, SpecAugment, or the encoder trains from its input)."""
    if cache.mode != "auto" or spec_augment:
        return None
    return model.cache_depth()


def asr_cache(model, cache: CacheConfig, *, spec_augment: bool, precision: str, batch_size: int,
              caches: dict[str, FeatureCache] | None = None) -> FeatureCache | None:
    """The frozen encoder part's cache (None when nothing can be cached); with ``caches``, one cache per
    fingerprint is shared across passes, so before and after decoding encode each clip once."""
    depth = cache_depth(model, cache, spec_augment)
    if depth is None:
        return None
    made = FeatureCache(model, depth=depth, batch_size=batch_size, autocast_dtype=autocast_dtype(precision),
                        directory=cache.dir)
    return made if caches is None else caches.setdefault(made.fingerprint, made)


def evaluate_asr(model, processor, sets: dict[str, list[Clip]], *, columns: list[tuple[str, Any]], eval_cfg,
                 language: str | None, task: str | None, normalizer, terms: list[str],
                 cache: FeatureCache | None, precision: str) -> tuple[dict[str, dict[str, float]], list[dict]]:
    """Decode ``test`` and ``general`` once per column ``(name, prompt ids)``; returns metrics per column
    (``test/wer``, ``general/wer``, per-speaker WER, ...) and per-utterance rows; decoded under ``precision``, the
    resolved training precision."""
    metrics: dict[str, dict[str, float]] = {name: {} for name, _ in columns}
    rows = []
    for set_name in ("test", "general"):
        clips = sets[set_name]
        if not clips:
            continue
        waves = [c.wave for c in clips]
        secs = audio_seconds(waves)
        hyps = {}
        for name, prompt in columns:
            texts, seconds = transcribe(model, processor, waves, eval_cfg, precision=precision, language=language,
                                        task=task, cache=cache, prompt=prompt, desc=f"{set_name} ({name})")
            hyps[name] = texts
            refs = [c.text for c in clips]
            scores = score(texts, refs, seconds, secs, normalizer=normalizer, terms=terms if set_name == "test" else [])
            scores.update(speaker_wer(texts, refs, [c.speaker for c in clips], normalizer=normalizer))
            for k, v in scores.items():
                metrics[name][f"{set_name}/{k}"] = v
        rows += utterance_rows(set_name, [c.id for c in clips], [c.text for c in clips], hyps, normalizer)
    return metrics, rows


def asr_train_set(clips: list[Clip], processor, *, augment: AugmentConfig | None, cache: FeatureCache | None,
                  max_label_tokens: int | None = None, counts: dict[str, Any] | None = None) -> ASRDataset:
    """Training examples: each clip's transcript labels, plus ``augment.views`` augmented copies of each clip.

    Args:
        max_label_tokens: the decoder's length (``model.config.max_target_positions``, 448 for Whisper); a clip
            whose labels are longer is skipped (reason ``text: over the model's N label tokens``, the item names its
            token count), as the decoder has no position for them. None: no check.
        counts: the split's entry of the report's data table (:func:`load_asr_sets`); those skips are added to it.

    Raises:
        DataError: a transcript is over ``max_label_tokens`` and there is no ``counts`` to count it in.
    """
    waves, labels, replay, names, kept = [], [], [], [], []
    skipped = Skips()
    for clip in clips:
        ids = label_ids(processor, clip.text)
        if max_label_tokens is not None and len(ids) > max_label_tokens:
            reason = f"text: over the model's {max_label_tokens} label tokens"
            if counts is None:
                raise DataError(f"{clip.id}: {reason} ({len(ids):,} tokens); shorten the transcript or split the "
                                "clip with segment timestamps (data.long_clips: split)")
            skipped.add(reason, f"{clip.id}: {len(ids):,} tokens")
            continue
        kept.append(clip)
        waves.append(clip.wave)
        labels.append(ids)
        replay.append(clip.replay)
        names.append(clip.id)
        if augment is not None and augment.views > 0:
            for k, view in enumerate(make_views(clip.wave, SAMPLE_RATE, augment, clip.id), 1):
                waves.append(view)
                labels.append(ids)
                replay.append(clip.replay)
                names.append(f"{clip.id} (augmented view {k})")
    if counts is not None and skipped:
        add_to_summary(counts, skipped, len(kept))
        counts["audio_minutes"] = round(audio_seconds([c.wave for c in kept]) / 60, 2)
    return ASRDataset(waves, labels, processor, cache=cache, replay=replay if any(replay) else None, names=names)


def normalizer_for(kind: str, source: dict[str, Any], language: str | None):
    """``(name, function)`` of the WER normaliser for a loaded model (English models: Whisper's English one)."""
    return make_normalizer(kind, english=not source["multilingual"] or (language or "").lower() in {"en", "english"})


WER_COLUMNS = {"before": "zero-shot", "prompted": "prompt-biased", "after": "fine-tuned"}


def wer_plots(run_dir: Path, metrics: dict) -> list[dict]:
    """The WER chart by set and condition, and per speaker when the test set has several speakers."""
    sets = [s for s in ("test", "general") if f"{s}/wer" in metrics.get("after", {})]
    names = {"test": "domain test (held-out phrasings, voices)", "general": "general speech (LibriVox)"}
    common = {"legend": WER_COLUMNS, "ylabel": "WER (normalised)"}
    plots = [{"title": "WER by set and condition",
              "path": str(grouped_bars(run_dir / "wer.png", metrics, [f"{s}/wer" for s in sets],
                                       labels=[names[s] for s in sets], title="Word error rate", **common))}]
    speakers = sorted(k for k in metrics.get("after", {}) if k.startswith("test/wer@"))
    if speakers:
        path = grouped_bars(run_dir / "wer_by_speaker.png", metrics, speakers,
                            labels=[k.split("@", 1)[1] for k in speakers], title="Domain test WER by speaker",
                            rotate=True, **common)
        plots.append({"title": "Domain test WER by speaker (voices never heard in training)", "path": str(path)})
    return plots
