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

import csv
import dataclasses
import errno
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from modaltune.shared import checkpoint as ckpt
from modaltune.shared import dist
from modaltune.shared.config import CROSS_CHECKS, doc
from modaltune.shared.environment import bf16_matmul_kernel, cpu_flags
from modaltune.shared.errors import ConfigError, ModaltuneError
from modaltune.shared.guards import IndexedCollator, IndexedDataset, NonFiniteGuard
from modaltune.shared.loss import IGNORE_INDEX
from modaltune.shared.provenance import check_resume, data_fingerprint, run_identity
from modaltune.shared.io import (WriteFailure, as_os_error, atomic_write_json, atomic_write_text, free_bytes,
                                 iter_jsonl, write_failure)
from modaltune.shared.tracking import check_report_to, trainer_report_to

STATE_FILE = "modaltune_state.json"  # in a step checkpoint: the stage's training-loss sum so far


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


def _mezo_refuses_dylora(cfg: Any) -> None:
    """MeZO's update moves every trainable weight along its perturbation, including the DyLoRA ranks a step masks."""
    if getattr(getattr(cfg, "train", None), "optimizer", None) != "mezo" or not dataclasses.is_dataclass(cfg):
        return
    for f in dataclasses.fields(cfg):
        if getattr(getattr(cfg, f.name), "method", None) == "dylora":
            raise ConfigError(f"train.optimizer=mezo with {f.name}.method=dylora: MeZO's update would move the "
                              f"ranks a step does not use; train DyLoRA with adamw, or use {f.name}.method=lora")


CROSS_CHECKS.append(_mezo_refuses_dylora)


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
    import contextlib

    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


class CheckpointingMixin(NonFiniteGuard):
    """Modaltune checkpoints for any transformers Trainer (ours, or a library's such as trl's ``DPOTrainer``), and the
    non-finite guard (:class:`modaltune.shared.guards.NonFiniteGuard`) that keeps NaN out of them.

    ``owner`` is the modaltune model whose trained weights the checkpoints hold; it defaults to the Trainer's model
    and differs when the Trainer trains an inner module (a library trainer given the wrapped Hugging Face model).
    """

    def __init__(
        self,
        *args: Any,
        checkpoint_meta: dict | None = None,
        keep_checkpoints: int = 2,
        prior_loss_sum: float = 0.0,
        owner: Any = None,
        **kwargs,
    ) -> None:
        self.checkpoint_meta = checkpoint_meta or {}
        self.keep_checkpoints = keep_checkpoints
        self.prior_loss_sum = prior_loss_sum  # training-loss sum of the steps before a resume
        self._saving_step = False
        self.owner = owner
        super().__init__(*args, **kwargs)
        if self.owner is None:
            self.owner = self.model

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            # inside a step checkpoint the marker comes after the Trainer's own files (see _save_checkpoint)
            ckpt.save_checkpoint(self.owner, output_dir, meta=self.checkpoint_meta, mark_complete=not self._saving_step)
            atomic_write_text(Path(output_dir) / "training_args.json", self.args.to_json_string())

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        # The Trainer writes weights, optimizer, scheduler, RNG and trainer_state.json; the COMPLETE marker, which
        # lists every file with its size and hash, is written after all of them. Old checkpoints are rotated only
        # then, so a kill at any moment leaves a complete checkpoint to resume from.
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"checkpoint-{self.state.global_step}"
        self._saving_step = True
        try:
            super()._save_checkpoint(model, trial)
        except Exception as exc:  # noqa: BLE001 - torch.save reports a full disk as "RuntimeError: ... write failed"
            error = exc.os_error if isinstance(exc, WriteFailure) else as_os_error(exc, folder)
            if error is None and not (isinstance(exc, RuntimeError) and "write failed" in str(exc).lower()):
                raise
            ckpt.discard(folder)  # half written: never resumed from; its space comes back
            done = ckpt.latest_checkpoint(run_dir)  # the size of a complete one, else weights + optimizer state
            needed = ckpt.folder_bytes(done) if done is not None else ckpt.state_bytes(
                self.owner.trained_state_dict()) + int(optimizer_state_mb(self.optimizer) * 2**20 if self.optimizer else 0) + 2**16
            if error is None:
                error = OSError(errno.ENOSPC if (free_bytes(run_dir) or 0) < needed else errno.EIO, str(exc),
                                str(folder))
            raise write_failure(error, run_dir, needed=needed) from exc
        finally:
            self._saving_step = False
        if self.args.should_save and folder.is_dir():
            atomic_write_json(folder / STATE_FILE, {"step": self.state.global_step, "loss_sum": self.loss_sum()})
            ckpt.write_marker(folder)
            ckpt.rotate(run_dir, self.keep_checkpoints)

    def loss_sum(self) -> float:
        """Sum of the per-step training losses of this stage so far, steps before a resume included."""
        pending = getattr(self, "_tr_loss", None)
        pending = float(pending.item()) if isinstance(pending, torch.Tensor) else 0.0
        return self.prior_loss_sum + float(getattr(self, "_total_loss_scalar", 0.0)) + pending

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        ckpt.load_trained(self.owner, resume_from_checkpoint)

    def _issue_warnings_after_load(self, load_result: Any) -> None:  # keys are checked by load_trained
        return None


