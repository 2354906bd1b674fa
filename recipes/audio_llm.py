"""audio-llm: a speech LLM composed from Whisper's encoder, a projector and a LoRA LLM, trained in two stages.

Build the encoder (frozen, cached, frames trimmed to each clip), the projector and the LLM; build task rows
(transcription, medication orders as JSON, a manifest's tasks); measure the cascade and the untrained model; train
the projector alone on transcription, then projector and LoRA on the task mix (shown held-out readings); evaluate
after each stage, the last time also with the audio shuffled across the test set; report.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from modaltune.audio.asr import ASRDataConfig, load_asr_sets, normalizer_for
from modaltune.audio.io import read_recording
from modaltune.audio.cascade import CascadeConfig, cascade
from modaltune.audio.speech_llm import heldout_for, reading_scores, speech_cache
from modaltune.audio.task_eval import REPORT_NOTES, AudioLLMEvalConfig, measure_audio_llm, pair_task_items, task_line, task_plots
from modaltune.audio.tasks import AUDIO_PLACEHOLDER, AUDIO_TEMPLATE, AudioTasksConfig, task_rows
from modaltune.shared import checkpoint as ckpt
from modaltune.shared import dist
from modaltune.shared.compose import (EncoderConfig, HeldoutConfig, ProjectorConfig, anchor_on_text, build_composed_lm,
                                      check_heldout, check_stage_losses, composed_report, save_merged)
from modaltune.shared.compose_data import ComposedCollator, ComposedDataset, generate_about, stage_collator
from modaltune.shared.config import ConfigError, doc, to_dict
from modaltune.shared.features import CacheConfig
from modaltune.shared.harness import data_line, measure_before, timed
from modaltune.shared.lm import ModelConfig
from modaltune.shared.peft import ComponentConfig
from modaltune.shared.recipe import Recipe, RunContext, register_recipe
from modaltune.shared.skips import Skips
from modaltune.shared.training import (StageConfig, StagePlan, TrainConfig, autocast_dtype, compute_dtype,
                                       resolve_precision, run_stages)


@dataclasses.dataclass
class AudioLLMConfig:
    """Schema of ``recipes/configs/audio-llm.yaml``."""

    encoder: EncoderConfig = doc(help="the speech encoder", factory=lambda: EncoderConfig(kind="whisper",
                                                                                           name="whisper-tiny.en"))
    encoder_tuning: ComponentConfig = doc(help="how the encoder is tuned (frozen: states cached once)",
                                          factory=lambda: ComponentConfig(method="frozen", targets=["q_proj", "v_proj"]))
    projector: ProjectorConfig = doc(help="projector and frame stacking",
                                     factory=lambda: ProjectorConfig(kind="swiglu", group=8, norm="words",
                                                                     anchor_words=2048, word_grounding=1.0,
                                                                     grounding="ctc", collapse=True))
    model: ModelConfig = doc(ModelConfig, "the causal LLM")
    llm: ComponentConfig = doc(help="how the LLM is tuned", factory=lambda: ComponentConfig(method="lora"))
    data: ASRDataConfig = doc(ASRDataConfig, "speech data (the domain-asr builder and checks)")
    tasks: AudioTasksConfig = doc(AudioTasksConfig, "tasks and prompt phrasings")
    stages: list[StageConfig] = doc(help="training stages in order", factory=lambda: [
        StageConfig(name="words", data="transcribe", loss="grounding", max_steps=600, lr=5e-3,
                    components=["projector"]),
        StageConfig(name="tasks", data="all", max_steps=250, components=["projector", "llm"])])
    heldout: HeldoutConfig = doc(help="cross-fitting: the LLM learns from unheard clips' readings", factory=lambda: HeldoutConfig(folds=2))
    train: TrainConfig = doc(TrainConfig, "optimisation (shared by the stages)")
    eval: AudioLLMEvalConfig = doc(help="generation for evaluation", factory=lambda: AudioLLMEvalConfig(max_new_tokens=64, batch_size=64, no_repeat_ngram=6))
    cascade: CascadeConfig = doc(CascadeConfig, "the cascade baseline (Whisper transcript -> tuned LLM)")
    cache: CacheConfig = doc(CacheConfig, "encoder-feature cache")
    max_length: int = doc(192, "longer rows (audio tokens excluded) are skipped and counted")
    quick: dict[str, Any] = doc({}, "dotted-key overrides applied by --quick")

    def validate(self, where: str) -> None:
        if self.encoder.kind != "whisper":
            raise ConfigError(f"{where}.encoder.kind must be whisper (a speech encoder), got {self.encoder.kind!r}")
        if bad := [f"stages[{i}].data={s.data!r}" for i, s in enumerate(self.stages) if s.data not in {"transcribe", "all"}]:
            raise ConfigError(f"{bad[0]}: must be transcribe or all")
        check_stage_losses(self.stages, self.projector)
        check_heldout(self.heldout, self.stages, self.projector, self.train)
        if self.llm.trains and not any(s.components is None or "llm" in s.components for s in self.stages):
            raise ConfigError("llm.method trains, but no stage trains the llm: add llm to a stage's components")


class AudioLLM(Recipe):
    """Frozen Whisper encoder -> stacked frames -> projector -> LoRA LLM; transcription, then a task mix."""

    name = "audio-llm"
    regression_margins = {"test/wer": 0.02}  # worse than before by more than this: status "regressed"
    description = "speech LLM from parts (Whisper encoder + projector + LoRA LLM): transcripts, spoken orders -> JSON"
    config_cls = AudioLLMConfig
    config_file = "audio-llm.yaml"

    def build_model(self, cfg: AudioLLMConfig, log=print):
        return build_composed_lm(
            encoder=cfg.encoder, encoder_tuning=cfg.encoder_tuning, model=cfg.model,
            llm=cfg.llm, projector=cfg.projector, compute_dtype=compute_dtype(resolve_precision(cfg.train.precision)),
            label_logits_only=cfg.train.label_logits_only, gradient_checkpointing=cfg.train.gradient_checkpointing,
            log=log)

    def prepare(self, cfg: AudioLLMConfig, model, tok, report: dict, log, *, training: bool):
        """Clips, task rows, anchor words (a training run), the encoder cache and the tokenised sets."""
        precision = resolve_precision(cfg.train.precision)
        sets, report["data"] = load_asr_sets(cfg.data, log, need_text=False)
        clips = {c.id: c for name in ("train", "test") for c in sets[name]}
        rows = {"transcribe": task_rows(sets["train"], cfg.tasks, train=True, tasks=("transcribe",)),
                "all": task_rows(sets["train"], cfg.tasks, train=True), "test": task_rows(sets["test"], cfg.tasks, train=False)}
        if cfg.projector.uses_words and training:
            anchors = anchor_on_text(model, tok, [r["target"] for r in rows["all"]], cfg.projector.anchor_words, log)
            report["model"]["anchor_words"] = [tok.decode([t]) for t in dict.fromkeys(anchors)]
        load = lambda clip_id: clips[clip_id].wave  # noqa: E731
        with timed(report, "feature_cache_seconds"):
            cache = speech_cache(model, cfg.cache, list(clips) if training else [c.id for c in sets["test"]], load,
                                 batch_size=cfg.train.eval_batch_size, dtype=autocast_dtype(precision))

        def dataset(rows_: list[dict], name: str = "test", readings: dict | None = None) -> ComposedDataset:
            skipped = Skips()
            made = ComposedDataset(rows_, tok, cache, placeholder=AUDIO_PLACEHOLDER, max_length=cfg.max_length,
                                   skipped=skipped, readings=readings)
            report["data"][f"{name} rows"] = skipped.summary(len(made))
            return made

        report["data"].update({f"{name} rows": Skips().summary(len(rows[name])) for name in ("transcribe", "all", "test")})
        log(data_line(report["data"]))
        encoder = model.encoder if cache is None else None
        return rows, dataset, clips, encoder, load, cache

    def measurer(self, cfg: AudioLLMConfig, model, tok, rows, dataset, clips, encoder, load, cache):
        precision = resolve_precision(cfg.train.precision)
        _, normalizer = normalizer_for("auto", {"multilingual": False}, None)
        seconds = {i: c.seconds for i, c in clips.items()}

        def measure(shuffle: bool = False):  # rank 0 evaluates under a launcher; every rank gets the result
            return dist.on_main(lambda: measure_audio_llm(model, tok, rows["test"], dataset=dataset, decoding=cfg.eval, precision=precision,
                                encoder=encoder, load=load, shuffle=shuffle, normalizer=normalizer, seconds=seconds, seed=cfg.eval.shuffle_seed))

        def reading() -> dict:  # what the word tokens spell alone, where they can be read
            return dist.on_main(lambda: reading_scores(model, tok, rows["test"], cache, normalizer=normalizer))
        return measure, normalizer, reading

    def run(self, cfg: AudioLLMConfig, ctx: RunContext) -> None:
        report, log = ctx.report, ctx.log
        precision = resolve_precision(cfg.train.precision)
        with timed(report, "setup_seconds"):
            model, tok, source = self.build_model(cfg, log)
            report["model"] = {**source, **composed_report(model, cfg.encoder.name, cfg.projector,
                                                           cache=cfg.cache.mode == "auto"),
                               "precision": precision, "llm_method": cfg.llm.method}
            report["parameters"] = model.parameter_report()
        rows, dataset, clips, encoder, load, cache = self.prepare(cfg, model, tok, report, log, training=True)
        measure, normalizer, reading = self.measurer(cfg, model, tok, rows, dataset, clips, encoder, load, cache)
        columns, items = {}, {}
        if cfg.cascade.enabled:
            with timed(report, "cascade_seconds"):
                columns["cascade"], items["cascade"] = measure_before(ctx.run_dir, cfg.train.resume, lambda: cascade(
                    model_cfg=cfg.model, llm_cfg=cfg.llm, train_cfg=cfg.train, cfg=cfg.cascade, train_rows=rows["all"],
                    test_rows=rows["test"], clips=clips, whisper_name=cfg.encoder.name or "whisper-tiny.en",
                    normalizer=normalizer, run_dir=ctx.run_dir, precision=precision, log=log), name="cascade.json", collective=True)
            log("cascade: " + task_line(columns["cascade"]))
        with timed(report, "eval_before_seconds"):
            columns["before"], items["before"] = measure_before(ctx.run_dir, cfg.train.resume, measure)
            columns["before"].update(reading())
        log("before: " + task_line(columns["before"]))
        heard = heldout_for(cfg, model, dataset, rows, precision=precision, log=log, report=report)
        collator = ComposedCollator(tok.pad_token_id, encoder, load=load)
        plans = [StagePlan(s.name, dataset(rows[s.data], s.name, heard.get(s.name)), None,
                           s.components, s.max_steps, s.lr, collator=stage_collator(s.loss, collator)) for s in cfg.stages]

        def after(stage: StagePlan) -> None:
            last = stage is plans[-1]
            label = "after" if last else f"after_{stage.name}"
            with timed(report, f"eval_{label}_seconds"):
                columns[label], items[label] = measure(shuffle=last)
                columns[label].update(reading())
            log(f"{label}: " + task_line(columns[label]))

        lrs = {n: lr for n, lr in (("projector", cfg.projector.lr), ("llm", cfg.llm.lr), ("encoder", cfg.encoder_tuning.lr)) if lr}
        with timed(report, "train_and_stage_eval_seconds"):
            result = run_stages(model, plans, cfg.train, run_dir=ctx.run_dir, tokenizer=tok, after_stage=after,
                                collator=collator, component_lrs=lrs,
                                checkpoint_meta={"recipe": self.name, "config": to_dict(cfg), "model_source": source},
                                log=log)
        report.update(checkpoint=str(result.checkpoint), metrics=columns, items=pair_task_items(items),
                      training={"stages": result.stages, "curve": result.rows}, plots=task_plots(ctx.run_dir, columns),
                      notes=list(REPORT_NOTES))

    def evaluate(self, cfg: AudioLLMConfig, checkpoint: Path, ctx: RunContext) -> None:
        report, log = ctx.report, ctx.log
        model, tok, source = self.build_model(cfg, log)
        report["model"] = {**source, "precision": resolve_precision(cfg.train.precision)}
        rows, dataset, clips, encoder, load, cache = self.prepare(cfg, model, tok, report, log, training=False)
        measure, _, _ = self.measurer(cfg, model, tok, rows, dataset, clips, encoder, load, cache)
        with timed(report, "eval_seconds"):
            ckpt.load_trained(model, checkpoint)
            after, items = measure(shuffle=True)
        report.update(metrics={"after": after}, items=pair_task_items({"after": items}), plots=task_plots(ctx.run_dir, {"after": after}))
        log("checkpoint: " + task_line(after))

    def generate(self, cfg: AudioLLMConfig, checkpoint: Path, prompts: list[str], input_file, log) -> list[str]:
        wave = read_recording(input_file)
        model, tok, _ = self.build_model(cfg, log)
        ckpt.load_trained(model, checkpoint)
        return generate_about(model, tok, input_file, prompts, cfg.eval, template=AUDIO_TEMPLATE,
                              placeholder=AUDIO_PLACEHOLDER, load=lambda _: wave, max_length=cfg.max_length,
                              precision=resolve_precision(cfg.train.precision))

    def save_merged(self, cfg: AudioLLMConfig, model, tok, out: Path, log, dtype=None, meta=None) -> Path:
        return save_merged(model, tok, out, template=AUDIO_TEMPLATE, placeholder=AUDIO_PLACEHOLDER, dtype=dtype)


register_recipe(AudioLLM())
