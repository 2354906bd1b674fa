"""text-multitask: one LoRA adapter per task, combined by cat / linear / svd / ties / dare, against one adapter
trained on every task.

Reads like a table of contents: build the LM with its adapter, split the instruction data into tasks by category,
train one adapter per task and one on all of them (each from the same initial adapter), combine the task adapters
by each method, then score every task with every adapter: none, each task's own, each combination, the joint one.
"""

from __future__ import annotations

import dataclasses
import shutil
from typing import Any, Literal

import torch

from modaltune.recipes.text_sft import TextSFT, _param_line
from modaltune.shared.combine import CombineConfig, combine_folders
from modaltune.shared.config import doc, to_dict
from modaltune.shared.errors import ConfigError
from modaltune.shared.harness import metric_line, pair_items, timed
from modaltune.shared.lm import ModelConfig
from modaltune.shared.peft import ComponentConfig, method_of, registered_methods
from modaltune.shared.plots import grouped_bars
from modaltune.shared.recipe import RunContext, register_recipe
from modaltune.shared.training import StagePlan, TrainConfig, resolve_precision, run_stages
from modaltune.text.data import InstructionDataConfig, PadCollator, PromptFormatter
from modaltune.text.eval import GenerationEvalConfig, measure_tasks

RESERVED = ("before", "joint", "cat", "linear", "svd", "ties", "dare")


@dataclasses.dataclass
class TasksConfig:
    """Which tasks get an adapter, and the score a combination must keep."""

    names: list[str] = doc(["abbreviation", "lab", "discharge"], "data categories, one adapter each")
    score: Literal["rougeL", "exact_match"] = doc("rougeL", "the per-task score compared across adapters")
    keep: float = doc(0.9, "target: the first combination method keeps this fraction of each task's own score")
    joint_max_steps: int | None = doc(None, "steps of the adapter trained on every task (null: train.max_steps "
                                            "times the number of tasks, the task adapters' steps together)")


@dataclasses.dataclass
class TextMultitaskConfig:
    """Schema of ``recipes/configs/text-multitask.yaml``."""

    model: ModelConfig = doc(ModelConfig, "the causal LM")
    llm: ComponentConfig = doc(ComponentConfig, "each adapter (lora, dora, qlora, lora8bit; rank, targets, lr)")
    data: InstructionDataConfig = doc(InstructionDataConfig, "instruction data with a category per example")
    tasks: TasksConfig = doc(TasksConfig, "the tasks")
    combine: CombineConfig = doc(CombineConfig, "how the task adapters are combined")
    train: TrainConfig = doc(TrainConfig, "optimisation of each task adapter (max_steps: per task)")
    eval: GenerationEvalConfig = doc(GenerationEvalConfig, "generation for evaluation")
    quick: dict[str, Any] = doc({}, "dotted-key overrides applied by --quick")

    def validate(self, where: str) -> None:
        if not method_of(self.llm).lora_family:
            raise ConfigError(f"llm.method={self.llm.method}: combining adapters needs a LoRA-family method "
                              f"({', '.join(sorted(m.name for m in registered_methods() if m.lora_family))})")
        if len(set(self.tasks.names)) < 2 or len(set(self.tasks.names)) != len(self.tasks.names):
            raise ConfigError(f"tasks.names needs two or more distinct categories, got {self.tasks.names}")
        if clash := [t for t in self.tasks.names if t in RESERVED]:
            raise ConfigError(f"tasks.names {clash} clash with report columns; rename those categories")
        if self.combine.weights is not None and len(self.combine.weights) != len(self.tasks.names):
            raise ConfigError(f"combine.weights has {len(self.combine.weights)} values for "
                              f"{len(self.tasks.names)} tasks; give one per task or null")


