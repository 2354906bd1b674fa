"""Experiment trackers: where the training curve goes (TensorBoard, Weights & Biases, MLflow) and the run's
before/after metrics with it.

The transformers Trainer streams the training curve to each tracker in ``train.report_to`` through its own
integrations; :func:`log_results` adds what the Trainer never sees, the evaluation before and after tuning, so a
tracker's dashboard compares runs on the figures the report gives. Offline settings are the trackers' own
(``WANDB_MODE=offline``, a local ``MLFLOW_TRACKING_URI``): modaltune never turns a tracker online.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from modaltune.shared.errors import ConfigError

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_report_to(names: list[str], where: str = "train.report_to") -> None:
    """Fail before any work when a tracker is unknown or its package is missing (with the install line)."""
    for name in names:
        if name == "none":
            if len(names) > 1:
                raise ConfigError(f"{where}: 'none' cannot be combined with other trackers")
            continue
        if name not in TRACKERS:
            raise ConfigError(f"{where}: unknown tracker {name!r}; choose from {', '.join([*TRACKERS, 'none'])}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(f"{where} includes {name!r} but the {TRACKERS[name]} package is not installed: "
                              f"pip install {TRACKERS[name]} (or remove it from {where})")


def trainer_report_to(names: list[str]) -> list[str]:
    """The Trainer's ``report_to`` for ``train.report_to``."""
    return [n for n in names if n != "none"]


def log_results(names: list[str], run_dir: str | Path, metrics: dict[str, Any], *, run_name: str) -> list[str]:
    """Log the report's metric columns (``before``, ``after``, ...) to each tracker, as ``COLUMN/KEY`` scalars; then
    close the run the Trainer opened (W&B). Returns the trackers written to.

    TensorBoard: ``run_dir/tensorboard`` (``tensorboard --logdir RUN_DIR`` shows it with the training curves). W&B:
    the summary of the run the Trainer logged to (a new one, named ``run_name``, if none is open). MLflow: the active
    run, or a new one named ``run_name``.
    """
    flat = {f"{column}/{key}": float(value) for column, values in metrics.items() if isinstance(values, dict)
            for key, value in values.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
    written = []
    for name in trainer_report_to(names):
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
            for key, value in flat.items():
                writer.add_scalar(key, value, 0)
            writer.close()
        elif name == "wandb":
            import wandb

            run = wandb.run or wandb.init(name=run_name, dir=str(run_dir))
            run.summary.update(flat)
            run.finish()
        elif name == "mlflow":
            import mlflow

            active = mlflow.active_run()
            if active is None:
                with mlflow.start_run(run_name=run_name):
                    mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in flat.items()})
            else:
                mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in flat.items()})
        written.append(name)
    return written
