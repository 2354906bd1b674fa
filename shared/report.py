"""Run reports for every recipe: ``report.json``, ``report.md``, ``report.html``, PNG plots and ``items.jsonl``.

A recipe collects what it knows about a run into one plain dict and calls :func:`write_report`. Every key except
``recipe`` and ``status`` is optional and any section may be empty, so a run that failed early still gets a report
that shows its error.

The Markdown and HTML files are rendered from the same list of blocks (heading, table, code, image, bullets,
alert), so both always hold the same sections. The HTML file is self-contained: CSS inline, every PNG embedded as
base64.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modaltune.shared.errors import ModaltuneError

import yaml

from modaltune.shared.io import atomic_write

MAX_ITEMS_SHOWN = 50
MAX_CELL_CHARS = 300
MAX_METRIC_PLOTS = 12

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
ITEMS_JSONL = "items.jsonl"
CURVE_PNG = "training_curve.png"
METRICS_PNG = "metrics.png"


# --------------------------------------------------------------------------------------------------- blocks


@dataclass
class Heading:
    """A section heading."""

    text: str
    level: int = 2


@dataclass
class Table:
    """A table of already formatted cells (plain text; escaping happens when rendering)."""

    headers: list[str]
    rows: list[list[str]]


@dataclass
class Code:
    """A preformatted block, e.g. the config as YAML."""

    text: str
    lang: str = ""


@dataclass
class Image:
    """A picture: ``ref`` is what Markdown links to, ``path`` is the file the HTML embeds."""

    title: str
    ref: str
    path: Path


@dataclass
class Bullets:
    """A bullet list."""

    items: list[str] = field(default_factory=list)


@dataclass
class Alert:
    """A prominent error box: a short title over the (possibly multi-line) message."""

    title: str
    text: str


@dataclass
class Para:
    """A plain paragraph."""

    text: str


Block = Heading | Table | Code | Image | Bullets | Alert | Para


# --------------------------------------------------------------------------------------------------- public API


def write_report(run_dir: str | Path, report: dict) -> dict[str, Path]:
    """Write the report files of one run into ``run_dir``.

    Writes ``items.jsonl`` (when there are items), ``training_curve.png`` and ``metrics.png`` (when there is data to
    plot), then ``report.md``, ``report.html`` and ``report.json``. Every file is written atomically. The caller's
    dict is not modified; ``report.json`` holds it unchanged plus a ``files`` key (kind -> file name in run_dir)
    and, when the training curve shows overfitting, a ``notices`` list (:func:`training_notices`).

    Args:
        run_dir: Folder to write into; created when missing.
        report: The run's report dict (see the module docs of the recipes; only ``recipe`` and ``status`` are
            expected, every other key may be missing or empty).

    Returns:
        The written files by kind: ``json``, ``md``, ``html`` and, when written, ``items``, ``training_curve``,
        ``metrics``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    items = _as_list(report.get("items"))
    if items:
        files["items"] = _write_items(run_dir / ITEMS_JSONL, items)
    curve = _plot_training_curve(run_dir / CURVE_PNG, _as_dict(report.get("training")).get("curve"))
    if curve:
        files["training_curve"] = curve
    runs = [run for run in _as_list(report.get("runs")) if isinstance(run, Mapping)]
    if runs:
        metrics_png = _plot_seed_spread(run_dir / METRICS_PNG, _as_dict(report.get("metrics")), runs)
    else:
        metrics_png = _plot_metrics(run_dir / METRICS_PNG, _as_dict(report.get("metrics")))
    if metrics_png:
        files["metrics"] = metrics_png
    notices = training_notices(_as_dict(report.get("training")).get("curve"))
    report = {**report, "notices": notices} if notices else report
    blocks = build_blocks(report, run_dir, files)
    files["md"] = _write_text(run_dir / REPORT_MD, render_markdown(blocks))
    files["html"] = _write_text(run_dir / REPORT_HTML, render_html(blocks, _title(report)))
    files["json"] = run_dir / REPORT_JSON
    payload = dict(report)
    payload["files"] = {kind: path.name for kind, path in files.items()}
    _write_text(files["json"], json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n")
    return files


STATS = ("mean", "std", "min", "max", "worst")
LOWER_IS_BETTER = ("loss", "perplexity", "wer", "cer", "rtf", "seconds", "error")


def lower_is_better(key: str) -> bool:
    """Whether a smaller value of metric ``key`` (``"<split>/<name>[@<group>]"``) is the better one.

    Example:
        >>> lower_is_better("test/wer@en-us"), lower_is_better("validation/loss"), lower_is_better("test/accuracy")
        (True, True, False)
    """
    name = key.rsplit("/", 1)[-1].split("@", 1)[0].lower()
    return any(word in name for word in LOWER_IS_BETTER)


def seed_metrics(runs: Sequence[Mapping]) -> dict[str, dict[str, float]]:
    """Spread over seeds of every metric column of several runs' ``report.json`` dicts.

    For each column (``before``, ``after``, ``prompted`` ...) and key: ``<column>_mean``, ``_std`` (sample standard
    deviation, 0 for one run), ``_min``, ``_max`` and ``_worst`` (``_max`` for metrics where lower is better, see
    :func:`lower_is_better`). A key counts only the runs that report it. ``before`` and ``after`` also hold the means,
    so tables and :func:`compare_reports` read a summary like a single run.

    Example:
        >>> runs = [{"metrics": {"after": {"test/acc": a, "test/loss": l}}} for a, l in ((0.9, 1.0), (0.8, 2.0))]
        >>> m = seed_metrics(runs)
        >>> round(m["after_mean"]["test/acc"], 4), round(m["after_std"]["test/acc"], 4), m["after_worst"]["test/loss"]
        (0.85, 0.0707, 2.0)
    """
    values: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for column, metrics in metric_columns(_as_dict(run.get("metrics"))).items():
            for key, value in metrics.items():
                number = _finite(value)
                if number is not None:
                    values.setdefault(column, {}).setdefault(str(key), []).append(number)
    out: dict[str, dict[str, float]] = {}
    for column, by_key in values.items():
        for key, xs in by_key.items():
            mean = sum(xs) / len(xs)
            std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
            stats = {"mean": mean, "std": std, "min": min(xs), "max": max(xs)}
            stats["worst"] = stats["max"] if lower_is_better(key) else stats["min"]
            for stat, value in stats.items():
                out.setdefault(f"{column}_{stat}", {})[key] = value
    for column in ("before", "after"):
        if f"{column}_mean" in out:
            out[column] = dict(out[f"{column}_mean"])
    return out


def compare_reports(a: dict, b: dict, stat: str = "mean") -> dict[str, tuple[float | None, float | None]]:
    """Pair up the final metrics of two loaded ``report.json`` dicts, single runs or seed summaries.

    Args:
        a: First report.
        b: Second report.
        stat: For a seed summary (``modaltune run --seeds``), which statistic of ``metrics.after_<stat>`` to take:
            mean, std, min, max or worst. A single run is its own mean, min, max and worst, with no std.

    Returns:
        Every key of the union of both reports' metrics (sorted) mapped to (value in a, value in b); a value is None
        where the report lacks the key or it is not a number.

    Example:
        >>> a = {"metrics": {"after": {"val/acc": 0.5, "val/loss": 1.0}}}
        >>> b = {"metrics": {"after": {"val/acc": 0.75}}}
        >>> compare_reports(a, b)
        {'val/acc': (0.5, 0.75), 'val/loss': (1.0, None)}
        >>> seeds = {"metrics": {"after_worst": {"val/acc": 0.7}, "after_std": {"val/acc": 0.05}}}
        >>> compare_reports(a, seeds, "worst")["val/acc"], compare_reports(a, seeds, "std")["val/acc"]
        ((0.5, 0.7), (None, 0.05))
    """
    if stat not in STATS:
        raise ModaltuneError(f"stat must be one of {', '.join(STATS)}, got {stat!r}")
    after_a, after_b = _after(a, stat), _after(b, stat)
    return {key: (_to_float(after_a.get(key)), _to_float(after_b.get(key))) for key in sorted({*after_a, *after_b})}


def _after(report: Mapping, stat: str) -> dict:
    metrics = _as_dict(report.get("metrics"))
    if f"after_{stat}" in metrics:
        return _as_dict(metrics[f"after_{stat}"])
    return {} if stat == "std" else _as_dict(metrics.get("after"))


# --------------------------------------------------------------------------------------------------- small helpers


def _as_dict(value: Any) -> dict:
    """The value when it is a mapping, else an empty dict."""
    return dict(value) if isinstance(value, Mapping) else {}


def _as_list(value: Any) -> list:
    """The value when it is a list or tuple, else an empty list."""
    return list(value) if isinstance(value, (list, tuple)) else []


def _to_float(value: Any) -> float | None:
    """The value as a finite-or-not float when it is a real number (bools excluded), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _finite(value: Any) -> float | None:
    """The value as a float when it is a finite number, else None."""
    number = _to_float(value)
    return number if number is not None and math.isfinite(number) else None


def _title(report: Mapping) -> str:
    """Document title: recipe and status."""
    return f"{report.get('recipe') or 'run'} — {report.get('status') or 'unknown'}"


def fmt_number(value: Any) -> str:
    """A metric value for a table: 4 decimals, scientific when very small or large, text for non-numbers."""
    number = _to_float(value)
    if number is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(number):
        return str(number)
    if number != 0 and (abs(number) < 1e-3 or abs(number) >= 1e6):
        return f"{number:.3e}"
    return f"{number:.4f}"


def fmt_delta(before: Any, after: Any) -> str:
    """``after - before`` with a sign, or empty when either is not a number."""
    b, a = _finite(before), _finite(after)
    if a is None or b is None:
        return ""
    delta = a - b
    if delta != 0 and (abs(delta) < 1e-3 or abs(delta) >= 1e6):
        return f"{delta:+.3e}"
    return f"{delta:+.4f}"


def human_count(n: Any) -> str:
    """A parameter count such as 1.2M, 3.4B or 950."""
    number = _to_float(n)
    if number is None:
        return "" if n is None else str(n)
    for threshold, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(number) >= threshold:
            return f"{number / threshold:.1f}{suffix}"
    return f"{number:g}"


def human_seconds(seconds: Any) -> str:
    """A duration such as 1h 02m 03s, 4m 05s or 12.3s."""
    number = _finite(seconds)
    if number is None:
        return ""
    if number < 60:
        return f"{number:.1f}s"
    minutes, secs = divmod(int(round(number)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _cell(value: Any) -> str:
    """Any item value as one table cell: strings as they are, others as JSON, cut to MAX_CELL_CHARS."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    if len(text) > MAX_CELL_CHARS:
        text = text[: MAX_CELL_CHARS - 1] + "…"
    return text


def _to_plain(value: Any) -> Any:
    """The value with every non-JSON type turned into a string, so yaml.safe_dump accepts it."""
    return json.loads(json.dumps(value, ensure_ascii=False, default=str))


# --------------------------------------------------------------------------------------------------- files


def _write_text(path: Path, text: str) -> Path:
    """Atomically write UTF-8 text."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _write_items(path: Path, items: list) -> Path:
    """Write every item as one JSON line."""
    lines = [json.dumps(item, ensure_ascii=False, default=str) for item in items]
    return _write_text(path, "\n".join(lines) + "\n")


def _save_figure(fig: Any, path: Path) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def _pyplot() -> Any:
    """pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------------------------------- training curve


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
    for row in _as_list(curve):
        if isinstance(row, Mapping) and _finite(row.get("step")) is not None:
            by_stage.setdefault(str(row.get("stage") or "train"), []).append(row)
    series: dict[str, dict[str, list[tuple[float, float]]]] = {}
    end = None
    for stage, rows in by_stage.items():
        steps = [_finite(row["step"]) for row in rows]
        offset = end if end is not None and min(steps) <= end else 0.0
        points = {key: _points(rows, key, offset) for key in ("loss", "eval_loss", "learning_rate")}
        if points["loss"] or points["eval_loss"]:
            series[stage] = points
        end = max(steps) + offset
    return series


RISE = 0.05  # an evaluation loss this far (relative) above its best of the stage has risen
GAP = 1.5  # an evaluation loss this many times the training loss sits far above it


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
        value = _finite(row.get(key))
        if value is not None:
            out.append((_finite(row["step"]) + offset, value))
    return out


def _first_step(points: Mapping[str, list[tuple[float, float]]]) -> float:
    """The earliest (shifted) step of a stage's points."""
    return min(step for series in points.values() for step, _ in series)


def _plot_training_curve(path: Path, curve: Any) -> Path | None:
    """Plot training loss (lines) and eval loss (markers) per stage, and below it the learning rate the Trainer logged
    (its first parameter group's: the schedule's shape); None when there is nothing to plot."""
    series = curve_series(curve)
    if not series:
        return None
    plt = _pyplot()
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
    return _save_figure(fig, path)


# --------------------------------------------------------------------------------------------------- metrics


def metric_columns(metrics: Mapping) -> dict[str, dict]:
    """The metric columns in the order given (e.g. before, after, prompted), each a flat key -> value dict."""
    return {str(name): _as_dict(values) for name, values in metrics.items() if isinstance(values, Mapping)}


def metrics_table(metrics: Mapping) -> Table | None:
    """One row per metric key (sorted union), one column per metric column, plus a delta when before and after exist."""
    columns = metric_columns(metrics)
    keys = sorted({str(key) for values in columns.values() for key in values})
    if not keys:
        return None
    with_delta = "before" in columns and "after" in columns
    headers = ["metric", *columns] + (["Δ after−before"] if with_delta else [])
    rows = []
    for key in keys:
        row = [key, *(fmt_number(values.get(key)) for values in columns.values())]
        if with_delta:
            row.append(fmt_delta(columns["before"].get(key), columns["after"].get(key)))
        rows.append(row)
    return Table(headers, rows)


def _plot_metrics(path: Path, metrics: Mapping) -> Path | None:
    """One small bar chart per metric key (up to MAX_METRIC_PLOTS), one bar per column; None when nothing is numeric.

    Breakdown keys (``test/wer@<speaker>``) stay in the table only: the recipe that makes them plots them itself;
    so does a perplexity beside its loss (it is exp(loss): the same chart twice).
    """
    columns = metric_columns(metrics)
    keys = sorted({str(k) for values in columns.values() for k, v in values.items()
                   if _finite(v) is not None and "@" not in str(k)})  # "wer@speaker": breakdowns, table only
    keys = [k for k in keys if not (k.endswith("perplexity") and k[: -len("perplexity")] + "loss" in keys)]
    keys = keys[:MAX_METRIC_PLOTS]
    if not keys:
        return None
    plt = _pyplot()
    ncols = min(4, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), squeeze=False)
    names = list(columns)
    colours = [f"C{i % 10}" for i in range(len(names))]
    for ax, key in zip(axes.flat, keys):
        values = [_finite(columns[name].get(key)) for name in names]
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
    return _save_figure(fig, path)