def lora_scale(model: torch.nn.Module, param_name: str) -> float:
    """The LoRA scale (alpha / r, or alpha / sqrt(r) for rsLoRA) of the layer a ``lora_A``/``lora_B`` weight is in."""
    layer, _, rest = param_name.rpartition(".lora_")
    return float(model.get_submodule(layer).scaling[rest.split(".")[1]])


def optimizer_state_mb(optimizer: Any) -> float:
    """Megabytes of tensors the optimizer keeps between steps (Adam's moments, ...)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    return sum(t.numel() * t.element_size() for state in inner.state.values() for t in state.values()
               if isinstance(t, torch.Tensor)) / 2 ** 20


class ModaltuneTrainer(CheckpointingMixin, Trainer):
    """The transformers Trainer with component learning rates, modaltune checkpoints and a token-weighted
    validation loss."""

    _uses_gradients = True  # False for gradient-free trainers (MeZO): a plain optimizer carries their learning rates

    def __init__(self, *args: Any, component_lrs: dict[str, float] | None = None, **kwargs) -> None:
        self.component_lrs = component_lrs or {}
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        model = self.model
        decay_names = set(self.get_decay_parameter_names(model))
        fixed = getattr(model, "fixed_factors", set()) if self._uses_gradients else set()
        params = dict(model.named_parameters())
        groups: dict[tuple[str, bool], dict[str, Any]] = {}
        for name, param in params.items():
            if not param.requires_grad:
                continue
            comp = model.component_of(name) or "other"
            decay = name in decay_names
            group = groups.setdefault(
                (comp, decay),
                {
                    "params": [],
                    "lr": self.component_lrs.get(comp, self.args.learning_rate),
                    "weight_decay": self.args.weight_decay if decay else 0.0,
                    "component": comp,
                    **({"names": [], "scaling_factors": []} if fixed else {}),
                },
            )
            partner = name.replace(".lora_B.", ".lora_A.")
            if fixed and partner in fixed:  # LoRA-FA: the optimizer takes each fixed A just before its B
                scale = lora_scale(model, name)
                group["params"] += [params[partner], param]
                group["names"] += [partner, name]
                group["scaling_factors"] += [scale, scale]
            else:
                group["params"].append(param)
                if fixed:
                    group["names"].append(name)
                    group["scaling_factors"].append(None)
        if not groups:
            raise ModaltuneError("nothing to train: every component is frozen in this stage")
        if fixed:
            from peft.optimizers.lorafa import LoraFAOptimizer

            self.optimizer = LoraFAOptimizer(list(groups.values()), betas=(self.args.adam_beta1, self.args.adam_beta2),
                                             eps=self.args.adam_epsilon)
            return self.optimizer
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(list(groups.values()), **optimizer_kwargs)
        return self.optimizer

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> dict:
        """Validation loss as the report measures it: the mean over every labelled token of the whole split.

        The Trainer's own loop averages per-batch means (and, under a launcher, each rank's shard padded to equal
        size), which gives a second, different validation loss for the same split. Here every rank runs the whole
        split in order on its unwrapped model (no collective inside), so the training curve's last evaluation and
        the report's ``validation/loss`` are one figure.
        """
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        model, size = self.model, self.args.per_device_eval_batch_size
        shifted = getattr(model, "shifted_labels", True)
        was_training = model.training
        model.eval()
        total, tokens = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(dataset), size):
                batch = self._prepare_inputs(self.data_collator(
                    [dataset[i] for i in range(start, min(start + size, len(dataset)))]))
                labels = batch["labels"][:, 1:] if shifted else batch["labels"]
                n = int((labels != IGNORE_INDEX).sum())
                with self.compute_loss_context_manager():
                    loss = model(**batch)["loss"]
                total += float(loss) * n
                tokens += n
        model.train(was_training)
        metrics = {f"{metric_key_prefix}_loss": total / max(tokens, 1)}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

class MetricsLogger(TrainerCallback):
    """Appends every Trainer log line (with its stage) to ``metrics.jsonl``; keeps the rows for plots."""

    def __init__(self, path: Path, stage: str, rows: list[dict]) -> None:
        self.path = path
        self.stage = stage
        self.rows = rows

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102
        if not logs or not state.is_world_process_zero:
            return
        row = {"stage": self.stage, "step": state.global_step, "epoch": state.epoch, **logs}
        self.rows.append(row)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, default=float) + "\n")


class EarlyStopping(TrainerCallback):
    """Stops a stage after ``patience`` evaluations without a lower ``eval_loss``."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best = math.inf
        self.bad = 0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # noqa: D102
        loss = (metrics or {}).get("eval_loss")
        if loss is None:
            return
        if loss < self.best - 1e-6:
            self.best, self.bad = loss, 0
        else:
            self.bad += 1
            if self.bad >= self.patience:
                control.should_training_stop = True


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
    rows: list[dict] = []
    main = dist.is_main()  # under a launcher rank 0 writes the run's files; the Trainer shards the data
    if cfg.resume and log_path.exists():
        rows = [row for _, row in iter_jsonl(log_path)]
    elif log_path.exists() and main:
        log_path.unlink()
    precision = resolve_precision(cfg.precision)
    config = checkpoint_meta.get("config") or {}
    identity = run_identity(config, {stage.name: data_fingerprint(stage.train_dataset) for stage in stages})
    checkpoint_meta = {**checkpoint_meta, "run": identity}
    if cfg.resume_from:
        _start_from(model, Path(cfg.resume_from), log)
    summaries = []
    for stage in stages:
        stage_dir = run_dir / "stages" / stage.name
        final = stage_dir / "final"
        if cfg.resume and ckpt.problem(final) is None:
            check_resume(final, ckpt.read_meta(final), config, identity)
            ckpt.load_trained(model, final)
            log(f"resume: stage {stage.name!r} finished earlier; loaded {final}")
            summaries.append({"stage": stage.name, "resumed": "finished earlier, loaded", "steps": None})
            if after_stage is not None:
                after_stage(stage)
            continue
        drawn = model.set_stage_trainable(stage.components, draw=f"{cfg.seed}:{stage.name}")
        resume_from = ckpt.latest_checkpoint(stage_dir, log=log) if cfg.resume else None
        if resume_from is not None:
            check_resume(resume_from, ckpt.read_meta(resume_from), config, identity)
            log(f"resume: stage {stage.name!r} continues from {resume_from} (step "
                f"{resume_from.name.split('-')[1]} of {stage.max_steps or cfg.max_steps})")
        elif cfg.resume:
            log(f"resume: stage {stage.name!r} has no complete checkpoint in {stage_dir}; it starts at step 0")
        prior_loss_sum = _prior_loss_sum(resume_from)
        if cfg.resume:  # steps logged after the last complete checkpoint are trained (and logged) again
            done = int(resume_from.name.split("-")[1]) if resume_from else 0
            rows[:] = [r for r in rows if r.get("stage") != stage.name or r.get("step", 0) <= done]
            if main:
                atomic_write_text(log_path, "".join(json.dumps(r, default=float) + "\n" for r in rows))
        max_steps = stage.max_steps if stage.max_steps is not None else cfg.max_steps
        steps_for_warmup = max_steps if max_steps > 0 else 0
        evaluate = stage.eval_dataset is not None
        arguments = dict(
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
            ddp_find_unused_parameters=True,  # a stage may leave trained weights without a gradient (what the
            # Trainer assumes for a model that is not a PreTrainedModel; a composed model is one)
            report_to=trainer_report_to(cfg.report_to),
            disable_tqdm=False,
            save_only_model=False,
            use_cpu=not torch.cuda.is_available(),
        )
        stage_callbacks: list[TrainerCallback] = [MetricsLogger(log_path, stage.name, rows), *(callbacks or [])]
        nested = getattr(model, "nested", None)
        if nested is not None:  # DyLoRA: a rank drawn per step
            from modaltune.shared.dylora import NestedRankCallback

            nested_callback = NestedRankCallback(nested, cfg.seed)
            stage_callbacks.append(nested_callback)
        if cfg.early_stopping_patience > 0 and evaluate and cfg.eval_steps > 0:
            stage_callbacks.append(EarlyStopping(cfg.early_stopping_patience))
        if cfg.optimizer == "mezo":
            if stage.trainer is not None:
                raise ConfigError(f"train.optimizer=mezo: stage {stage.name!r} trains with its own objective (e.g. "
                                  "preference pairs), which MeZO does not drive; use adamw for it")
            if nested is not None:
                raise ConfigError("train.optimizer=mezo with a dylora component: MeZO's update would move the ranks "
                                  "a step does not use; train DyLoRA with adamw, or use lora with mezo")
            arguments["max_grad_norm"] = 0.0  # there are no gradients to clip
            arguments["fp16"] = False  # no backward, so no loss scaler: fp16 is the forward's autocast alone
        # our own trainers see each item's position, so a non-finite step can name its batch's items
        named = stage.trainer is None
        trainer = (stage.trainer or (_mezo_trainer(cfg.mezo_eps, precision) if cfg.optimizer == "mezo"
                                     else _modaltune_trainer))(
            model=model,
            arguments=arguments,
            train_dataset=IndexedDataset(stage.train_dataset) if named else stage.train_dataset,
            eval_dataset=stage.eval_dataset,
            data_collator=IndexedCollator(stage.collator or collator) if named else stage.collator or collator,
            callbacks=stage_callbacks,
            component_lrs=component_lrs,
            checkpoint_meta={**checkpoint_meta, "stage": stage.name},
            keep_checkpoints=max(cfg.save_total_limit, 1),
            prior_loss_sum=prior_loss_sum,
        )
        trainer.nonfinite_patience, trainer.stage_name, trainer.stage_dir = cfg.nonfinite_patience, stage.name, stage_dir
        trainer.log_line = log
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        steps = trainer.state.global_step
        trained_now = steps - (int(resume_from.name.split("-")[1]) if resume_from else 0)
        summary = {
            "stage": stage.name,
            "steps": steps,
            # the mean over every step of the stage, those trained before a resume included
            "train_loss": (prior_loss_sum + output.training_loss * trained_now) / steps if steps else None,
            "train_seconds": output.metrics.get("train_runtime"),
            "resumed_from": str(resume_from) if resume_from else None,
            "precision": precision,
            "optimizer_state_mb": round(optimizer_state_mb(trainer.optimizer), 3) if trainer.optimizer else None,
            **({"half_fine_tuning": drawn} if drawn else {}),
            **({"dylora_ranks_drawn": nested_callback.counts(steps)} if nested is not None else {}),
        }
        if evaluate:  # the evaluation of the last step, if the schedule made one, else one now
            done = [r["eval_loss"] for r in rows if r.get("stage") == stage.name and "eval_loss" in r
                    and r.get("step") == trainer.state.global_step]
            summary["eval_loss"] = done[-1] if done else trainer.evaluate().get("eval_loss")
        summaries.append(summary)
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


def _modaltune_trainer(*, arguments: dict[str, Any], **kwargs) -> ModaltuneTrainer:
    return ModaltuneTrainer(args=TrainingArguments(**arguments), **kwargs)


def _mezo_trainer(eps: float, precision: str) -> Callable[..., Trainer]:
    from modaltune.shared.mezo import MeZOTrainer

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
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
