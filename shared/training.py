"""Training on top of the transformers Trainer: per-component learning rates, stages, atomic checkpoints, resume.

Because the loop is the transformers Trainer, ``accelerate launch`` and ``torchrun`` scale it out (DDP, FSDP,
DeepSpeed) with no launcher of ours. What this module adds:

- per-component learning rates (one optimizer group per component, with and without weight decay);
- multi-stage training: a list of stages, each with its own data, trainable components and steps; weights carry
  over from stage to stage in memory and on disk;
- checkpoints in the modaltune format (every trained weight, atomic, ``COMPLETE`` marker) inside the Trainer's
  ``checkpoint-N`` folders, so ``resume`` restores weights, optimizer, scheduler, RNG and step count;
- a JSONL/CSV metrics log, TensorBoard, early stopping on validation loss.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from modaltune.shared import checkpoint as ckpt
from modaltune.shared import dist
from modaltune.shared.config import doc
from modaltune.shared.environment import bf16_matmul_kernel, cpu_flags
from modaltune.shared.errors import ConfigError
from modaltune.shared.guards import IndexedCollator, IndexedDataset
from modaltune.shared.io import atomic_write_json, atomic_write_text, iter_jsonl
from modaltune.shared.peft import lora_scale
from modaltune.shared.provenance import check_resume, data_fingerprint, run_identity
from modaltune.shared.tracking import check_report_to, trainer_report_to
from modaltune.shared.trainer import (STATE_FILE, CheckpointingMixin, EarlyStopping, MetricsLogger, ModaltuneTrainer,
                                      optimizer_state_mb)

# the Trainer and its callbacks live in modaltune.shared.trainer; importers of this module keep their names
__all__ = ["STATE_FILE", "CheckpointingMixin", "EarlyStopping", "MetricsLogger", "ModaltuneTrainer", "StageConfig",
           "StagePlan", "TrainConfig", "TrainResult", "autocast", "autocast_dtype", "compute_dtype", "lora_scale",
           "optimizer_state_mb", "resolve_precision", "run_stages", "write_metrics_csv"]


@dataclasses.dataclass
class TrainConfig:
    """Optimisation settings shared by every stage (a stage may override steps and lr)."""

    max_steps: int = doc(100, "optimizer steps per stage (a stage's own max_steps wins); -1: use epochs")
    epochs: float = doc(1.0, "epochs per stage when max_steps is -1")
    batch_size: int = doc(8, "examples per device per step")
    eval_batch_size: int = doc(8, "examples per device per evaluation batch")
    grad_accum: int = doc(1, "gradient accumulation steps")
    lr: float = doc(2e-4, "learning rate (components may set their own)")
    optimizer: Literal["adamw", "mezo"] = doc("adamw", "adamw | mezo (zeroth-order: two forward passes a step, no "
                                                       "backward, no optimizer state; see modaltune.shared.mezo)")
    mezo_eps: float = doc(1e-3, "mezo: size of the weight perturbation")
    weight_decay: float = doc(0.0, "AdamW weight decay (not applied to biases and norms)")
    warmup_ratio: float = doc(0.05, "fraction of steps spent warming the learning rate up")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = doc("cosine", "LR schedule")
    max_grad_norm: float = doc(1.0, "gradient clipping norm (0: off)")
    gradient_checkpointing: bool = doc(False, "recompute activations in backward to save memory")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = doc(
        "auto", "auto: bf16 autocast where the hardware has fast bf16 (recent GPUs; CPUs with AVX512-BF16/AMX)"
    )
    label_logits_only: bool = doc(True, "run the output layer only at labelled positions (same loss, less work)")
    eval_steps: int = doc(0, "evaluate validation loss every N steps (0: at the end of each stage)")
    early_stopping_patience: int = doc(0, "stop a stage after N evaluations without a better validation loss (0: off)")
    save_steps: int = doc(50, "write a resumable checkpoint every N steps")
    save_total_limit: int = doc(2, "keep at most N step checkpoints per stage")
    logging_steps: int = doc(5, "log training loss every N steps")
    seed: int = doc(42, "random seed (data order, initialisation, dropout)")
    num_workers: int = doc(0, "data loader worker processes")
    resume: bool = doc(False, "continue the run in --out from its last complete checkpoint (of the same run: same "
                              "config, seed, data and code version)")
    resume_from: str | None = doc(None, "start a new run from the trained weights of this checkpoint folder (a run's "
                                        "checkpoint, a stage's final or a checkpoint-N); optimizer and step start anew")
    nonfinite_patience: int = doc(0, "non-finite losses or gradient norms in a row whose update is skipped before the "
                                     "stage stops (0: stop at the first)")
    report_to: list[str] = doc(["tensorboard"], "experiment trackers: tensorboard, wandb, mlflow (optional packages), "
                                                "or none; they get the training curve and the before/after metrics")

    def validate(self, where: str) -> None:
        for name in ("batch_size", "eval_batch_size", "grad_accum", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be at least 1")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"{where}.max_steps must be positive, or -1 to train by epochs")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"{where}.warmup_ratio must be in [0, 1)")
        check_report_to(self.report_to, f"{where}.report_to")
        if self.optimizer == "mezo" and self.grad_accum != 1:
            raise ConfigError(f"{where}.grad_accum={self.grad_accum} with mezo: MeZO updates on every batch; raise "
                              f"{where}.batch_size instead")
        if self.mezo_eps <= 0:
            raise ConfigError(f"{where}.mezo_eps must be positive, got {self.mezo_eps}")
        if self.nonfinite_patience < 0:
            raise ConfigError(f"{where}.nonfinite_patience must be 0 or more, got {self.nonfinite_patience}")


@dataclasses.dataclass
class StageConfig:
    """One training stage as a recipe config declares it."""

    name: str = doc("train", "stage name (its checkpoints live under stages/NAME)")
    data: str = doc("train", "which of the recipe's data sets this stage trains on")
    max_steps: int | None = doc(None, "optimizer steps (null: train.max_steps)")
    lr: float | None = doc(None, "learning rate for this stage (null: train.lr)")
    components: list[str] | None = doc(None, "components that train in this stage (null: every trained one)")
    loss: str = doc("model", "model: the model's own loss | grounding: only the projector's word-grounding loss "
                             "(composed models with projector.word_grounding; the LLM does not run, so a step costs "
                             "about a projector pass)")

    def validate(self, where: str) -> None:
        if self.loss not in {"model", "grounding"}:
            raise ConfigError(f"{where}.loss must be model or grounding, got {self.loss!r}")


@dataclasses.dataclass
class StagePlan:
    """One training stage, ready to run."""

    name: str
    train_dataset: Any
    eval_dataset: Any | None = None
    components: list[str] | None = None  # trainable components in this stage (None: all trained ones)
    max_steps: int | None = None
    lr: float | None = None
    # another objective than the model's own loss (e.g. preference pairs): builds the stage's Trainer from the
    # TrainingArguments keywords and ModaltuneTrainer's; default: a ModaltuneTrainer
    trainer: Callable[..., Trainer] | None = None
    collator: Callable | None = None  # this stage's batches (default: run_stages' collator)


def resolve_precision(precision: str, device: torch.device | str | None = None) -> str:
    """Pick fp32/bf16/fp16; ``auto`` takes bf16 where the hardware runs it fast."""
    if precision != "auto":
        if precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("train.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    cap = torch.backends.cpu.get_cpu_capability()
    flags = cpu_flags()
    if not ("avx512_bf16" in flags or "amx_bf16" in flags or cap in {"AVX512_BF16", "AMX"}):
        return "fp32"
    # the CPU has bf16 instructions; take bf16 only if oneDNN uses them (ONEDNN_MAX_CPU_ISA, or a VM that does not
    # grant AMX state, can leave it on an emulating kernel that is many times slower than fp32)
    kernel = bf16_matmul_kernel()
    return "bf16" if kernel is None or "bf16" in kernel or "amx" in kernel else "fp32"


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype quantised layers compute in for a resolved precision: bf16 under bf16, else float32."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None: no autocast, float32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast(precision: str, device: torch.device | str):
    """The autocast context that matches a resolved training precision (a no-op for fp32)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


