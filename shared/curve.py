"""The training curve of a report: per-stage loss series and the overfitting notices read from them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from modaltune.shared.formatting import as_list, finite

RISE = 0.05  # an evaluation loss this far (relative) above its best of the stage has risen
GAP = 1.5  # an evaluation loss this many times the training loss sits far above it


def curve_series(curve: Any) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Split curve rows into per-stage (step, value) points for ``loss`` and ``eval_loss``.

    Stages keep the order they first appear in. When a stage's steps restart at or below where the previous stage
    ended, they are shifted so steps continue across stages. Rows without a numeric step are ignored, and so are
    missing or non-finite values.

    Args:
        curve: The ``training.curve`` rows.

    Returns:
        ``{stage: {"loss": [(step, value), ...], "eval_loss": [...], "learning_rate": [...]}}`` for stages with
        at least one loss point.
    """
    by_stage: dict[str, list[Mapping]] = {}
    for row in as_list(curve):
        if isinstance(row, Mapping) and finite(row.get("step")) is not None:
            by_stage.setdefault(str(row.get("stage") or "train"), []).append(row)
    series: dict[str, dict[str, list[tuple[float, float]]]] = {}
    end = None
    for stage, rows in by_stage.items():
        steps = [finite(row["step"]) for row in rows]
        offset = end if end is not None and min(steps) <= end else 0.0
        points = {key: _points(rows, key, offset) for key in ("loss", "eval_loss", "learning_rate")}
        if points["loss"] or points["eval_loss"]:
            series[stage] = points
        end = max(steps) + offset
    return series


def training_notices(curve: Any) -> list[str]:
    """Overfitting signs in a training curve, one sentence per stage that shows them:

    - the evaluation loss rose: its last value is more than 5% above the best of the stage (the best step named);
    - the evaluation loss sits far above the training loss: at the stage's last evaluation it is over 1.5 times the
      mean training loss of the steps logged since the previous evaluation (and at least 0.1 higher).
    """
    notes = []
    for stage, points in curve_series(curve).items():
        evals, losses = points["eval_loss"], points["loss"]
        if not evals:
            continue
        best_step, best = min(evals, key=lambda p: p[1])
        last_step, last = evals[-1]
        if last > best * (1 + RISE) and last_step > best_step:
            notes.append(f"Overfitting ({stage}): the evaluation loss rose from {best:.4f} at step {best_step:g} to "
                         f"{last:.4f} at step {last_step:g}; fewer steps, a lower learning rate or more data would "
                         "help (train.early_stopping_patience stops at the best evaluation).")
            continue
        since = evals[-2][0] if len(evals) > 1 else -math.inf
        recent = [v for step, v in losses if since < step <= last_step] or [v for _, v in losses[-5:]]
        if recent:
            train = sum(recent) / len(recent)
            if last > GAP * train and last - train >= 0.1:
                notes.append(f"Possible overfitting ({stage}): the evaluation loss {last:.4f} is "
                             f"{last / train:.1f} times the training loss {train:.4f} at step {last_step:g}; the "
                             "model fits its training data much better than held-out data.")
    return notes


def _points(rows: list[Mapping], key: str, offset: float) -> list[tuple[float, float]]:
    """(shifted step, value) pairs of one key over the rows that have a finite value for it."""
    out = []
    for row in rows:
        value = finite(row.get(key))
        if value is not None:
            out.append((finite(row["step"]) + offset, value))
    return out
