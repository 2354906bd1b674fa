"""med-vqa: a vision-language model composed from parts, trained in two stages (captions, then VQA).

Build the image encoder (frozen), the projector (trainable) and the LoRA LLM; build caption and VQA data; cache
the frozen encoder's features; evaluate with the untrained projector; train the stages; evaluate after each; report.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from modaltune.shared import checkpoint as ckpt
from modaltune.shared import dist
from modaltune.shared.compose import (EncoderConfig, ProjectorConfig, anchor_on_text, build_composed_lm,
                                      check_stage_losses, composed_report, save_merged)
from modaltune.shared.config import ConfigError, doc, to_dict
from modaltune.shared.errors import ModaltuneError
from modaltune.shared.features import CacheConfig
from modaltune.shared.harness import data_line, measure_before, metric_line, pair_items, timed
from modaltune.shared.lm import ModelConfig
from modaltune.shared.loss import unwrap_peft
from modaltune.shared.peft import ComponentConfig
from modaltune.shared.recipe import Recipe, RunContext, register_recipe
from modaltune.shared.training import StageConfig, StagePlan, TrainConfig, compute_dtype, resolve_precision, run_stages
from modaltune.shared.compose_data import generate_about, stage_collator
from modaltune.vision.data import PLACEHOLDER, VQA_TEMPLATE
from modaltune.vision.images import load_image
from modaltune.shared.preference import PairCollator, PreferenceConfig, preference_stage_trainer
from modaltune.vision.vqa import (SETS, VQADataConfig, VQAEvalConfig, confusion_plot, fill_image_cache, image_cache,
                                  image_collator, load_vqa_sets, measure_vqa, vqa_datasets, vqa_pairs_dataset)


def _default_stages() -> list[StageConfig]:
    return [StageConfig(name="caption", data="caption"), StageConfig(name="vqa", data="vqa")]


@dataclasses.dataclass
class MedVQAConfig:
    """Schema of ``recipes/configs/med-vqa.yaml``."""

    encoder: EncoderConfig = doc(EncoderConfig, "the image encoder")
    encoder_tuning: ComponentConfig = doc(help="how the encoder is tuned (frozen: features are cached)",
                                          factory=lambda: ComponentConfig(method="frozen", targets=["conv_pw"]))
    projector: ProjectorConfig = doc(ProjectorConfig, "projector and token grouping")
    model: ModelConfig = doc(ModelConfig, "the causal LLM")
    llm: ComponentConfig = doc(help="how the LLM is tuned", factory=lambda: ComponentConfig(method="lora"))
    data: VQADataConfig = doc(VQADataConfig, "caption and VQA data")
    stages: list[StageConfig] = doc(help="training stages in order", factory=_default_stages)
    train: TrainConfig = doc(TrainConfig, "optimisation (shared by the stages)")
    eval: VQAEvalConfig = doc(help="generation for evaluation", factory=lambda: VQAEvalConfig(max_new_tokens=10,
                                                                                              batch_size=32))
    cache: CacheConfig = doc(CacheConfig, "encoder-feature cache")
    preference: PreferenceConfig = doc(PreferenceConfig, "the preference loss of stages on vqa_pairs")
    quick: dict[str, Any] = doc({}, "dotted-key overrides applied by --quick")

    def validate(self, where: str) -> None:
        for key, comp, cc in (("encoder_tuning", "encoder", self.encoder_tuning), ("llm", "llm", self.llm)):
            if cc.trains and not any(s.components is None or comp in s.components for s in self.stages):
                raise ConfigError(
                    f"{key}.method={cc.method}, but no stage trains the {comp}: add {comp!r} to a stage's "
                    f"components (e.g. stages[{len(self.stages) - 1}].components=[{comp},projector,llm])")
        for i, stage in enumerate(self.stages):
            if stage.data not in {"caption", "vqa", "vqa_pairs"}:
                raise ConfigError(f"stages[{i}].data must be caption, vqa or vqa_pairs, got {stage.data!r}")
            if stage.loss == "grounding" and stage.data != "caption":
                raise ConfigError(f"stages[{i}].loss=grounding grounds the projector on captions: use it on a caption "
                                  "stage, or loss: model")
        check_stage_losses(self.stages, self.projector)


class MedVQA(Recipe):
    """Frozen image encoder -> grouped tokens -> projector -> LoRA LLM, trained on captions then on VQA."""

    name = "med-vqa"
    regression_margins = {"test/accuracy": 0.02}  # worse than before by more than this: status "regressed"
    description = "vision-language model from parts (frozen encoder + projector + LoRA LLM), captions then VQA"
    config_cls = MedVQAConfig
    config_file = "med-vqa.yaml"

    def build_model(self, cfg: MedVQAConfig, log=print):
        return build_composed_lm(
            encoder=cfg.encoder, encoder_tuning=cfg.encoder_tuning, model=cfg.model,
            llm=cfg.llm, projector=cfg.projector, compute_dtype=compute_dtype(resolve_precision(cfg.train.precision)),
            label_logits_only=cfg.train.label_logits_only, gradient_checkpointing=cfg.train.gradient_checkpointing,
            log=log)

    def prepare(self, cfg: MedVQAConfig, model, tok, report: dict, log, *, training: bool):
        """Data, anchor words (a training run), the feature cache of the frozen encoder part and the tokenised sets;
        returns ``(datasets, encoder)``, ``encoder`` being the model's when no cache holds the images."""
        precision = resolve_precision(cfg.train.precision)
        raw, report["data"] = load_vqa_sets(cfg.data)
        if cfg.projector.uses_words and training:
            texts = [it.caption for it in raw["caption_train"]]
            texts += [t for it in raw["vqa_train"] for t in (it.question, it.answer)]
            anchors = anchor_on_text(model, tok, texts, cfg.projector.anchor_words, log)
            report["model"]["anchor_words"] = [tok.decode([t]) for t in dict.fromkeys(anchors)]
        depth = unwrap_peft(model.encoder).cache_depth() if cfg.cache.mode == "auto" else None
        cache = None
        with timed(report, "feature_cache_seconds"):
            if depth is not None:
                cache = image_cache(model.encoder, depth=depth, precision=precision, directory=cfg.cache.dir)
                fill_image_cache(cache, raw, names=SETS if training else ("vqa_test", "caption_test"))
        sets = vqa_datasets(raw, tok, cache, max_length=cfg.data.max_length, seed=cfg.data.seed,
                            counts=report["data"])
        if training and any(s.data == "vqa_pairs" for s in cfg.stages):  # right vs wrong answer, same question
            sets["vqa_pairs_train"] = vqa_pairs_dataset(raw["vqa_train"], tok, cache, max_length=cfg.data.max_length,
                                                        seed=cfg.data.seed, counts=report["data"])
        log(data_line(report["data"]))
        return sets, (model.encoder if cache is None else None)

    def run(self, cfg: MedVQAConfig, ctx: RunContext) -> None:
        report, log = ctx.report, ctx.log
        precision = resolve_precision(cfg.train.precision)
        with timed(report, "setup_seconds"):
            model, tok, source = self.build_model(cfg, log)
            report["model"] = {**source, **composed_report(model, cfg.encoder.kind, cfg.projector, cache=cfg.cache.mode == "auto"),
                               "precision": precision, "llm_method": cfg.llm.method}
            report["parameters"] = model.parameter_report()
        sets, encoder = self.prepare(cfg, model, tok, report, log, training=True)

        def measure(label: str):  # rank 0 evaluates under a launcher; every rank gets the result
            return dist.on_main(lambda: measure_vqa(model, tok, sets, cfg.eval, encoder=encoder, label=label,
                                                    precision=precision))

        columns, items = {}, {}
        with timed(report, "eval_before_seconds"):
            columns["before"], items["before"] = measure_before(ctx.run_dir, cfg.train.resume,
                                                                lambda: measure("untrained projector"))
        log("before: " + metric_line(columns["before"]))
        plans = []
        for s in cfg.stages:
            pairs = s.data == "vqa_pairs"
            if len(sets[f"{s.data}_train"]):
                plans.append(StagePlan(s.name, sets[f"{s.data}_train"], None, s.components, s.max_steps, s.lr,
                                       trainer=preference_stage_trainer(cfg.preference) if pairs else None,
                                       collator=PairCollator(image_collator(tok, encoder)) if pairs
                                       else stage_collator(s.loss, image_collator(tok, encoder))))
            else:
                log(f"stage {s.name}: no {s.data} data, skipped")
        if not plans:
            raise ModaltuneError("no stage has data: check the stages list and the data")

        def after(stage: StagePlan) -> None:
            label = "after" if stage is plans[-1] else f"after_{stage.name}"
            with timed(report, f"eval_{label}_seconds"):
                columns[label], items[label] = measure(label)
            log(f"{label}: " + metric_line(columns[label]))

        lrs = {n: lr for n, lr in (("projector", cfg.projector.lr), ("llm", cfg.llm.lr),
                                    ("encoder", cfg.encoder_tuning.lr)) if lr}
        with timed(report, "train_and_stage_eval_seconds"):
            result = run_stages(model, plans, cfg.train, run_dir=ctx.run_dir, collator=image_collator(tok, encoder),
                                component_lrs=lrs, tokenizer=tok, after_stage=after, log=log,
                                checkpoint_meta={"recipe": self.name, "config": to_dict(cfg), "model_source": source})
        report.update(checkpoint=str(result.checkpoint), metrics=columns, items=_pair(items),
                      training={"stages": result.stages, "curve": result.rows},
                      plots=confusion_plot(ctx.run_dir, items[list(items)[-1]]),
                      notes=["before = untrained projector and fresh LoRA; after_<stage> = after that stage.",
                             "accuracy: exact match after answer normalisation (lower case, no punctuation/articles) of the "
                             "text after the last 'Answer:' (a closed rationale comes before it)."])

    def evaluate(self, cfg: MedVQAConfig, checkpoint: Path, ctx: RunContext) -> None:
        report, log = ctx.report, ctx.log
        precision = resolve_precision(cfg.train.precision)
        model, tok, source = self.build_model(cfg, log)
        report["model"] = {**source, **composed_report(model, cfg.encoder.kind, cfg.projector, cache=cfg.cache.mode == "auto"), "precision": precision}
        sets, encoder = self.prepare(cfg, model, tok, report, log, training=False)
        columns, items = {}, {}
        with timed(report, "eval_seconds"):
            columns["before"], items["before"] = dist.on_main(lambda: measure_vqa(
                model, tok, sets, cfg.eval, encoder=encoder, label="untrained", precision=precision))
            ckpt.load_trained(model, checkpoint)
            columns["after"], items["after"] = dist.on_main(lambda: measure_vqa(
                model, tok, sets, cfg.eval, encoder=encoder, label="checkpoint", precision=precision))
        report.update(metrics=columns, items=_pair(items), plots=confusion_plot(ctx.run_dir, items["after"]))
        log("checkpoint: " + metric_line(columns["after"]))

    def generate(self, cfg: MedVQAConfig, checkpoint: Path, prompts: list[str], input_file, log) -> list[str]:
        if input_file is None or not prompts:
            raise ModaltuneError("med-vqa answers questions about an image: give --input IMAGE and a question")
        model, tok, _ = self.build_model(cfg, log)
        ckpt.load_trained(model, checkpoint)
        return generate_about(model, tok, input_file, prompts, cfg.eval, template=VQA_TEMPLATE, placeholder=PLACEHOLDER,
                              load=load_image, max_length=cfg.data.max_length,
                              precision=resolve_precision(cfg.train.precision))

    def save_merged(self, cfg: MedVQAConfig, model, tok, out: Path, log, dtype=None, meta=None) -> Path:
        return save_merged(model, tok, out, template=VQA_TEMPLATE, placeholder=PLACEHOLDER, dtype=dtype)


def _pair(items: dict[str, list[dict]]) -> list[dict]:
    """One row per test question with every column's answer; wrong-after first."""
    return pair_items(items, key=("id",), keep=("image", "type", "question", "reference"), value="prediction",
                      extra=lambda found: {"correct": found[list(found)[-1]].get("correct")},
                      sort=lambda r: r["correct"])


register_recipe(MedVQA())