@dataclasses.dataclass
class TrainResult:
    """What training produced: the metrics log rows, per-stage summaries, the final checkpoint folder."""

    rows: list[dict]
    stages: list[dict]
    checkpoint: Path


def run_stages(
    model: Any,
    stages: list[StagePlan],
    cfg: TrainConfig,
    *,
    run_dir: Path,
    collator: Callable,
    component_lrs: dict[str, float],
    checkpoint_meta: dict,
    tokenizer: Any = None,
    callbacks: list[TrainerCallback] | None = None,
    after_stage: Callable[[StagePlan], None] | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``model`` through ``stages`` in order and write the final checkpoint to ``run_dir/checkpoint``.

    With ``cfg.resume`` a finished stage is loaded instead of retrained and an unfinished one continues from its
    last usable ``checkpoint-N`` (same step count, optimizer and scheduler state; a newer incomplete or damaged one
    is skipped with a ``log`` line naming it). ``after_stage(stage)`` runs after each stage (e.g. an evaluation),
    with the model holding that stage's weights.
    """
    run_dir = Path(run_dir)
    log_path = run_dir / "metrics.jsonl"
    main = dist.is_main()  # under a launcher rank 0 writes the run's files; the Trainer shards the data
    rows = _start_log(log_path, cfg.resume, main)
    precision = resolve_precision(cfg.precision)
    config = checkpoint_meta.get("config") or {}
    identity = run_identity(config, {stage.name: data_fingerprint(stage.train_dataset) for stage in stages})
    checkpoint_meta = {**checkpoint_meta, "run": identity}
    if cfg.resume_from:
        _start_from(model, Path(cfg.resume_from), log)
    run = _Run(model=model, cfg=cfg, log_path=log_path, rows=rows, main=main, precision=precision, config=config,
               identity=identity, checkpoint_meta=checkpoint_meta, collator=collator, component_lrs=component_lrs,
               callbacks=callbacks or [], log=log)
    summaries = []
    for stage in stages:
        stage_dir = run_dir / "stages" / stage.name
        final = stage_dir / "final"
        if cfg.resume and ckpt.problem(final) is None:
            check_resume(final, ckpt.read_meta(final), config, identity)
            ckpt.load_trained(model, final)
            log(f"resume: stage {stage.name!r} finished earlier; loaded {final}")
            summaries.append({"stage": stage.name, "resumed": "finished earlier, loaded", "steps": None})
        else:
            summaries.append(_train_stage(run, stage, stage_dir))
            if main:
                ckpt.save_checkpoint(model, final, meta={**checkpoint_meta, "stage": stage.name})
            dist.barrier()
        if after_stage is not None:
            after_stage(stage)
    model.set_stage_trainable(None)
    final_dir = run_dir / "checkpoint"
    if main:
        ckpt.save_checkpoint(model, final_dir, meta=checkpoint_meta, tokenizer=tokenizer)
        write_metrics_csv(rows, run_dir / "metrics.csv")
        atomic_write_json(run_dir / "stages.json", summaries)
    dist.barrier()
    return TrainResult(rows=rows, stages=summaries, checkpoint=final_dir)


@dataclasses.dataclass
class _Run:
    """What every stage of one :func:`run_stages` call shares."""

    model: Any
    cfg: TrainConfig
    log_path: Path
    rows: list[dict]  # the metrics log; MetricsLogger appends to this very list
    main: bool
    precision: str
    config: dict
    identity: dict
    checkpoint_meta: dict
    collator: Callable
    component_lrs: dict[str, float]
    callbacks: list[TrainerCallback]
    log: Callable[[str], None]


def _start_log(log_path: Path, resume: bool, main: bool) -> list[dict]:
    """The metrics log's rows: those of the run being resumed, or none (an old log is removed)."""
    rows: list[dict] = []
    if resume and log_path.exists():
        rows = [row for _, row in iter_jsonl(log_path)]
    elif log_path.exists() and main:
        log_path.unlink()
    return rows


def _train_stage(run: _Run, stage: StagePlan, stage_dir: Path) -> dict:
    """Train one stage (from its last usable checkpoint when resuming); returns its summary."""
    cfg, model = run.cfg, run.model
    drawn = model.set_stage_trainable(stage.components, draw=f"{cfg.seed}:{stage.name}")
    resume_from = _resume_point(run, stage, stage_dir)
    prior_loss_sum = _prior_loss_sum(resume_from)
    if cfg.resume:  # steps logged after the last complete checkpoint are trained (and logged) again
        done = int(resume_from.name.split("-")[1]) if resume_from else 0
        run.rows[:] = [r for r in run.rows if r.get("stage") != stage.name or r.get("step", 0) <= done]
        if run.main:
            atomic_write_text(run.log_path, "".join(json.dumps(r, default=float) + "\n" for r in run.rows))
    evaluate = stage.eval_dataset is not None
    arguments = _training_arguments(cfg, stage, stage_dir, run.precision, evaluate)
    stage_callbacks: list[TrainerCallback] = [MetricsLogger(run.log_path, stage.name, run.rows), *run.callbacks]
    for state in model.peft_states:  # a PEFT method's per-step hooks (e.g. DyLoRA's rank drawn per step)
        stage_callbacks += state.callbacks(cfg.seed)
    if cfg.early_stopping_patience > 0 and evaluate and cfg.eval_steps > 0:
        stage_callbacks.append(EarlyStopping(cfg.early_stopping_patience))
    if cfg.optimizer == "mezo":
        if stage.trainer is not None:
            raise ConfigError(f"train.optimizer=mezo: stage {stage.name!r} trains with its own objective (e.g. "
                              "preference pairs), which MeZO does not drive; use adamw for it")
        for state in model.peft_states:
            state.check_optimizer(cfg.optimizer)
        arguments["max_grad_norm"] = 0.0  # there are no gradients to clip
        arguments["fp16"] = False  # no backward, so no loss scaler: fp16 is the forward's autocast alone
    # our own trainers see each item's position, so a non-finite step can name its batch's items
    named = stage.trainer is None
    trainer = (stage.trainer or (_mezo_trainer(cfg.mezo_eps, run.precision) if cfg.optimizer == "mezo"
                                 else _modaltune_trainer))(
        model=model,
        arguments=arguments,
        train_dataset=IndexedDataset(stage.train_dataset) if named else stage.train_dataset,
        eval_dataset=stage.eval_dataset,
        data_collator=IndexedCollator(stage.collator or run.collator) if named else stage.collator or run.collator,
        callbacks=stage_callbacks,
        component_lrs=run.component_lrs,
        checkpoint_meta={**run.checkpoint_meta, "stage": stage.name},
        keep_checkpoints=max(cfg.save_total_limit, 1),
        prior_loss_sum=prior_loss_sum,
    )
    trainer.nonfinite_patience, trainer.stage_name, trainer.stage_dir = cfg.nonfinite_patience, stage.name, stage_dir
    trainer.log_line = run.log
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return _stage_summary(run, stage, trainer, output, resume_from, prior_loss_sum, drawn)


def _resume_point(run: _Run, stage: StagePlan, stage_dir: Path) -> Path | None:
    """The step checkpoint a resumed stage continues from (None: it starts at step 0), checked to be this run's."""
    resume_from = ckpt.latest_checkpoint(stage_dir, log=run.log) if run.cfg.resume else None
    if resume_from is not None:
        check_resume(resume_from, ckpt.read_meta(resume_from), run.config, run.identity)
        run.log(f"resume: stage {stage.name!r} continues from {resume_from} (step "
                f"{resume_from.name.split('-')[1]} of {stage.max_steps or run.cfg.max_steps})")
    elif run.cfg.resume:
        run.log(f"resume: stage {stage.name!r} has no complete checkpoint in {stage_dir}; it starts at step 0")
    return resume_from


def _training_arguments(cfg: TrainConfig, stage: StagePlan, stage_dir: Path, precision: str,
                        evaluate: bool) -> dict[str, Any]:
    """The stage's ``TrainingArguments`` keywords."""
    max_steps = stage.max_steps if stage.max_steps is not None else cfg.max_steps
    steps_for_warmup = max_steps if max_steps > 0 else 0
    return dict(
        output_dir=str(stage_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=stage.lr if stage.lr is not None else cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=int(cfg.warmup_ratio * steps_for_warmup) if steps_for_warmup else cfg.warmup_ratio,
        lr_scheduler_type=cfg.scheduler,
        max_grad_norm=cfg.max_grad_norm if cfg.max_grad_norm > 0 else 0.0,
        max_steps=max_steps,
        num_train_epochs=cfg.epochs,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=None,  # rotated by ModaltuneTrainer once a new checkpoint is complete
        eval_strategy="steps" if evaluate and cfg.eval_steps > 0 else "no",
        eval_steps=cfg.eval_steps if cfg.eval_steps > 0 else None,
        prediction_loss_only=True,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=cfg.num_workers,
        remove_unused_columns=False,
        ddp_find_unused_parameters=True,  # a stage may leave trained weights without a gradient (what the Trainer
        # assumes for a model that is not a PreTrainedModel; a composed model is one)
        report_to=trainer_report_to(cfg.report_to),
        disable_tqdm=False,
        save_only_model=False,
        use_cpu=not torch.cuda.is_available(),
    )


def _stage_summary(run: _Run, stage: StagePlan, trainer: Trainer, output: Any, resume_from: Path | None,
                   prior_loss_sum: float, drawn: dict[str, dict]) -> dict:
    """A trained stage's row of ``stages.json``."""
    steps = trainer.state.global_step
    trained_now = steps - (int(resume_from.name.split("-")[1]) if resume_from else 0)
    summary = {
        "stage": stage.name,
        "steps": steps,
        # the mean over every step of the stage, those trained before a resume included
        "train_loss": (prior_loss_sum + output.training_loss * trained_now) / steps if steps else None,
        "train_seconds": output.metrics.get("train_runtime"),
        "resumed_from": str(resume_from) if resume_from else None,
        "precision": run.precision,
        "optimizer_state_mb": round(optimizer_state_mb(trainer.optimizer), 3) if trainer.optimizer else None,
    }
    for state in run.model.peft_states:  # a PEFT method's own figures (HFT's draw, DyLoRA's ranks drawn)
        summary.update(state.summary(drawn, run.cfg.seed, steps))
    if stage.eval_dataset is not None:  # the evaluation of the last step, if the schedule made one, else one now
        done = [r["eval_loss"] for r in run.rows if r.get("stage") == stage.name and "eval_loss" in r
                and r.get("step") == trainer.state.global_step]
        summary["eval_loss"] = done[-1] if done else trainer.evaluate().get("eval_loss")
    return summary


def _modaltune_trainer(*, arguments: dict[str, Any], **kwargs) -> ModaltuneTrainer:
    return ModaltuneTrainer(args=TrainingArguments(**arguments), **kwargs)


def _mezo_trainer(eps: float, precision: str) -> Callable[..., Trainer]:
    from modaltune.shared.mezo import MeZOTrainer  # lazy: a real cycle (mezo imports this module's trainer)

    return lambda *, arguments, **kwargs: MeZOTrainer(args=TrainingArguments(**arguments), mezo_eps=eps,
                                                      precision=precision, **kwargs)


def _start_from(model: Any, path: Path, log: Callable[[str], None]) -> None:
    """``train.resume_from``: load another checkpoint's trained weights into ``model`` before a new run trains."""
    why = ckpt.problem(path)
    if why is not None:
        raise ConfigError(f"train.resume_from={str(path)!r} is not a usable checkpoint: {why}; give a run's "
                          "'checkpoint' folder, a stage's 'final' or a complete checkpoint-N")
    ckpt.load_trained(model, path)
    meta = ckpt.read_meta(path)
    log(f"resume_from: a new run starts from the trained weights of {path} (recipe {meta.get('recipe')!r}, stage "
        f"{meta.get('stage', 'all')!r}, seed {(meta.get('config') or {}).get('train', {}).get('seed')}); optimizer "
        "and step count start anew")


def _prior_loss_sum(checkpoint: Path | None) -> float:
    """The training-loss sum a step checkpoint recorded (0 for none, or one written before it was recorded)."""
    if checkpoint is None or not (checkpoint / STATE_FILE).is_file():
        return 0.0
    return float(json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8")).get("loss_sum", 0.0))


def write_metrics_csv(rows: list[dict], path: Path) -> None:
    """The metrics log as CSV (one column per key seen)."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