class TextMultitask(TextSFT):
    """Task adapters trained apart and combined in weight space, scored per task against a jointly trained one."""

    name = "text-multitask"
    description = "one LoRA per task, combined (cat/linear/svd/ties/dare) vs. one LoRA on all tasks; per-task scores"
    config_cls = TextMultitaskConfig
    config_file = "text-multitask.yaml"

    def run(self, cfg: TextMultitaskConfig, ctx: RunContext) -> None:
        report, names = ctx.report, cfg.tasks.names
        with timed(report, "setup_seconds"):
            model, tok, source, sets, _ = self.prepare(cfg, ctx)
            ctx.log(_param_line(report["parameters"]))
        found = sorted({ex.category for ex in sets["train"].examples})
        split = {t: {s: sets[s].subset(lambda ex, t=t: ex.category == t) for s in sets} for t in names}
        if missing := [t for t in names if not len(split[t]["train"]) or not len(split[t]["test"])]:
            raise ConfigError(f"tasks {missing} have no training or test examples in {cfg.data.source}; its "
                              f"categories: {found}")
        ctx.log("tasks: " + ", ".join(f"{t} {len(split[t]['train'])} train / {len(split[t]['test'])} test"
                                      for t in names))
        in_tasks = lambda ex: ex.category in names  # noqa: E731
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        curve, stages, folders = [], [], {}
        steps = {**{t: cfg.train.max_steps for t in names},
                 "joint": cfg.tasks.joint_max_steps or (cfg.train.max_steps * len(names) if cfg.train.max_steps > 0
                                                        else -1)}  # by epochs: one pass over every task's data
        with timed(report, "train_seconds"):
            for label in [*names, "joint"]:
                with torch.no_grad():  # every adapter starts from the same initial adapter
                    for n, p in model.named_parameters():
                        if n in start:
                            p.copy_(start[n])
                train = split[label]["train"] if label != "joint" else sets["train"].subset(in_tasks)
                val = split[label]["validation"] if label != "joint" else sets["validation"].subset(in_tasks)
                ctx.log(f"training the {label} adapter: {len(train)} examples, "
                        + (f"{steps[label]} steps" if steps[label] > 0 else f"{cfg.train.epochs:g} epochs"))
                result = run_stages(
                    model, [StagePlan(label, train, val if len(val) else None, max_steps=steps[label])], cfg.train,
                    run_dir=ctx.run_dir / "adapters" / label, collator=PadCollator(tok.pad_token_id),
                    component_lrs={"llm": cfg.llm.lr} if cfg.llm.lr else {}, tokenizer=tok, log=ctx.log,
                    checkpoint_meta={"recipe": self.name, "config": to_dict(cfg), "model_source": source,
                                     "prompt_style": report["model"]["prompt_style"], "task": label})
                curve += result.rows
                stages += result.stages
                folders[label] = result.checkpoint / "adapter" / "llm"
        report["training"] = {"stages": stages, "curve": curve}
        report["adapters"] = {label: str(f.parent.parent) for label, f in folders.items()}
        combos = {}
        with timed(report, "combine_seconds"):
            for how in cfg.combine.methods:
                out = ctx.run_dir / "combined" / how
                shutil.rmtree(out, ignore_errors=True)  # derived from the adapters: rebuilt on every run
                combos[how] = combine_folders([str(folders[t]) for t in names], out, weights=cfg.combine.weights,
                                              how=how, rank=cfg.combine.rank, density=cfg.combine.density,
                                              seed=cfg.combine.seed, log=ctx.log).report
                folders[how] = out
        report["combinations"] = {how: {k: r[k] for k in ("weights", "output", "relative_error", "max_module_error",
                                                          "max_truncation_error")} | {"folder": str(folders[how])}
                                  for how, r in combos.items()}
        self._score(cfg, ctx, model, tok, sets["test"].subset(in_tasks), folders)

    def _score(self, cfg: TextMultitaskConfig, ctx: RunContext, model, tok, test, folders) -> None:
        """Every task scored with no adapter, each task's own, each combination and the joint one."""
        report, names, score = ctx.report, cfg.tasks.names, cfg.tasks.score
        formatter = PromptFormatter(tok, cfg.model.template, cfg.data.train_on)
        precision = resolve_precision(cfg.train.precision)
        columns, items = {}, {}
        peft_model = model.llm
        with timed(report, "eval_seconds"):
            for label in ["before", *folders]:
                measure = lambda: measure_tasks(model, tok, test, formatter, cfg.eval, names,  # noqa: E731
                                                batch_size=cfg.train.eval_batch_size, precision=precision,
                                                label=label)
                if label == "before":
                    with peft_model.disable_adapter():
                        columns[label], items[label] = measure()
                else:
                    peft_model.load_adapter(str(folders[label]), adapter_name=f"eval-{label}")
                    peft_model.set_adapter(f"eval-{label}")
                    try:
                        columns[label], items[label] = measure()
                    finally:
                        peft_model.set_adapter("default")
                        peft_model.delete_adapter(f"eval-{label}")
                ctx.log(f"{label:>12s}: " + metric_line(columns[label], lambda k: k.endswith(score)))
        own = {t: columns[t].get(f"{t}/{score}", 0.0) for t in names}
        for label in [*cfg.combine.methods, "joint"]:
            for t in names:
                if own[t] > 0:
                    columns[label][f"{t}/kept"] = columns[label].get(f"{t}/{score}", 0.0) / own[t]
        report["metrics"] = columns
        primary = cfg.combine.methods[0]
        scored = [t for t in names if own[t] > 0] or names  # a task its own adapter scores 0 on says nothing
        worst = min(scored, key=lambda t: columns[primary].get(f"{t}/kept", 0.0))
        kept = columns[primary].get(f"{worst}/kept", 0.0)
        met = kept >= cfg.tasks.keep and len(scored) == len(names)
        report["target"] = {"method": primary, "keep": cfg.tasks.keep, "worst_task": worst, "kept": kept, "met": met,
                            "unscored": [t for t in names if own[t] <= 0]}
        report["notes"] = [
            f"{primary} keeps {kept:.1%} of {worst}'s own-adapter {score} (the worst task; target "
            f"{cfg.tasks.keep:.0%}: {'met' if met else 'not met'})"
            + (f"; own adapter scores 0 on {report['target']['unscored']}" if report["target"]["unscored"] else ""),
            "columns: before = no adapter; a task's name = that task's own adapter; cat/linear/svd/ties/dare = the "
            "task adapters combined; joint = one adapter trained on every task; TASK/kept = score / own score"]
        ctx.log(report["notes"][0])
        plot = ctx.run_dir / "tasks.png"
        grouped_bars(plot, columns, [f"{t}/{score}" for t in names], labels=names,
                     legend={c: c for c in columns}, title=f"test {score} per task", ylabel=score)
        report["plots"] = [{"title": f"Per-task {score} by adapter", "path": plot.name}]
        report["items"] = pair_items(items, key=("id",), keep=("category", "prompt", "reference"),
                                     value="prediction")


register_recipe(TextMultitask())
