"""Every PNG chart modaltune draws, and the one helper that writes them: the report's training curve, metric bars
and seed spread, and the grouped before/after bars recipes add.

:func:`save_figure` is the only place a figure reaches the disk: atomically (a temporary file renamed into place, so
a reader never sees half a PNG), by rank 0 only under a launcher, and the figure is closed either way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modaltune.shared import dist
from modaltune.shared.curve import curve_series
from modaltune.shared.formatting import as_dict, finite
from modaltune.shared.io import atomic_write
from modaltune.shared.spread import metric_columns

MAX_METRIC_PLOTS = 12


def pyplot() -> Any:
    """pyplot on the non-interactive Agg backend."""
    # lazy: matplotlib takes ~0.5 s to import and sets a process-wide backend, so it loads when a chart is drawn
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Save a matplotlib figure as PNG atomically (rank 0 only under a launcher) and close it."""
    try:
        if dist.is_main():  # one writer per run under a launcher
            atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        pyplot().close(fig)
    return path


def _first_step(points: Mapping[str, list[tuple[float, float]]]) -> float:
    """The earliest (shifted) step of a stage's points."""
    return min(step for series in points.values() for step, _ in series)


def plot_training_curve(path: Path, curve: Any) -> Path | None:
    """Plot training loss (lines) and eval loss (markers) per stage, and below it the learning rate the Trainer logged
    (its first parameter group's: the schedule's shape); None when there is nothing to plot."""
    series = curve_series(curve)
    if not series:
        return None
    plt = pyplot()
    with_lr = any(points["learning_rate"] for points in series.values())
    fig, axes = plt.subplots(2 if with_lr else 1, 1, figsize=(8, 6.5 if with_lr else 4.5), sharex=True,
                             squeeze=False, gridspec_kw={"height_ratios": [3, 1.3] if with_lr else [1]})
    ax = axes[0][0]
    colours = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    for i, (stage, points) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        if i and len(series) > 1:
            for row in axes:
                row[0].axvline(_first_step(points), color=colour, linestyle=":", linewidth=1)
        if points["loss"]:
            xs, ys = zip(*points["loss"])
            marker = "." if len(xs) <= 30 else None  # a lone point would not show as a line
            ax.plot(xs, ys, color=colour, marker=marker, linewidth=1.4, label=f"{stage} loss")
        if points["eval_loss"]:
            xs, ys = zip(*points["eval_loss"])
            ax.plot(xs, ys, color=colour, marker="o", linestyle="--", label=f"{stage} eval_loss")
        if with_lr and points["learning_rate"]:
            xs, ys = zip(*points["learning_rate"])
            axes[1][0].plot(xs, ys, color=colour, linewidth=1.2, label=stage)
    ax.set_ylabel("loss")
    ax.set_title("Training curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if with_lr:
        axes[1][0].set_ylabel("learning rate")
        axes[1][0].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        axes[1][0].grid(alpha=0.3)
    axes[-1][0].set_xlabel("step (continued across stages)")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_metrics(path: Path, metrics: Mapping) -> Path | None:
    """One small bar chart per metric key (up to MAX_METRIC_PLOTS), one bar per column; None when nothing is numeric.

    Breakdown keys (``test/wer@<speaker>``) stay in the table only: the recipe that makes them plots them itself;
    so does a perplexity beside its loss (it is exp(loss): the same chart twice).
    """
    columns = metric_columns(metrics)
    keys = sorted({str(k) for values in columns.values() for k, v in values.items()
                   if finite(v) is not None and "@" not in str(k)})  # "wer@speaker": breakdowns, table only
    keys = [k for k in keys if not (k.endswith("perplexity") and k[: -len("perplexity")] + "loss" in keys)]
    keys = keys[:MAX_METRIC_PLOTS]
    if not keys:
        return None
    plt = pyplot()
    ncols = min(4, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), squeeze=False)
    names = list(columns)
    colours = [f"C{i % 10}" for i in range(len(names))]
    for ax, key in zip(axes.flat, keys):
        values = [finite(columns[name].get(key)) for name in names]
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(range(len(names)), heights, color=colours)
        for bar, value in zip(bars, values):
            if value is not None:
                ax.annotate(f"{value:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_title(key, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_seed_spread(path: Path, metrics: Mapping, runs: list[Mapping]) -> Path | None:
    """Per metric: the mean before and after tuning with a bar of +-1 std, and each seed's value as a dot."""
    after = as_dict(metrics.get("after_mean"))
    keys = sorted(k for k, v in after.items() if finite(v) is not None and "@" not in k)[:MAX_METRIC_PLOTS]
    if not keys:
        return None
    plt = pyplot()
    ncols = min(4, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for x, column in enumerate(("before", "after")):
            mean = finite(as_dict(metrics.get(f"{column}_mean")).get(key))
            if mean is None:
                continue
            std = finite(as_dict(metrics.get(f"{column}_std")).get(key)) or 0.0
            ax.bar(x, mean, yerr=std, color=f"C{x}", alpha=0.6, capsize=4)
            seeds = [finite(as_dict(run.get(column)).get(key)) for run in runs]
            seeds = [v for v in seeds if v is not None]
            ax.plot([x] * len(seeds), seeds, "k.", markersize=6)
            ax.annotate(f"{mean:.3g}±{std:.2g}", (x, mean), ha="center", va="bottom", fontsize=7)
        ax.set_xticks([0, 1], ["before", "after"], fontsize=8)
        ax.set_title(key, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(f"{len(runs)} seeds: mean ± std, one dot per seed", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def grouped_bars(path: Path, metrics: dict[str, dict[str, float]], keys: list[str], *, labels: list[str],
                 legend: dict[str, str], title: str, ylabel: str, rotate: bool = False) -> Path:
    """A grouped bar chart: one group per metric key, one bar per column of ``metrics`` named in ``legend``."""
    plt = pyplot()
    cols = [c for c in legend if c in metrics]
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(keys)), 3.6))
    width = 0.8 / max(len(cols), 1)
    for j, col in enumerate(cols):
        vals = [metrics[col].get(k, float("nan")) for k in keys]
        bars = ax.bar([i + j * width for i in range(len(keys))], vals, width, label=legend[col])
        ax.bar_label(bars, fmt="%.2f", fontsize=7 if rotate else 8)
    ax.set_xticks([i + width * (len(cols) - 1) / 2 for i in range(len(keys))], labels,
                  **({"rotation": 20, "ha": "right", "fontsize": 8} if rotate else {}))
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return save_figure(fig, path)
