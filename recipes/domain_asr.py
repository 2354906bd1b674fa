"""domain-asr: Whisper fine-tuning for domain speech, with zero-shot / prompt-biased / fine-tuned WER side by side.

Build Whisper and apply per-component methods, build and validate data (synthetic medical dictation by default,
plus real LibriVox speech as a general-speech check), cache frozen-encoder states, evaluate zero-shot and
prompt-biased, train the decoder, evaluate again, report.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Any

import torch

from modaltune.audio.augment import AugmentConfig, make_views
from modaltune.audio.data import Clip, ClipFilter, builtin_general_set, check_columns, read_manifest, validate
from modaltune.audio.eval import (
    ASREvalConfig,
    audio_seconds,
    make_normalizer,
    prompt_ids,
    score,
    speaker_wer,
    transcribe,
    utterance_rows,
)
from modaltune.audio.features import ASRCollator, ASRDataset, EncoderCache
from modaltune.audio.io import SAMPLE_RATE
from modaltune.audio.whisper import WhisperModelConfig, build_whisper, label_ids, whisper_components
from modaltune.shared import checkpoint as ckpt
from modaltune.shared.config import ConfigError, doc, to_dict
from modaltune.shared.errors import DataError
from modaltune.shared.peft import LORA_FAMILY, QUANTISED, ComponentConfig
from modaltune.shared.recipe import Recipe, RunContext, register_recipe
from modaltune.shared.skips import Skips
from modaltune.shared.training import StagePlan, TrainConfig, resolve_precision, run_stages
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
    long_clips: str = doc("skip", "skip | split (split needs per-row segment timestamps)")
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
        if self.long_clips not in {"skip", "split"}:
            raise ConfigError(f"{where}.long_clips must be skip or split")
        if not 0.0 <= self.validation_fraction < 0.5:
            raise ConfigError(f"{where}.validation_fraction must be in [0, 0.5)")
        check_columns(self.columns, where)


@dataclasses.dataclass
class CacheConfig:
    """The frozen-encoder cache."""

    mode: str = doc("auto", "auto: on whenever the encoder is frozen and SpecAugment is off | off")
    dir: str | None = doc(None, "also keep encoder states on disk here (keyed by audio content and encoder weights)")

    def validate(self, where: str) -> None:
        if self.mode not in {"auto", "off"}:
            raise ConfigError(f"{where}.mode must be auto or off")


@dataclasses.dataclass
class ReplayConfig:
    """What training does with replay rows (manifest ``replay: true``; the built-in general-English clips)."""

    kl_weight: float = doc(0.0, "> 0: also keep their next-token distributions close to the zero-shot model's (KL)")

    def validate(self, where: str) -> None:
        if not 0.0 <= self.kl_weight <= 100.0:
            raise ConfigError(f"{where}.kl_weight must be in [0, 100], got {self.kl_weight}")


@dataclasses.dataclass
class DomainASRConfig:
    """Schema of ``recipes/configs/domain-asr.yaml``."""

    model: WhisperModelConfig = doc(WhisperModelConfig, "the Whisper model")
    encoder: ComponentConfig = doc(help="how the encoder is tuned", factory=lambda: whisper_components()["encoder"])
    decoder: ComponentConfig = doc(help="how the decoder is tuned", factory=lambda: whisper_components()["decoder"])
    data: ASRDataConfig = doc(ASRDataConfig, "speech data")
    augment: AugmentConfig = doc(AugmentConfig, "augmented views of training clips")
    replay: ReplayConfig = doc(ReplayConfig, "replay rows (general speech) against forgetting")
    cache: CacheConfig = doc(CacheConfig, "frozen-encoder cache")
    train: TrainConfig = doc(TrainConfig, "optimisation")
    eval: ASREvalConfig = doc(ASREvalConfig, "decoding and scoring")
    quick: dict[str, Any] = doc({}, "dotted-key overrides applied by --quick")

    def validate(self, where: str) -> None:
        if self.replay.kl_weight > 0 and self.decoder.method not in LORA_FAMILY | {"ia3"}:
            raise ConfigError(f"replay.kl_weight={self.replay.kl_weight} needs an adapter method on the decoder "
                              f"(lora, dora, qlora, lora8bit, ia3), not {self.decoder.method}: the KL term compares "
                              "with the decoder's adapters switched off; set replay.kl_weight=0")


class DomainASR(Recipe):
    name = "domain-asr"
    description = "Whisper fine-tuning for domain speech (frozen encoder + decoder LoRA by default); WER/CER reports"
    config_cls = DomainASRConfig
    config_file = "domain-asr.yaml"

    # -- building blocks -----------------------------------------------------------------------------------
    def build(self, cfg: DomainASRConfig, log=print, *, encoder=None, decoder=None):
        precision = resolve_precision(cfg.train.precision)
        compute = torch.bfloat16 if precision == "bf16" else torch.float32
        model, processor, source = build_whisper(
            cfg.model, {"encoder": encoder or cfg.encoder, "decoder": decoder or cfg.decoder},
            compute_dtype=compute, log_fn=log)
        model.replay_kl_weight = cfg.replay.kl_weight
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model, processor, source, precision

    def autocast_dtype(self, cfg: DomainASRConfig) -> torch.dtype | None:
        """Encoder states are computed at the training precision (bf16 autocast where it is fast)."""
        return torch.bfloat16 if resolve_precision(cfg.train.precision) == "bf16" else None

    def cache_depth(self, cfg: DomainASRConfig, model) -> int | None:
        """Encoder blocks whose output is cached (all of them for a frozen encoder, those below the lowest trained
        block with ``encoder.layers``); None: no cache (off, SpecAugment, or the encoder trains from its input)."""
        if cfg.cache.mode != "auto" or cfg.model.spec_augment:
            return None
        return model.cache_depth

    def make_cache(self, cfg: DomainASRConfig, model, processor, batch_size: int) -> EncoderCache | None:
        depth = self.cache_depth(cfg, model)
        if depth is None:
            return None
        return EncoderCache(model, processor, directory=cfg.cache.dir, batch_size=batch_size,
                            autocast_dtype=self.autocast_dtype(cfg), depth=depth)

    def builtin_manifests(self, cfg: DomainASRConfig, log=print) -> dict[str, Path]:
        """Build (once) the built-in synthetic dictation set that ``data.synth_*`` describe; its manifests."""
        from modaltune.audio.synth import build_dictation_set

        d = cfg.data
        name = f"medical-dictation-{d.synth_train}-{d.synth_test}-{d.synth_seed}"
        folder = home() / "data" / (name + (f"-g{d.synth_general}" if d.synth_general else ""))
        log(f"building the synthetic dictation set in {folder} (once)")
        return build_dictation_set(folder, n_train=d.synth_train, n_test=d.synth_test, n_general=d.synth_general,
                                   seed=d.synth_seed)

    def load_data(self, cfg: DomainASRConfig, log) -> tuple[dict[str, list[Clip]], dict]:
        d = cfg.data
        limits = ClipFilter(d.max_seconds, d.silence_rms, d.long_clips, d.min_seconds, d.root_only)
        skipped = {s: Skips() for s in ("train", "validation", "test", "general")}
        if d.source == "builtin:medical-dictation":
            manifests = self.builtin_manifests(cfg, log)
            train_src, test_src = str(manifests["train"]), d.test or str(manifests["test"])
        elif d.source.startswith("builtin:"):
            raise DataError(f"unknown built-in speech set {d.source!r}; known: builtin:medical-dictation")
        else:
            train_src, test_src = d.source, d.test
            if test_src is None:
                raise DataError("data.test is not set: give a held-out test manifest (WER on training clips "
                                "measures memorisation)")
        train = validate(read_manifest(train_src, columns=d.columns, hf_split=d.hf_split), limits, skipped["train"])
        test = validate(read_manifest(test_src, columns=d.columns, hf_split="test"), limits, skipped["test"])
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
        rng = random.Random(d.split_seed)
        order = list(range(len(train)))
        rng.shuffle(order)
        n_val = int(round(d.validation_fraction * len(train)))
        validation = [train[i] for i in order[:n_val]]
        train = [train[i] for i in order[n_val:]]
        for name, clips, key in (("train", train, "max_train_clips"), ("validation", validation, "max_validation_clips"),
                                 ("test", test, "max_eval_clips")):
            cap = getattr(d, key)
            if cap is not None and len(clips) > cap:
                skipped[name][f"over {key}={cap}"] += len(clips) - cap
                del clips[cap:]
        sets = {"train": train, "validation": validation, "test": test, "general": general}
        counts = {n: {**skipped[n].summary(len(c)), "audio_minutes": round(audio_seconds([x.wave for x in c]) / 60, 2)}
                  for n, c in sets.items()}
        return sets, counts

    def terms(self, cfg: DomainASRConfig) -> list[str]:
        if not cfg.data.terms:
            return []
        if cfg.data.terms == "builtin:medical":
            from modaltune.audio.synth import all_terms

            return all_terms()
        path = Path(cfg.data.terms).expanduser()
        if not path.is_file():
            raise DataError(f"term list {cfg.data.terms!r} does not exist (one term per line)")
        return [t.strip() for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]

    def evaluate_sets(self, cfg, model, processor, sets, source, *, columns: list[tuple[str, Any]], caches, log):
        """Decode ``test`` and ``general`` once per column (name, prompt); returns metrics per column and rows."""
        language = cfg.model.language if source["multilingual"] else None
        task = cfg.model.task if source["multilingual"] else None
        norm_name, norm = make_normalizer(cfg.eval.normalizer, english=not source["multilingual"] or
                                          (cfg.model.language or "").lower() in {"en", "english"})
        terms = self.terms(cfg)
        cache = self.make_cache(cfg, model, processor, cfg.eval.batch_size)
        if cache is not None:  # the states of the frozen part are computed once for the before and after passes
            cache = caches.setdefault(cache.fingerprint, cache)
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
                texts, seconds = transcribe(model, processor, waves, cfg.eval, language=language, task=task,
                                            cache=cache, prompt=prompt, desc=f"{set_name} ({name})")
                hyps[name] = texts
                refs = [c.text for c in clips]
                scores = score(texts, refs, seconds, secs, normalizer=norm, terms=terms if set_name == "test" else [])
                scores.update(speaker_wer(texts, refs, [c.speaker for c in clips], normalizer=norm))
                for k, v in scores.items():
                    metrics[name][f"{set_name}/{k}"] = v
            rows += [r for r in utterance_rows(set_name, [c.id for c in clips], [c.text for c in clips], hyps, norm)]
        return metrics, rows, norm_name

    def train_set(self, cfg, clips: list[Clip], processor, model, *, views: bool, log) -> ASRDataset:
        waves, labels, replay = [], [], []
        for clip in clips:
            ids = label_ids(processor, clip.text)
            waves.append(clip.wave)
            labels.append(ids)
            replay.append(clip.replay)
            if views and cfg.augment.views > 0:
                for view in make_views(clip.wave, SAMPLE_RATE, cfg.augment, clip.id):
                    waves.append(view)
                    labels.append(ids)
                    replay.append(clip.replay)
        cache = self.make_cache(cfg, model, processor, cfg.train.eval_batch_size)
        return ASRDataset(waves, labels, processor, cache=cache, replay=replay if any(replay) else None)

    # -- commands -----------------------------------------------------------------------------------------
    def run(self, cfg: DomainASRConfig, ctx: RunContext) -> None:
        report, log = ctx.report, ctx.log
        t0 = time.time()
        model, processor, source, precision = self.build(cfg, log)
        report["model"] = {**source, "precision": precision, "encoder": cfg.encoder.method,
                           "decoder": cfg.decoder.method, "encoder_cache": self.cache_depth(cfg, model) is not None,
                           "encoder_cache_depth": self.cache_depth(cfg, model)}
        report["parameters"] = model.parameter_report()
        sets, report["data"] = self.load_data(cfg, log)
        log("data: " + ", ".join(f"{k} {v['kept']} kept / {v['skipped']} skipped" for k, v in report["data"].items()))
        report["timing"] = {"setup_seconds": round(time.time() - t0, 2)}

        t1 = time.time()
        caches: dict[str, EncoderCache] = {}
        columns = [("zero_shot", None)]
        bias = prompt_ids(processor, self.terms(cfg), cfg.eval.prompt_terms)
        if bias is not None:
            columns.append(("prompted", bias))
        before, rows_before, norm_name = self.evaluate_sets(cfg, model, processor, sets, source, columns=columns,
                                                            caches=caches, log=log)
        report["timing"]["eval_before_seconds"] = round(time.time() - t1, 2)
        log("zero-shot: " + _line(before["zero_shot"]))

        t2 = time.time()
        train_ds = self.train_set(cfg, sets["train"], processor, model, views=True, log=log)
        val_ds = self.train_set(cfg, sets["validation"], processor, model, views=False, log=log) if sets["validation"] else None
        report["timing"]["encoder_cache_seconds"] = round(time.time() - t2, 2)
        report["data"]["train"]["examples_with_views"] = len(train_ds)
        report["data"]["train"]["replay_clips"] = sum(c.replay for c in sets["train"])
        t3 = time.time()
        result = run_stages(
            model, [StagePlan("asr", train_ds, val_ds)], cfg.train, run_dir=ctx.run_dir, collator=ASRCollator(),
            component_lrs={n: c.lr for n, c in (("encoder", cfg.encoder), ("decoder", cfg.decoder)) if c.lr},
            checkpoint_meta={"recipe": self.name, "config": to_dict(cfg), "model_source": source}, log=ctx.log,
        )
        processor.save_pretrained(str(result.checkpoint / "processor"))
        ckpt.write_marker(result.checkpoint)  # the marker lists the processor's files too
        report["timing"]["train_seconds"] = round(time.time() - t3, 2)
        report["training"] = {"stages": result.stages, "curve": result.rows}
        report["checkpoint"] = str(result.checkpoint)

        t4 = time.time()
        after, rows_after, _ = self.evaluate_sets(cfg, model, processor, sets, source,
                                                  columns=[("fine_tuned", None)], caches=caches, log=log)
        report["timing"]["eval_after_seconds"] = round(time.time() - t4, 2)
        log("fine-tuned: " + _line(after["fine_tuned"]))
        report["metrics"] = {"before": before["zero_shot"], "prompted": before.get("prompted", {}),
                             "after": after["fine_tuned"]}
        if not report["metrics"]["prompted"]:
            report["metrics"].pop("prompted")
        report["items"] = _merge_rows(rows_before, rows_after)
        report["notes"] = [
            f"WER/CER use the {norm_name} normaliser; *_raw keys are on unnormalised text.",
            "before = zero-shot; prompted = zero-shot with domain terms as Whisper prompt_ids; after = fine-tuned.",
            f"RTF counts features, encoder and decoding seconds over audio seconds on this machine ({precision}).",
        ]
        report["plots"] = _plots(ctx.run_dir, report["metrics"])

    def evaluate(self, cfg: DomainASRConfig, checkpoint: Path, ctx: RunContext) -> None:
        report, log = ctx.report, ctx.log
        model, processor, source, precision = self.build(cfg, log)
        report["model"] = {**source, "precision": precision}
        sets, report["data"] = self.load_data(cfg, log)
        caches: dict[str, EncoderCache] = {}
        t0 = time.time()
        before, rows_before, _ = self.evaluate_sets(cfg, model, processor, sets, source,
                                                    columns=[("zero_shot", None)], caches=caches, log=log)
        ckpt.load_trained(model, checkpoint)
        after, rows_after, _ = self.evaluate_sets(cfg, model, processor, sets, source,
                                                  columns=[("fine_tuned", None)], caches=caches, log=log)
        report["metrics"] = {"before": before["zero_shot"], "after": after["fine_tuned"]}
        report["timing"] = {"eval_seconds": round(time.time() - t0, 2)}
        report["items"] = _merge_rows(rows_before, rows_after)
        report["plots"] = _plots(ctx.run_dir, report["metrics"])
        log("fine-tuned: " + _line(after["fine_tuned"]))

    def merge(self, cfg: DomainASRConfig, checkpoint: Path, out: Path, log) -> list[tuple[str, Path]]:
        enc = dataclasses.replace(cfg.encoder, method="lora") if cfg.encoder.method in QUANTISED else cfg.encoder
        dec = dataclasses.replace(cfg.decoder, method="lora") if cfg.decoder.method in QUANTISED else cfg.decoder
        fp32 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="fp32", gradient_checkpointing=False))
        model, processor, source, _ = self.build(fp32, log, encoder=enc, decoder=dec)
        ckpt.load_trained(model, checkpoint)
        whisper = model.whisper
        if hasattr(whisper, "merge_and_unload"):
            whisper = whisper.merge_and_unload()
        whisper.save_pretrained(str(out))
        processor.save_pretrained(str(out))
        log(f"merged {checkpoint} into {out}")
        return [(source["path"], out)]


def _merge_rows(before: list[dict], after: list[dict]) -> list[dict]:
    by_key = {(r["set"], r["id"]): r for r in before}
    rows = []
    for r in after:
        b = by_key.get((r["set"], r["id"]), {})
        row = {"set": r["set"], "id": r["id"], "reference": r["reference"]}
        for col in ("zero_shot", "prompted"):
            if col in b:
                row[col] = b[col]
        row.update({"fine_tuned": r["fine_tuned"], "wer_before": b.get("wer"), "wer": r["wer"],
                    "sub": r["sub"], "del": r["del"], "ins": r["ins"], "errors": r["errors"]})
        rows.append(row)
    rows.sort(key=lambda x: -x["wer"])
    return rows


def _plots(run_dir: Path, metrics: dict) -> list[dict]:
    """The WER chart by set and condition, and per speaker when the test set has several speakers."""
    sets = [s for s in ("test", "general") if f"{s}/wer" in metrics.get("after", {})]
    names = {"test": "domain test (held-out phrasings, voices)", "general": "general speech (LibriVox)"}
    plots = [{"title": "WER by set and condition",
              "path": str(_wer_bars(run_dir / "wer.png", metrics, [f"{s}/wer" for s in sets],
                                    [names[s] for s in sets], "Word error rate"))}]
    speakers = sorted(k for k in metrics.get("after", {}) if k.startswith("test/wer@"))
    if speakers:
        path = _wer_bars(run_dir / "wer_by_speaker.png", metrics, speakers, [k.split("@", 1)[1] for k in speakers],
                         "Domain test WER by speaker", rotate=True)
        plots.append({"title": "Domain test WER by speaker (voices never heard in training)", "path": str(path)})
    return plots


def _wer_bars(path: Path, metrics: dict, keys: list[str], labels: list[str], title: str, *,
              rotate: bool = False) -> Path:
    """Grouped bars: one group per metric key, one bar per condition (zero-shot, prompt-biased, fine-tuned)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in ("before", "prompted", "after") if c in metrics]
    legend = {"before": "zero-shot", "prompted": "prompt-biased", "after": "fine-tuned"}
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(keys)), 3.6))
    width = 0.8 / max(len(cols), 1)
    for j, col in enumerate(cols):
        vals = [metrics[col].get(k, float("nan")) for k in keys]
        bars = ax.bar([i + j * width for i in range(len(keys))], vals, width, label=legend[col])
        ax.bar_label(bars, fmt="%.2f", fontsize=7 if rotate else 8)
    ax.set_xticks([i + width * (len(cols) - 1) / 2 for i in range(len(keys))], labels,
                  **({"rotation": 20, "ha": "right", "fontsize": 8} if rotate else {}))
    ax.set_ylabel("WER (normalised)")
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _line(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in sorted(metrics.items()) if k.endswith(("/wer", "term_recall", "rtf")))


register_recipe(DomainASR())
