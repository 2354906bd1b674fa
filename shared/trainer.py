"""The Trainer modaltune trains with: modaltune checkpoints inside the Trainer's, per-component learning rates, a
token-weighted validation loss, and the callbacks of a stage (metrics log, early stopping).

:func:`modaltune.shared.training.run_stages` builds one per stage.
"""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from modaltune.shared import checkpoint as ckpt
from modaltune.shared.errors import ModaltuneError
from modaltune.shared.guards import NonFiniteGuard
from modaltune.shared.io import WriteFailure, as_os_error, atomic_write_json, atomic_write_text, free_bytes, write_failure
from modaltune.shared.loss import token_weighted_loss

STATE_FILE = "modaltune_state.json"  # in a step checkpoint: the stage's training-loss sum so far


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
        """One optimizer group per component (with and without weight decay), at the component's learning rate.

        A PEFT method whose state owns the optimizer (LoRA-FA's fixed ``A``: ``MethodState.owns_optimizer``) builds
        it and places each parameter in its group; gradient-free trainers (MeZO) always use the plain one.
        """
        if self.optimizer is not None:
            return self.optimizer
        model = self.model
        decay_names = set(self.get_decay_parameter_names(model))
        owner = next((s for s in getattr(model, "peft_states", []) if s.owns_optimizer),
                     None) if self._uses_gradients else None
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
                    **(owner.group_keys() if owner is not None else {}),
                },
            )
            if owner is not None:
                owner.add_param(group, model, name, param, params)
            else:
                group["params"].append(param)
        if not groups:
            raise ModaltuneError("nothing to train: every component is frozen in this stage")
        if owner is not None:
            self.optimizer = owner.build_optimizer(list(groups.values()), self.args)
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
        was_training = model.training
        model.eval()
        chunks = (range(start, min(start + size, len(dataset))) for start in range(0, len(dataset), size))
        batches = (self._prepare_inputs(self.data_collator([dataset[i] for i in chunk])) for chunk in chunks)
        metrics = {f"{metric_key_prefix}_loss": token_weighted_loss(model, batches, self.compute_loss_context_manager)}
        model.train(was_training)
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
