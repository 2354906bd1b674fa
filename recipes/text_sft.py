"""text-sft: instruction tuning of a causal LM with LoRA / QLoRA / DoRA / IA3 / prompt or prefix tuning / full.

Reads like a table of contents: build the LM and apply PEFT, build data, evaluate before, train, evaluate after.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from modaltune.shared import checkpoint as ckpt
from modaltune.shared.config import doc, to_dict
from modaltune.shared.errors import ModaltuneError
from modaltune.shared.peft import PROMPT_METHODS, QUANTISED, ComponentConfig
from modaltune.shared.recipe import Recipe, RunContext, register_recipe
from modaltune.shared.training import StagePlan, TrainConfig, resolve_precision, run_stages
from modaltune.text.data import InstructionDataConfig, PadCollator, PromptFormatter, TokenizedDataset, load_splits
from modaltune.text.eval import GenerationEvalConfig, evaluate_generation, evaluate_loss
from modaltune.text.lm import ModelConfig, build_text_model


@dataclasses.dataclass
class TextSFTConfig:
    """Schema of ``recipes/configs/text-sft.yaml``."""

    model: ModelConfig = doc(ModelConfig, "the causal LM")
    llm: ComponentConfig = doc(ComponentConfig, "how the LM is tuned (method, rank, targets, lr)")
    data: InstructionDataConfig = doc(InstructionDataConfig, "instruction data")
    train: TrainConfig = doc(TrainConfig, "optimisation")
    eval: GenerationEvalConfig = doc(GenerationEvalConfig, "generation for evaluation")
    quick: dict[str, Any] = doc({}, "dotted-key overrides applied by --quick")


class TextSFT(Recipe):
    name = "text-sft"
    description = "instruction tuning of a causal LM (LoRA/QLoRA/DoRA/IA3/prompt/prefix/full); EM, ROUGE-L, loss"
    config_cls = TextSFTConfig
    config_file = "text-sft.yaml"

    # -- building blocks ---------------------------------------------------------------------------------------
    def build(self, cfg: TextSFTConfig, ctx: RunContext | None, *, llm: ComponentConfig | None = None):
        precision = resolve_precision(cfg.train.precision)
        compute = torch.bfloat16 if precision == "bf16" else torch.float32
        log = ctx.log if ctx else print
        model, tok, source = build_text_model(
            cfg.model, llm or cfg.llm, compute_dtype=compute, label_logits_only=cfg.train.label_logits_only,
            log_fn=log,
        )
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model, tok, source, precision

    def data(self, cfg: TextSFTConfig, tok, formatter: PromptFormatter):
        splits = load_splits(cfg.data)
        sets = {
            name: TokenizedDataset(examples, formatter, cfg.data.max_length, splits.skipped[name])
            for name, examples in splits.examples.items()
        }
        counts = {name: splits.skipped[name].summary(len(sets[name])) for name in sets}
        if len(sets["train"]) == 0:
            raise ModaltuneError(f"every training example was dropped: {counts['train']['skip_reasons']}")
        return sets, counts

    def measure(self, cfg: TextSFTConfig, model, tok, sets, formatter, precision: str, label: str):
        metrics: dict[str, float] = {}
        for split in ("validation", "test"):
            for key, value in evaluate_loss(
                model, sets[split], tok.pad_token_id, batch_size=cfg.train.eval_batch_size, precision=precision
            ).items():
                metrics[f"{split}/{key}"] = value
        gen_metrics, items = evaluate_generation(
            model, tok, sets["test"], formatter, cfg.eval, precision=precision, desc=f"test ({label})"
        )
        metrics.update({f"test/{k}": v for k, v in gen_metrics.items()})
        return metrics, items

    # -- commands -------------------------------------------------------------------------------------------
    def run(self, cfg: TextSFTConfig, ctx: RunContext) -> None:
        report = ctx.report
        t0 = time.time()
        model, tok, source, precision = self.build(cfg, ctx)
        formatter = PromptFormatter(tok, cfg.model.template)
        report["model"] = {**source, "template": formatter.name, "precision": precision, "method": cfg.llm.method}
        report["parameters"] = model.parameter_report()
        ctx.log(_param_line(report["parameters"]))
        sets, report["data"] = self.data(cfg, tok, formatter)
        ctx.log("data: " + ", ".join(f"{k} {v['kept']} kept / {v['skipped']} skipped" for k, v in report["data"].items()))
        report["timing"] = {"setup_seconds": round(time.time() - t0, 2)}

        t1 = time.time()
        before_file = ctx.run_dir / "before.json"
        if cfg.train.resume and before_file.exists():
            saved = json.loads(before_file.read_text(encoding="utf-8"))
            before, before_items = saved["metrics"], saved["items"]
        else:
            before, before_items = self.measure(cfg, model, tok, sets, formatter, precision, "before")
            before_file.write_text(json.dumps({"metrics": before, "items": before_items}), encoding="utf-8")
        report["metrics"]["before"] = before
        report["timing"]["eval_before_seconds"] = round(time.time() - t1, 2)
        ctx.log("before: " + _metric_line(before))

        t2 = time.time()
        result = run_stages(
            model,
            [StagePlan("sft", sets["train"], sets["validation"] if len(sets["validation"]) else None)],
            cfg.train,
            run_dir=ctx.run_dir,
            collator=PadCollator(tok.pad_token_id),
            component_lrs={"llm": cfg.llm.lr} if cfg.llm.lr else {},
            checkpoint_meta={"recipe": self.name, "config": to_dict(cfg), "model_source": source},
            tokenizer=tok,
            log=ctx.log,
        )
        report["timing"]["train_seconds"] = round(time.time() - t2, 2)
        report["training"] = {"stages": result.stages, "curve": result.rows}
        report["checkpoint"] = str(result.checkpoint)

        t3 = time.time()
        after, after_items = self.measure(cfg, model, tok, sets, formatter, precision, "after")
        report["metrics"]["after"] = after
        report["timing"]["eval_after_seconds"] = round(time.time() - t3, 2)
        ctx.log("after:  " + _metric_line(after))
        report["items"] = _pair_items(before_items, after_items)

    def evaluate(self, cfg: TextSFTConfig, checkpoint: Path, ctx: RunContext) -> None:
        report = ctx.report
        model, tok, source, precision = self.build(cfg, ctx)
        formatter = PromptFormatter(tok, cfg.model.template)
        report["model"] = {**source, "template": formatter.name, "precision": precision, "method": cfg.llm.method}
        report["parameters"] = model.parameter_report()
        sets, report["data"] = self.data(cfg, tok, formatter)
        t0 = time.time()
        before, before_items = self.measure(cfg, model, tok, sets, formatter, precision, "base")
        ckpt.load_trained(model, checkpoint)
        after, after_items = self.measure(cfg, model, tok, sets, formatter, precision, "checkpoint")
        report["metrics"] = {"before": before, "after": after}
        report["timing"] = {"eval_seconds": round(time.time() - t0, 2)}
        report["items"] = _pair_items(before_items, after_items)
        ctx.log("base:       " + _metric_line(before))
        ctx.log("checkpoint: " + _metric_line(after))

    def merge(self, cfg: TextSFTConfig, checkpoint: Path, out: Path, log) -> list[tuple[str, Path]]:
        method = cfg.llm.method
        if method in PROMPT_METHODS:
            raise ModaltuneError(
                f"{method} adds virtual tokens that cannot be merged into weights; load the checkpoint's "
                "adapter/llm folder with peft instead"
            )
        # A QLoRA/int8 adapter merges into the full-precision base it was quantised from.
        llm = dataclasses.replace(cfg.llm, method="lora") if method in QUANTISED else cfg.llm
        fp32 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="fp32", gradient_checkpointing=False))
        model, tok, source, _ = self.build(fp32, None, llm=llm)
        ckpt.load_trained(model, checkpoint)
        lm = model.llm
        if hasattr(lm, "merge_and_unload"):
            lm = lm.merge_and_unload()
        lm.save_pretrained(str(out))
        tok.save_pretrained(str(out))
        log(f"merged {checkpoint} into {out}")
        return [(source["path"], out)]


def _pair_items(before: list[dict], after: list[dict]) -> list[dict]:
    """One row per test item with both predictions, worst (lowest ROUGE-L after tuning) first."""
    by_id = {row["id"]: row for row in before}
    rows = []
    for row in after:
        b = by_id.get(row["id"], {})
        rows.append(
            {
                "id": row["id"],
                "category": row["category"],
                "prompt": row["prompt"],
                "reference": row["reference"],
                "before": b.get("prediction"),
                "after": row["prediction"],
                "rougeL_before": round(b.get("rougeL", 0.0), 4),
                "rougeL_after": round(row["rougeL"], 4),
                "exact_after": row["exact"],
            }
        )
    rows.sort(key=lambda r: r["rougeL_after"])
    return rows


def _param_line(params: dict) -> str:
    t = params["total"]
    return f"parameters: {t['trainable']:,} trainable of {t['total']:,} ({100 * t['trainable'] / max(t['total'], 1):.3f}%)"


def _metric_line(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))


register_recipe(TextSFT())
