"""domain-asr: Whisper fine-tuning for domain speech, with zero-shot / prompt-biased / fine-tuned WER side by side.

Build Whisper and apply per-component methods, build and validate data (synthetic medical dictation by default,
plus real LibriVox speech as a general-speech check), cache frozen-encoder states, evaluate zero-shot and
prompt-biased, train the decoder, evaluate again, report.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from modaltune.audio.asr import (ASRDataConfig, asr_cache, asr_train_set, cache_depth, evaluate_asr,
                                 load_asr_sets, normalizer_for, read_terms, wer_plots)
from modaltune.audio.augment import AugmentConfig
from modaltune.audio.eval import ASREvalConfig, prompt_ids, transcribe
from modaltune.audio.io import read_recording
from modaltune.audio.features import ASRCollator
from modaltune.audio.whisper import WhisperModelConfig, build_whisper, whisper_components
from modaltune.shared import checkpoint as ckpt
from modaltune.shared import dist
from modaltune.shared.config import ConfigError, doc, to_dict
from modaltune.shared.errors import ModaltuneError
from modaltune.shared.features import CacheConfig
from modaltune.shared.harness import data_line, measure_before, metric_line, pair_items, timed
from modaltune.shared.merge import merged
from modaltune.shared.peft import ComponentConfig, method_of
from modaltune.shared.recipe import Recipe, RunContext, register_recipe
from modaltune.shared.training import StagePlan, TrainConfig, compute_dtype, resolve_precision, run_stages


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
    eval: ASREvalConfig = doc(help="decoding and scoring", factory=lambda: ASREvalConfig(max_new_tokens=128))
    quick: dict[str, Any] = doc({}, "dotted-key overrides applied by --quick")

    def validate(self, where: str) -> None:
        decoder = method_of(self.decoder)  # the KL term needs adapters it can switch off
        if self.replay.kl_weight > 0 and (decoder.adapter_kind is None or decoder.virtual_tokens):
            raise ConfigError(f"replay.kl_weight={self.replay.kl_weight} needs an adapter method on the decoder "
                              f"(lora, dora, qlora, lora8bit, ia3), not {self.decoder.method}: the KL term compares "
                              "with the decoder's adapters switched off; set replay.kl_weight=0")


class DomainASR(Recipe):
    """Whisper with per-component methods (frozen encoder + decoder LoRA by default) on domain speech."""

    name = "domain-asr"
    regression_margins = {"test/wer": 0.02}  # worse than before by more than this: status "regressed"
    description = "Whisper fine-tuning for domain speech (frozen encoder + decoder LoRA by default); WER/CER reports"
    config_cls = DomainASRConfig
    config_file = "domain-asr.yaml"

    def build_model(self, cfg: DomainASRConfig, log=print):
        model, processor, source = build_whisper(
            cfg.model, {"encoder": cfg.encoder, "decoder": cfg.decoder},
            compute_dtype=compute_dtype(resolve_precision(cfg.train.precision)), log_fn=log)
        model.replay_kl_weight = cfg.replay.kl_weight
        if cfg.train.gradient_checkpointing:
            model.activation_checkpointing_enable()
        return model, processor, source

    def generate(self, cfg: DomainASRConfig, checkpoint: Path, prompts: list[str], input_file, log) -> list[str]:
        if prompts:
            raise ModaltuneError("domain-asr transcribes a recording and takes no prompt: give only --input AUDIO")
        wave = read_recording(input_file)
        model, processor, source = self.build_model(cfg, log)
        ckpt.load_trained(model, checkpoint)
        multilingual = source["multilingual"]
        texts, _ = transcribe(model, processor, [wave], cfg.eval, precision=resolve_precision(cfg.train.precision),
                              language=cfg.model.language if multilingual
                              else None, task=cfg.model.task if multilingual else None, desc="transcribing")
        return texts

    def evaluator(self, cfg: DomainASRConfig, model, processor, sets, source):
        """``measure(columns) -> (metrics per column, rows)`` over the test and general sets, one shared cache."""
        multilingual = source["multilingual"]
        norm_name, norm = normalizer_for(cfg.eval.normalizer, source, cfg.model.language)
        caches: dict = {}
        terms = read_terms(cfg.data.terms)

        def measure(columns):
            cache = asr_cache(model, cfg.cache, spec_augment=cfg.model.spec_augment, batch_size=cfg.eval.batch_size,
                              precision=resolve_precision(cfg.train.precision), caches=caches)
            return dist.on_main(lambda: evaluate_asr(  # rank 0 evaluates under a launcher; every rank gets it
                model, processor, sets, columns=columns, eval_cfg=cfg.eval, normalizer=norm,
                language=cfg.model.language if multilingual else None, terms=terms, cache=cache,
                task=cfg.model.task if multilingual else None, precision=resolve_precision(cfg.train.precision)))
        return measure, norm_name

    def run(self, cfg: DomainASRConfig, ctx: RunContext) -> None:
        report, log = ctx.report, ctx.log
        precision = resolve_precision(cfg.train.precision)
        with timed(report, "setup_seconds"):
            model, processor, source = self.build_model(cfg, log)
            depth = cache_depth(model, cfg.cache, cfg.model.spec_augment)
            report["model"] = {**source, "precision": precision, "encoder": cfg.encoder.method,
                               "decoder": cfg.decoder.method, "encoder_cache": depth is not None,
                               "encoder_cache_depth": depth}
            report["parameters"] = model.parameter_report()
            sets, report["data"] = load_asr_sets(cfg.data, log)
        log(data_line(report["data"]))
        measure, norm_name = self.evaluator(cfg, model, processor, sets, source)
        columns = [("zero_shot", None)]
        bias = prompt_ids(processor, read_terms(cfg.data.terms), cfg.eval.prompt_terms)
        if bias is not None:
            columns.append(("prompted", bias))
        with timed(report, "eval_before_seconds"):
            before, rows_before = measure_before(ctx.run_dir, cfg.train.resume, lambda: measure(columns))
        log("zero-shot: " + _line(before["zero_shot"]))

        def train_cache():  # a cache per set, as each set's clips are encoded once
            return asr_cache(model, cfg.cache, spec_augment=cfg.model.spec_augment, precision=precision,
                             batch_size=cfg.train.eval_batch_size)

        with timed(report, "encoder_cache_seconds"):
            longest = model.config.max_target_positions  # transcripts past the decoder's length are counted skips
            train_ds = asr_train_set(sets["train"], processor, augment=cfg.augment, cache=train_cache(),
                                     max_label_tokens=longest, counts=report["data"]["train"])
            val_ds = asr_train_set(sets["validation"], processor, augment=None, cache=train_cache(),
                                   max_label_tokens=longest, counts=report["data"]["validation"]) \
                if sets["validation"] else None
        report["data"]["train"].update(examples_with_views=len(train_ds),
                                       replay_clips=sum(c.replay for c in sets["train"]))
        with timed(report, "train_seconds"):
            result = run_stages(
                model, [StagePlan("asr", train_ds, val_ds)], cfg.train, run_dir=ctx.run_dir, collator=ASRCollator(),
                component_lrs={n: c.lr for n, c in (("encoder", cfg.encoder), ("decoder", cfg.decoder)) if c.lr},
                checkpoint_meta={"recipe": self.name, "config": to_dict(cfg), "model_source": source}, log=log)
            processor.save_pretrained(str(result.checkpoint / "processor"))
            ckpt.write_marker(result.checkpoint)  # the marker lists the processor's files too
        report["training"] = {"stages": result.stages, "curve": result.rows}
        report["checkpoint"] = str(result.checkpoint)
        with timed(report, "eval_after_seconds"):
            after, rows_after = measure([("fine_tuned", None)])
        log("fine-tuned: " + _line(after["fine_tuned"]))
        report["metrics"] = {"before": before["zero_shot"], "prompted": before.get("prompted", {}),
                             "after": after["fine_tuned"]}
        if not report["metrics"]["prompted"]:
            report["metrics"].pop("prompted")
        report["items"] = _pair(rows_before, rows_after)
        report["notes"] = [
            f"WER/CER use the {norm_name} normaliser; *_raw keys are on unnormalised text.",
            "before = zero-shot; prompted = zero-shot with domain terms as Whisper prompt_ids; after = fine-tuned.",
            f"RTF counts features, encoder and decoding seconds over audio seconds on this machine ({precision}).",
        ]
        report["plots"] = wer_plots(ctx.run_dir, report["metrics"])

    def evaluate(self, cfg: DomainASRConfig, checkpoint: Path, ctx: RunContext) -> None:
        report, log = ctx.report, ctx.log
        model, processor, source = self.build_model(cfg, log)
        report["model"] = {**source, "precision": resolve_precision(cfg.train.precision)}
        sets, report["data"] = load_asr_sets(cfg.data, log)
        measure, _ = self.evaluator(cfg, model, processor, sets, source)
        with timed(report, "eval_seconds"):
            before, rows_before = measure([("zero_shot", None)])
            ckpt.load_trained(model, checkpoint)
            after, rows_after = measure([("fine_tuned", None)])
        report["metrics"] = {"before": before["zero_shot"], "after": after["fine_tuned"]}
        report["items"] = _pair(rows_before, rows_after)
        report["plots"] = wer_plots(ctx.run_dir, report["metrics"])
        log("fine-tuned: " + _line(after["fine_tuned"]))

    def save_merged(self, cfg: DomainASRConfig, model, processor, out: Path, log, dtype=None, meta=None) -> Path:
        merged(model.whisper, dtype).save_pretrained(str(out))
        processor.save_pretrained(str(out))
        return out


def _pair(before: list[dict], after: list[dict]) -> list[dict]:
    """One row per utterance: zero-shot (and prompt-biased) beside the fine-tuned transcript, worst first."""
    def extra(found: dict[str, dict]) -> dict:
        b, a = found["before"], found["after"]
        out = {col: b[col] for col in ("zero_shot", "prompted") if col in b}
        out.update({"fine_tuned": a["fine_tuned"], "wer_before": b.get("wer"), "wer": a["wer"], "sub": a["sub"],
                    "del": a["del"], "ins": a["ins"], "errors": a["errors"]})
        return out

    return pair_items({"before": before, "after": after}, key=("set", "id"), keep=("reference",), value=None,
                      extra=extra, sort=lambda r: -r["wer"])


def _line(metrics: dict) -> str:
    return metric_line(metrics, keys=lambda k: k.endswith(("/wer", "term_recall", "rtf")))


register_recipe(DomainASR())
