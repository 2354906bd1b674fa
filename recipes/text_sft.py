"""text-sft: instruction tuning of a causal LM with LoRA / QLoRA / DoRA / IA3 / prompt or prefix tuning / full.

Reads like a table of contents: build the LM and apply PEFT, build data, evaluate before, train, evaluate after.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from modaltune.shared import checkpoint as ckpt
from modaltune.shared import dist
from modaltune.shared.config import doc, to_dict
from modaltune.shared.errors import ConfigError, ModaltuneError
from modaltune.shared.harness import data_line, measure_before, metric_line, pair_items, timed
from modaltune.shared.lm import ModelConfig, build_text_model
from modaltune.shared.merge import deploy_generation_config, merged
from modaltune.shared.peft import ComponentConfig, method_of
from modaltune.shared.peft.dylora import measure_ranks
from modaltune.shared.recipe import Recipe, RunContext, register_recipe
from modaltune.shared.training import StagePlan, TrainConfig, compute_dtype, resolve_precision, run_stages
from modaltune.text.data import (Example, InstructionDataConfig, PackedCollator, PackedDataset, PadCollator,
                                 PromptFormatter, plain_chat_template, prompt_style, tokenized_splits)
from modaltune.shared.generation import TokenPrompts, generate
from modaltune.text.eval import GenerationEvalConfig, measure_text


@dataclasses.dataclass
class TextSFTConfig:
    """Schema of ``recipes/configs/text-sft.yaml``."""

    model: ModelConfig = doc(ModelConfig, "the causal LM")
    llm: ComponentConfig = doc(ComponentConfig, "how the LM is tuned (method, rank, targets, lr)")
    data: InstructionDataConfig = doc(InstructionDataConfig, "instruction data")
    train: TrainConfig = doc(TrainConfig, "optimisation")
    eval: GenerationEvalConfig = doc(GenerationEvalConfig, "generation for evaluation")
    quick: dict[str, Any] = doc({}, "dotted-key overrides applied by --quick")

    def validate(self, where: str) -> None:
        if self.data.packing and method_of(self.llm).virtual_tokens:
            raise ConfigError(f"data.packing with llm.method={self.llm.method}: virtual tokens are prepended to each "
                              "row, not to each packed example; turn packing off or use another method")


class TextSFT(Recipe):
    """A causal LM tuned on instruction/response pairs with any core PEFT method; EM, ROUGE-L and loss reported."""

    name = "text-sft"
    regression_margins = {"test/loss": 0.02}  # worse than before by more than this: status "regressed"
    description = "instruction tuning of a causal LM (LoRA/QLoRA/DoRA/IA3/prompt/prefix/full); EM, ROUGE-L, loss"
    config_cls = TextSFTConfig
    config_file = "text-sft.yaml"

    def build_model(self, cfg: TextSFTConfig, log=print):
        model, tok, source = build_text_model(
            cfg.model, cfg.llm, compute_dtype=compute_dtype(resolve_precision(cfg.train.precision)),
            label_logits_only=cfg.train.label_logits_only, log_fn=log)
        if cfg.train.gradient_checkpointing:
            model.activation_checkpointing_enable()
        return model, tok, source

    def prepare(self, cfg: TextSFTConfig, ctx: RunContext):
        precision = resolve_precision(cfg.train.precision)
        model, tok, source = self.build_model(cfg, ctx.log)
        formatter = PromptFormatter(tok, cfg.model.template, cfg.data.train_on)
        ctx.report["model"] = {**source, "template": formatter.name, "precision": precision, "method": cfg.llm.method}
        ctx.report["parameters"] = model.parameter_report()
        sets, ctx.report["data"] = tokenized_splits(cfg.data, formatter)
        ctx.report["model"]["prompt_style"] = prompt_style(sets["train"].examples)
        ctx.log(data_line(ctx.report["data"]))

        def measure(label: str):  # rank 0 evaluates under a launcher; every rank gets the result
            return dist.on_main(lambda: measure_text(model, tok, sets, formatter, cfg.eval,
                                                     batch_size=cfg.train.eval_batch_size, precision=precision,
                                                     label=label))
        return model, tok, source, sets, measure

    def run(self, cfg: TextSFTConfig, ctx: RunContext) -> None:
        report = ctx.report
        with timed(report, "setup_seconds"):
            model, tok, source, sets, measure = self.prepare(cfg, ctx)
            ctx.log(_param_line(report["parameters"]))
        with timed(report, "eval_before_seconds"):
            before, before_items = measure_before(ctx.run_dir, cfg.train.resume, lambda: measure("before"))
        report["metrics"]["before"] = before
        ctx.log("before: " + metric_line(before, digits=4))
        train, collator = sets["train"], PadCollator(tok.pad_token_id)
        if cfg.data.packing:
            train, collator = PackedDataset(train, cfg.data.max_length), PackedCollator(tok.pad_token_id)
            report["data"]["train"]["packed_rows"] = len(train)
            ctx.log(f"packed {len(sets['train'])} training examples into {len(train)} rows of up to "
                    f"{cfg.data.max_length} tokens ({100 * train.fill:.0f}% filled)")
        with timed(report, "train_seconds"):
            result = run_stages(
                model, [StagePlan("sft", train, sets["validation"] if len(sets["validation"]) else None)],
                cfg.train, run_dir=ctx.run_dir, collator=collator,
                component_lrs={"llm": cfg.llm.lr} if cfg.llm.lr else {}, tokenizer=tok, log=ctx.log,
                checkpoint_meta={"recipe": self.name, "config": to_dict(cfg), "model_source": source,
                                 "prompt_style": report["model"]["prompt_style"]})
        report["training"] = {"stages": result.stages, "curve": result.rows}
        report["checkpoint"] = str(result.checkpoint)
        with timed(report, "eval_after_seconds"):
            after, after_items = measure("after")
        report["metrics"]["after"] = after
        ctx.log("after:  " + metric_line(after, digits=4))
        report["metrics"].update(measure_ranks(model, cfg.llm.eval_ranks, measure, result.checkpoint, ctx.run_dir,
                                               ctx.log))  # DyLoRA: the same adapter at lower ranks
        report["items"] = _pair(before_items, after_items)

    def evaluate(self, cfg: TextSFTConfig, checkpoint: Path, ctx: RunContext) -> None:
        model, tok, source, sets, measure = self.prepare(cfg, ctx)
        with timed(ctx.report, "eval_seconds"):
            before, before_items = measure("base")
            ckpt.load_trained(model, checkpoint)
            after, after_items = measure("checkpoint")
        ctx.report["metrics"] = {"before": before, "after": after}
        ctx.report["items"] = _pair(before_items, after_items)
        ctx.log("base:       " + metric_line(before, digits=4))
        ctx.log("checkpoint: " + metric_line(after, digits=4))

    def generate(self, cfg: TextSFTConfig, checkpoint: Path, prompts: list[str], input_file, log) -> list[str]:
        if input_file is not None or not prompts:
            raise ModaltuneError("text-sft answers text: give one or more prompts, and no --input file")
        model, tok, _ = self.build_model(cfg, log)
        ckpt.load_trained(model, checkpoint)
        formatter = PromptFormatter(tok, cfg.model.template)
        ids = [formatter.encode(Example("prompt", [{"role": "user", "content": p}], "", instruction=p))[0]
               for p in prompts]
        return generate(model, tok, TokenPrompts(ids, tok), cfg.eval, precision=resolve_precision(cfg.train.precision))

    def save_merged(self, cfg: TextSFTConfig, model, tok, out: Path, log, dtype=None, meta=None) -> Path:
        """The merged LM with what it needs to be used as trained: the prompt format as the tokenizer's chat
        template (when training used the plain template) and greedy decoding that stops at EOS."""
        lm = merged(model.llm, dtype)
        formatter = PromptFormatter(tok, cfg.model.template)
        if not formatter.use_chat:
            starts_with_bos = tok.bos_token_id is not None and tok("x")["input_ids"][:1] == [tok.bos_token_id]
            tok.chat_template = plain_chat_template((meta or {}).get("prompt_style", "instruction"),
                                                    tok.bos_token if starts_with_bos else None)
            log("wrote the training prompt format as the tokenizer's chat template")
        lm.generation_config = deploy_generation_config(lm.generation_config, tok, cfg.eval)
        lm.save_pretrained(str(out))
        tok.save_pretrained(str(out))
        return out


def _pair(before: list[dict], after: list[dict]) -> list[dict]:
    """One row per test item with both predictions, worst (lowest ROUGE-L after tuning) first."""
    def extra(found: dict[str, dict]) -> dict:
        return {"rougeL_before": round(found["before"].get("rougeL", 0.0), 4),
                "rougeL_after": round(found["after"]["rougeL"], 4), "exact_after": found["after"]["exact"]}

    return pair_items({"before": before, "after": after}, key=("id",), keep=("category", "prompt", "reference"),
                      value="prediction", extra=extra, sort=lambda r: r["rougeL_after"])


def _param_line(params: dict) -> str:
    t = params["total"]
    return f"parameters: {t['trainable']:,} trainable of {t['total']:,} ({100 * t['trainable'] / max(t['total'], 1):.3f}%)"


register_recipe(TextSFT())