def _plot_seed_spread(path: Path, metrics: Mapping, runs: list[Mapping]) -> Path | None:
    """Per metric: the mean before and after tuning with a bar of +-1 std, and each seed's value as a dot."""
    after = _as_dict(metrics.get("after_mean"))
    keys = sorted(k for k, v in after.items() if _finite(v) is not None and "@" not in k)[:MAX_METRIC_PLOTS]
    if not keys:
        return None
    plt = _pyplot()
    ncols = min(4, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for x, column in enumerate(("before", "after")):
            mean = _finite(_as_dict(metrics.get(f"{column}_mean")).get(key))
            if mean is None:
                continue
            std = _finite(_as_dict(metrics.get(f"{column}_std")).get(key)) or 0.0
            ax.bar(x, mean, yerr=std, color=f"C{x}", alpha=0.6, capsize=4)
            seeds = [_finite(_as_dict(run.get(column)).get(key)) for run in runs]
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
    return _save_figure(fig, path)


# --------------------------------------------------------------------------------------------------- sections


def build_blocks(report: Mapping, run_dir: Path, files: Mapping[str, Path]) -> list[Block]:
    """All report sections, in display order, as renderer-neutral blocks.

    Args:
        report: The run's report dict.
        run_dir: Folder the report lives in (relative extra plot paths are resolved against it).
        files: Plots already written by :func:`write_report`, by kind.

    Returns:
        The blocks of the whole document.
    """
    blocks: list[Block] = [Heading(_title(report), level=1)]
    blocks += _error_blocks(report)
    blocks += _summary_blocks(report)
    blocks += [Alert("Notice", str(n)) for n in _as_list(report.get("notices"))]
    blocks += _notes_blocks(report.get("notes"))
    blocks += _metrics_blocks(_as_dict(report.get("metrics")), files)
    blocks += _seeds_blocks(_as_list(report.get("runs")))
    blocks += _training_blocks(_as_dict(report.get("training")), files)
    blocks += _parameters_blocks(_as_dict(report.get("parameters")))
    blocks += _data_blocks(_as_dict(report.get("data")))
    blocks += _simple_table_blocks("Timing", report.get("timing"), ["name", "seconds", "duration"], _timing_row)
    blocks += _simple_table_blocks("Memory", report.get("memory"), ["name", "MB", "GB"], _memory_row)
    blocks += _simple_table_blocks("Environment", report.get("environment"), ["field", "value"],
                                   lambda name, value: [str(name), _cell(value)])
    blocks += _items_blocks(_as_list(report.get("items")))
    blocks += _plots_blocks(report.get("plots"), run_dir)
    blocks += _config_blocks(report.get("config"))
    return blocks


def _seeds_blocks(runs: list) -> list[Block]:
    """One row per seed of a ``--seeds`` summary: its status, folder and final metrics."""
    rows = [run for run in runs if isinstance(run, Mapping)]
    if not rows:
        return []
    keys = sorted({str(k) for run in rows for k in _as_dict(run.get("after")) if "@" not in str(k)})
    table = Table(["seed", "status", "run folder", *keys],
                  [[str(run.get("seed")), str(run.get("status")), str(run.get("run_dir")),
                    *(fmt_number(_as_dict(run.get("after")).get(key)) for key in keys)] for run in rows])
    return [Heading("Seeds"), Para("Each seed is one full run of the recipe (data order, initialisation, dropout); "
                                   "the held-out data are the same for all. A target counts as met when the worst "
                                   "seed meets it."), table]


def _error_blocks(report: Mapping) -> list[Block]:
    """The error box for a failed run (or any run that carries an error)."""
    error = report.get("error")
    failed = report.get("status") == "failed"
    blocks = []
    if report.get("regression"):
        blocks.append(Alert("Regressed: the tuned model measures worse than before tuning", str(report["regression"])))
    if error:
        blocks.append(Alert("Run failed" if failed else "Error", str(error)))
    elif failed:
        blocks.append(Alert("Run failed", "no error message recorded"))
    return blocks


def _summary_blocks(report: Mapping) -> list[Block]:
    """Recipe, status, command, run folder, times and model facts as a two-column table."""
    rows = [[key, str(report[key])] for key in ("recipe", "status", "command", "run_dir", "started_at", "finished_at")
            if report.get(key) not in (None, "")]
    rows += [[f"model.{key}", str(value)] for key, value in _as_dict(report.get("model")).items()]
    return [Heading("Summary"), Table(["field", "value"], rows)] if rows else []


def _notes_blocks(notes: Any) -> list[Block]:
    """The notes as a bullet list."""
    items = [str(note) for note in _as_list(notes)]
    return [Heading("Notes"), Bullets(items)] if items else []


SEED_COLUMNS = ("before", "after", "after_std", "after_worst", "after_min", "after_max")


def _metrics_blocks(metrics: Mapping, files: Mapping[str, Path]) -> list[Block]:
    """The metrics table and its plot (for a seed summary: means, spread and worst seed)."""
    spread = "after_std" in metrics
    table = metrics_table({k: metrics[k] for k in SEED_COLUMNS if k in metrics} if spread else metrics)
    if table is None:
        return []
    blocks: list[Block] = [Heading("Metrics"), table]
    if spread:
        blocks.append(Para("before and after are means over the seeds; after_std is their sample standard "
                           "deviation, after_worst the worst seed's value (the highest where lower is better)."))
    if "metrics" in files:
        blocks.append(Image("Metrics", files["metrics"].name, files["metrics"]))
    return blocks


def _training_blocks(training: Mapping, files: Mapping[str, Path]) -> list[Block]:
    """The stage table and the training curve."""
    stages = [stage for stage in _as_list(training.get("stages")) if isinstance(stage, Mapping)]
    blocks: list[Block] = []
    if stages:
        blocks.append(_dict_rows_table(stages))
    if "training_curve" in files:
        blocks.append(Image("Training curve", files["training_curve"].name, files["training_curve"]))
    return [Heading("Training"), *blocks] if blocks else []


def _parameters_blocks(parameters: Mapping) -> list[Block]:
    """Trainable and total parameter counts per component, with the trainable percentage."""
    rows = []
    for component, counts in parameters.items():
        counts = _as_dict(counts)
        trainable, total = _to_float(counts.get("trainable")), _to_float(counts.get("total"))
        percent = f"{100 * trainable / total:.3f}%" if trainable is not None and total else ""
        rows.append([str(component), human_count(counts.get("trainable")), human_count(counts.get("total")), percent])
    return [Heading("Parameters"), Table(["component", "trainable", "total", "% trainable"], rows)] if rows else []


def _data_blocks(data: Mapping) -> list[Block]:
    """Kept, capped and skipped examples per split: items a size cap left out are counted apart from those that could
    not be used, whose reasons are given by count with the first items named."""
    rows = []
    for split, info in data.items():
        info = _as_dict(info)
        reasons = sorted(_as_dict(info.get("skip_reasons")).items(), key=lambda kv: -(_finite(kv[1]) or 0))
        named = _as_dict(info.get("skipped_items"))
        parts = []
        for reason, count in reasons:
            names = [str(n) for n in (named.get(reason) or [])]
            more = " ..." if names and (_finite(count) or 0) > len(names) else ""
            parts.append(f"{reason}: {count}" + (f" ({', '.join(names)}{more})" if names else ""))
        caps = _as_dict(info.get("cap_reasons"))
        capped = fmt_count(info.get("capped")) + (f" ({', '.join(caps)})" if caps else "") if info.get("capped") else "0"
        rows.append([str(split), fmt_count(info.get("kept")), capped, fmt_count(info.get("skipped")), "; ".join(parts)])
    if not rows:
        return []
    return [Heading("Data"), Table(["split", "kept", "left out by a size cap (--quick, max_*)", "skipped",
                                    "skip reasons (first items; all in skipped.jsonl)"], rows)]


def fmt_count(value: Any) -> str:
    """An integer count with thousands separators, or its text when not a number."""
    number = _to_float(value)
    if number is None:
        return "" if value is None else str(value)
    return f"{int(number):,}" if number.is_integer() else str(value)


def _timing_row(name: Any, seconds: Any) -> list[str]:
    """One timing table row."""
    number = _finite(seconds)
    return [str(name), f"{number:,.2f}" if number is not None else str(seconds), human_seconds(seconds)]


def _memory_row(name: Any, megabytes: Any) -> list[str]:
    """One memory table row."""
    mb = _finite(megabytes)
    return [str(name), f"{mb:,.1f}" if mb is not None else str(megabytes), f"{mb / 1024:.2f}" if mb is not None else ""]


def _simple_table_blocks(title: str, section: Any, headers: list[str], row: Any) -> list[Block]:
    """A name -> value section as a small table built by ``row(name, value)``."""
    rows = [row(name, value) for name, value in _as_dict(section).items()]
    return [Heading(title), Table(headers, rows)] if rows else []


def _dict_rows_table(rows: Sequence[Mapping]) -> Table:
    """A table whose columns are the union of the rows' keys, in first-seen order; cells cut to MAX_CELL_CHARS."""
    headers: list[str] = []
    for row in rows:
        headers += [str(key) for key in row if str(key) not in headers]
    by_text = [{str(k): v for k, v in row.items()} for row in rows]
    return Table(headers, [[_stat_cell(row[key]) if key in row else "" for key in headers] for row in by_text])


def _stat_cell(value: Any) -> str:
    """A cell of a table of figures: floats rounded as metrics are, nothing for a missing value."""
    if value is None:
        return ""
    if isinstance(value, float):
        return fmt_number(value)
    return _cell(value)


def _items_blocks(items: list) -> list[Block]:
    """The first MAX_ITEMS_SHOWN items (the caller orders them, worst first) as a table."""
    shown = [item if isinstance(item, Mapping) else {"value": item} for item in items[:MAX_ITEMS_SHOWN]]
    if not shown:
        return []
    note = f"Showing {len(shown)} of {len(items)} items; all are in {ITEMS_JSONL}."
    return [Heading("Items"), Para(note), _dict_rows_table(shown)]


def _plots_blocks(plots: Any, run_dir: Path) -> list[Block]:
    """Extra plots a recipe produced, resolved against the run folder when relative."""
    images: list[Block] = []
    for plot in _as_list(plots):
        plot = _as_dict(plot)
        if not plot.get("path"):
            continue
        ref = str(plot["path"])
        path = Path(ref) if Path(ref).is_absolute() else run_dir / ref
        images.append(Image(str(plot.get("title") or Path(ref).name), ref, path))
    return [Heading("Plots"), *images] if images else []


def _config_blocks(config: Any) -> list[Block]:
    """The resolved config as YAML."""
    if not config:
        return []
    text = yaml.safe_dump(_to_plain(config), sort_keys=False, allow_unicode=True, default_flow_style=False)
    return [Heading("Config"), Code(text.rstrip("\n"), "yaml")]


# --------------------------------------------------------------------------------------------------- Markdown


def render_markdown(blocks: Sequence[Block]) -> str:
    """The blocks as one Markdown document."""
    return "\n\n".join(_markdown_block(block) for block in blocks) + "\n"


def _markdown_block(block: Block) -> str:
    """One block as Markdown."""
    if isinstance(block, Heading):
        return f"{'#' * block.level} {_md_inline(block.text)}"
    if isinstance(block, Table):
        return _markdown_table(block)
    if isinstance(block, Code):
        fence = _fence(block.text)
        return f"{fence}{block.lang}\n{block.text}\n{fence}"
    if isinstance(block, Image):
        return f"![{_md_inline(block.title)}]({block.ref.replace(' ', '%20')})"
    if isinstance(block, Bullets):
        return "\n".join(f"- {_md_inline(item)}" for item in block.items)
    if isinstance(block, Alert):
        return _markdown_alert(block)
    return _md_inline(block.text)


def _markdown_alert(alert: Alert) -> str:
    """A quoted bold title over the message in a code block, so tracebacks keep their lines."""
    fence = _fence(alert.text)
    lines = [f"**{_md_inline(alert.title)}**", "", f"{fence}text", *alert.text.splitlines(), fence]
    return "\n".join(f"> {line}".rstrip() for line in lines)


def _markdown_table(table: Table) -> str:
    """A GitHub-style pipe table."""
    lines = ["| " + " | ".join(_md_cell(h) for h in table.headers) + " |",
             "|" + "|".join("---" for _ in table.headers) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


def _md_inline(text: str) -> str:
    """Text made inert for Markdown renderers that pass HTML through; newlines kept as line breaks."""
    return html.escape(str(text), quote=False).replace("\r\n", "\n").replace("\n", "<br>")


def _md_cell(text: str) -> str:
    """A table cell: HTML escaped, pipes escaped, newlines as <br>."""
    return _md_inline(text).replace("|", "\\|")


def _fence(text: str) -> str:
    """A backtick fence longer than any backtick run inside the text."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


# --------------------------------------------------------------------------------------------------- HTML


CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #1f2328; line-height: 1.45; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3rem; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left; vertical-align: top;
         white-space: pre-wrap; word-break: break-word; max-width: 40rem; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fbfcfd; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; padding: .8rem; overflow-x: auto;
      font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .85rem; }
.alert { background: #ffebe9; border: 2px solid #cf222e; color: #82071e; padding: .8rem 1rem;
         border-radius: 6px; font-size: 1.05rem; }
.alert pre { background: #fff5f5; border-color: #cf222e; color: #82071e; white-space: pre-wrap; }
figure { margin: 1rem 0; } figcaption { color: #57606a; font-size: .9rem; }
img { max-width: 100%; border: 1px solid #d0d7de; }
.missing { color: #9a6700; }
"""


def render_html(blocks: Sequence[Block], title: str) -> str:
    """The blocks as one self-contained HTML page."""
    body = "\n".join(_html_block(block) for block in blocks)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _html_block(block: Block) -> str:
    """One block as HTML."""
    if isinstance(block, Heading):
        return f"<h{block.level}>{html.escape(block.text)}</h{block.level}>"
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Code):
        return f"<pre><code>{html.escape(block.text)}</code></pre>"
    if isinstance(block, Image):
        return _html_image(block)
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Alert):
        title, text = html.escape(block.title), html.escape(block.text)
        return f"<div class=\"alert\"><strong>{title}</strong><pre>{text}</pre></div>"
    return f"<p>{html.escape(block.text)}</p>"


def _html_table(table: Table) -> str:
    """An HTML table with escaped cells."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _html_image(image: Image) -> str:
    """A figure with the picture embedded as base64, or a note when the file cannot be read."""
    caption = f"<figcaption>{html.escape(image.title)}</figcaption>"
    try:
        data = base64.b64encode(image.path.read_bytes()).decode("ascii")
    except OSError:
        return f"<figure><p class=\"missing\">Missing image: {html.escape(str(image.path))}</p>{caption}</figure>"
    mime = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml", ".gif": "image/gif"}.get(
        image.path.suffix.lower(), "image/png")
    alt = html.escape(image.title)
    return f"<figure><img src=\"data:{mime};base64,{data}\" alt=\"{alt}\">{caption}</figure>"
