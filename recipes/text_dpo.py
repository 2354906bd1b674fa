"""text-dpo: preference tuning (DPO, IPO, hinge) of a causal LM on trl's DPOTrainer, after instruction tuning.

Reads like a table of contents: build the LM (or start from a text-sft checkpoint), read instructions and
preference pairs, measure, train the stages (SFT on instructions, then DPO on pairs), measure after each, report
preference accuracy and reward margin beside the SFT metrics so a regression shows.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from modaltune.recipes.text_sft import TextSFT, _pair, _param_line
from modaltune.shared import checkpoint as ckpt
from modaltune.shared import dist
from modaltune.shared.config import doc, from_dict, to_dict
from modaltune.shared.errors import ConfigError
from modaltune.shared.harness import data_line, measure_before, metric_line, timed
from modaltune.shared.lm import ModelConfig
from modaltune.shared.peft import ComponentConfig, method_of
from modaltune.shared.preference import PreferenceConfig
from modaltune.shared.recipe import RunContext, register_recipe
from modaltune.shared.training import StageConfig, StagePlan, TrainConfig, resolve_precision, run_stages
from modaltune.text.data import InstructionDataConfig, PadCollator, PromptFormatter, prompt_style, tokenized_splits
from modaltune.text.eval import GenerationEvalConfig, measure_text
from modaltune.text.preference import (PairDataConfig, TokenizedPairs, dpo_stage_trainer, load_pairs, pair_logps,
                                       preference_metrics)

KINDS = ("instructions", "pairs")


@dataclasses.dataclass
class InitConfig:
    """Where the model starts."""

    checkpoint: str | None = doc(None, "a text-sft checkpoint to start from (its model and llm settings are used, "
                                       "and stages on instructions are skipped)")


def _default_stages() -> list[StageConfig]:
    return [StageConfig(name="sft", data="instructions", max_steps=90),
            StageConfig(name="dpo", data="pairs", max_steps=60, lr=1e-4)]


@dataclasses.dataclass
class TextDPOConfig:
    """Schema of ``recipes/configs/text-dpo.yaml``."""

    model: ModelConfig = doc(ModelConfig, "the causal LM")
    llm: ComponentConfig = doc(ComponentConfig, "how the LM is tuned (method, rank, targets, lr)")
    init: InitConfig = doc(InitConfig, "where the model starts")
    data: InstructionDataConfig = doc(InstructionDataConfig, "instruction data (SFT stage and SFT metrics)")
    pairs: PairDataConfig = doc(PairDataConfig, "preference pairs")
    preference: PreferenceConfig = doc(PreferenceConfig, "the preference loss")
    stages: list[StageConfig] = doc(help="training stages in order (data: instructions | pairs)",
                                    factory=_default_stages)
    train: TrainConfig = doc(TrainConfig, "optimisation (shared by the stages)")
    eval: GenerationEvalConfig = doc(GenerationEvalConfig, "generation for evaluation")
    quick: dict[str, Any] = doc({}, "dotted-key overrides applied by --quick")

    def validate(self, where: str) -> None:
        for i, stage in enumerate(self.stages):
            if stage.data not in KINDS:
                raise ConfigError(f"{where}.stages[{i}].data must be one of {', '.join(KINDS)}, got {stage.data!r}")
            if stage.loss != "model":
                raise ConfigError(f"{where}.stages[{i}].loss={stage.loss}: a text model has no projector to ground; "
                                  "use loss: model")
        if not any(s.data == "pairs" for s in self.stages):
            raise ConfigError(f"{where}.stages has no stage on pairs: add one (data: pairs), or use text-sft")
        if method_of(self.llm).virtual_tokens:
            raise ConfigError(f"{where}.llm.method={self.llm.method}: preference training here takes adapters "
                              "(lora, qlora, dora, ia3) or weights (full, hft)")


class TextDPO(TextSFT):
    """Preference tuning of a causal LM: SFT then DPO (or DPO from a text-sft checkpoint); preference accuracy,
    reward margin, ROUGE-L and loss reported."""

    name = "text-dpo"
    regression_margins = {"test/preference_accuracy": 0.02}  # worse than before by more than this: status "regressed"
    description = "preference tuning (DPO/IPO/hinge on trl) after SFT; preference accuracy, reward margin, ROUGE-L"
    config_cls = TextDPOConfig
    config_file = "text-dpo.yaml"

    def prepare(self, cfg: TextDPOConfig, ctx: RunContext):
        precision = resolve_precision(cfg.train.precision)
        if cfg.init.checkpoint:  # the SFT run's own model and adapter settings, so its weights fit
            saved = ckpt.read_meta(cfg.init.checkpoint)["config"]
            cfg.model, cfg.llm = from_dict(ModelConfig, saved["model"]), from_dict(ComponentConfig, saved["llm"])
        model, tok, source = self.build_model(cfg, ctx.log)
        formatter = PromptFormatter(tok, cfg.model.template, cfg.data.train_on)
        ctx.report["model"] = {**source, "template": formatter.name, "precision": precision, "method": cfg.llm.method}
        ctx.report["parameters"] = model.parameter_report()
        sets, ctx.report["data"] = tokenized_splits(cfg.data, formatter)
        split_pairs, skipped = load_pairs(cfg.pairs)
        pairs = {s: TokenizedPairs(p, formatter, cfg.pairs.max_length, skipped[s]) for s, p in split_pairs.items()}
        ctx.report["data"].update({f"pairs_{s}": skipped[s].summary(len(pairs[s])) for s in pairs})
        ctx.report["model"]["prompt_style"] = prompt_style(sets["train"].examples)
        ctx.log(data_line(ctx.report["data"]))

        def measure(label: str):  # SFT metrics and each test pair's log-probs; rank 0 under a launcher
            def both():
                metrics, items = measure_text(model, tok, sets, formatter, cfg.eval,
                                              batch_size=cfg.train.eval_batch_size, precision=precision, label=label)
                logps = pair_logps(model, pairs["test"], tok.pad_token_id, batch_size=cfg.train.eval_batch_size,
                                   precision=precision)
                return metrics, {"generations": items, "pairs": logps}
            return dist.on_main(both)
        return model, tok, source, formatter, sets, pairs, measure

    def run(self, cfg: TextDPOConfig, ctx: RunContext) -> None:
        report, log = ctx.report, ctx.log
        with timed(report, "setup_seconds"):
            model, tok, source, formatter, sets, pairs, measure = self.prepare(cfg, ctx)
            if cfg.init.checkpoint:
                ckpt.load_trained(model, cfg.init.checkpoint)
                log(f"starting from {cfg.init.checkpoint}")
            log(_param_line(report["parameters"]))
        columns, items = {}, {}
        with timed(report, "eval_before_seconds"):
            columns["before"], items["before"] = measure_before(ctx.run_dir, cfg.train.resume,
                                                                lambda: measure("before"))
        log("before: " + metric_line(columns["before"], digits=4))
        plans, reference = [], "before"
        for s in cfg.stages:
            if s.data == "instructions" and cfg.init.checkpoint:
                log(f"stage {s.name}: skipped (starting from init.checkpoint)")
                continue
            if s.data == "pairs":
                if not any(p.trainer for p in plans):  # the reference: the model as the first pairs stage starts
                    reference = f"after_{plans[-1].name}" if plans else "before"
                plans.append(StagePlan(s.name, pairs["train"].for_trl(formatter), pairs["validation"].for_trl(
                    formatter) if len(pairs["validation"]) else None, s.components, s.max_steps, s.lr,
                    trainer=dpo_stage_trainer(tok, cfg.preference, max_length=cfg.pairs.max_length,
                                              gradient_checkpointing=cfg.train.gradient_checkpointing)))
            else:
                plans.append(StagePlan(s.name, sets["train"], sets["validation"] if len(sets["validation"]) else None,
                                       s.components, s.max_steps, s.lr))

        def after(stage: StagePlan) -> None:
            label = "after" if stage is plans[-1] else f"after_{stage.name}"
            with timed(report, f"eval_{label}_seconds"):
                columns[label], items[label] = measure(label)
            log(f"{label}: " + metric_line(columns[label], digits=4))

        with timed(report, "train_and_stage_eval_seconds"):
            result = run_stages(
                model, plans, cfg.train, run_dir=ctx.run_dir, collator=PadCollator(tok.pad_token_id),
                component_lrs={"llm": cfg.llm.lr} if cfg.llm.lr else {}, tokenizer=tok, log=log, after_stage=after,
                checkpoint_meta={"recipe": self.name, "config": to_dict(cfg), "model_source": source,
                                 "prompt_style": report["model"]["prompt_style"], "reference": reference})
        report.update(checkpoint=str(result.checkpoint), training={"stages": result.stages, "curve": result.rows})
        _finish(report, columns, items, reference, pairs["test"], cfg.preference)

    def evaluate(self, cfg: TextDPOConfig, checkpoint: Path, ctx: RunContext) -> None:
        model, tok, source, formatter, sets, pairs, measure = self.prepare(cfg, ctx)
        reference = _reference_weights(cfg, checkpoint)
        with timed(ctx.report, "eval_seconds"):
            if reference is not None:
                ckpt.load_trained(model, reference)
            columns, items = {}, {}
            columns["before"], items["before"] = measure("reference")
            ckpt.load_trained(model, checkpoint)
            columns["after"], items["after"] = measure("checkpoint")
        ctx.log(f"reference: {reference or 'the base model (adapters off)'}")
        _finish(ctx.report, columns, items, "before", pairs["test"], cfg.preference)
        ctx.log("checkpoint: " + metric_line(ctx.report["metrics"]["after"], digits=4))


def _reference_weights(cfg: TextDPOConfig, checkpoint: Path) -> Path | None:
    """The weights DPO started from: init.checkpoint, else the run's last stage on instructions before the first on
    pairs (kept under the run's stages/), else none (the base model)."""
    if cfg.init.checkpoint:
        return Path(cfg.init.checkpoint)
    before = [s for s in cfg.stages[: [s.data for s in cfg.stages].index("pairs")] if s.data == "instructions"]
    found = Path(checkpoint).parent / "stages" / before[-1].name / "final" if before else None
    if found is not None and ckpt.problem(found) is not None:
        raise ConfigError(f"the DPO reference (the SFT stage's weights) is not at {found}; evaluate the checkpoint "
                          "inside its run folder, or set init.checkpoint to the SFT checkpoint")
    return found


def _finish(report: dict, columns: dict, items: dict, reference: str, test_pairs: TokenizedPairs,
            cfg: PreferenceConfig) -> None:
    """Each column's preference metrics against the reference column, the per-pair rows, the report notes."""
    ref = items[reference]["pairs"]
    for label in columns:
        columns[label].update({f"test/{k}": v for k, v in preference_metrics(items[label]["pairs"], ref, cfg).items()})
    report["metrics"] = columns
    rows = []
    for i, pair in enumerate(test_pairs.pairs):
        row = {"pair": pair.example.id, "category": pair.example.category, "failure": pair.failure,
               "chosen": pair.example.response, "rejected": pair.rejected}
        for label in columns:
            got, base = items[label]["pairs"][i], ref[i]
            row[f"margin_{label}"] = round(cfg.beta * ((got["chosen_logp"] - base["chosen_logp"])
                                                       - (got["rejected_logp"] - base["rejected_logp"])), 4)
        rows.append(row)
    last = list(columns)[-1]
    report["items"] = _pair(items["before"]["generations"], items[last]["generations"]) + rows
    report["notes"] = [f"implicit rewards are beta * (log p - log p_reference), the reference being the {reference!r} "
                       "column (the model as DPO starts), so that column's preference accuracy is 0 by definition.",
                       "logp_accuracy: how often the model alone gives the chosen answer the higher log-probability."]


register_recipe(TextDPO())
