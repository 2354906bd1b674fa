"""Run reports for every recipe: ``report.json``, ``report.md``, ``report.html``, PNG plots and ``items.jsonl``.

A recipe collects what it knows about a run into one plain dict and calls :func:`write_report`. Every key except
``recipe`` and ``status`` is optional and any section may be empty, so a run that failed early still gets a report
that shows its error.

This module assembles the report's sections as blocks (:mod:`modaltune.shared.render` turns them into Markdown and
HTML); the charts are drawn by :mod:`modaltune.shared.plots`, the overfitting notices read from the training curve
by :mod:`modaltune.shared.curve`, and a ``--seeds`` summary's spread comes from :mod:`modaltune.shared.spread`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from modaltune.shared.curve import training_notices
from modaltune.shared.formatting import (as_dict, as_list, finite, fmt_count, fmt_delta, fmt_number, human_count,
                                         human_seconds, to_float)
from modaltune.shared.io import atomic_write
from modaltune.shared.plots import plot_metrics, plot_seed_spread, plot_training_curve
from modaltune.shared.render import (Alert, Block, Bullets, Code, Heading, Image, Para, Table, render_html,
                                     render_markdown)
from modaltune.shared.spread import metric_columns

MAX_ITEMS_SHOWN = 50
MAX_CELL_CHARS = 300

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
ITEMS_JSONL = "items.jsonl"
CURVE_PNG = "training_curve.png"
METRICS_PNG = "metrics.png"


def write_report(run_dir: str | Path, report: dict) -> dict[str, Path]:
    """Write the report files of one run into ``run_dir``.

    Writes ``items.jsonl`` (when there are items), ``training_curve.png`` and ``metrics.png`` (when there is data to
    plot), then ``report.md``, ``report.html`` and ``report.json``. Every file is written atomically. The caller's
    dict is not modified; ``report.json`` holds it unchanged plus a ``files`` key (kind -> file name in run_dir)
    and, when the training curve shows overfitting, a ``notices`` list
    (:func:`modaltune.shared.curve.training_notices`).

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
    items = as_list(report.get("items"))
    if items:
        files["items"] = _write_items(run_dir / ITEMS_JSONL, items)
    curve = plot_training_curve(run_dir / CURVE_PNG, as_dict(report.get("training")).get("curve"))
    if curve:
        files["training_curve"] = curve
    runs = [run for run in as_list(report.get("runs")) if isinstance(run, Mapping)]
    if runs:
        metrics_png = plot_seed_spread(run_dir / METRICS_PNG, as_dict(report.get("metrics")), runs)
    else:
        metrics_png = plot_metrics(run_dir / METRICS_PNG, as_dict(report.get("metrics")))
    if metrics_png:
        files["metrics"] = metrics_png
    notices = training_notices(as_dict(report.get("training")).get("curve"))
    report = {**report, "notices": notices} if notices else report
    blocks = build_blocks(report, run_dir, files)
    files["md"] = _write_text(run_dir / REPORT_MD, render_markdown(blocks))
    files["html"] = _write_text(run_dir / REPORT_HTML, render_html(blocks, _title(report)))
    files["json"] = run_dir / REPORT_JSON
    payload = dict(report)
    payload["files"] = {kind: path.name for kind, path in files.items()}
    _write_text(files["json"], json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n")
    return files


def _title(report: Mapping) -> str:
    """Document title: recipe and status."""
    return f"{report.get('recipe') or 'run'} — {report.get('status') or 'unknown'}"


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


# --------------------------------------------------------------------------------------------------- sections


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
    blocks += [Alert("Notice", str(n)) for n in as_list(report.get("notices"))]
    blocks += _notes_blocks(report.get("notes"))
    blocks += _metrics_blocks(as_dict(report.get("metrics")), files)
    blocks += _seeds_blocks(as_list(report.get("runs")))
    blocks += _training_blocks(as_dict(report.get("training")), files)
    blocks += _parameters_blocks(as_dict(report.get("parameters")))
    blocks += _data_blocks(as_dict(report.get("data")))
    blocks += _simple_table_blocks("Timing", report.get("timing"), ["name", "seconds", "duration"], _timing_row)
    blocks += _simple_table_blocks("Memory", report.get("memory"), ["name", "MB", "GB"], _memory_row)
    blocks += _simple_table_blocks("Environment", report.get("environment"), ["field", "value"],
                                   lambda name, value: [str(name), _cell(value)])
    blocks += _items_blocks(as_list(report.get("items")))
    blocks += _plots_blocks(report.get("plots"), run_dir)
    blocks += _config_blocks(report.get("config"))
    return blocks


def _seeds_blocks(runs: list) -> list[Block]:
    """One row per seed of a ``--seeds`` summary: its status, folder and final metrics."""
    rows = [run for run in runs if isinstance(run, Mapping)]
    if not rows:
        return []
    keys = sorted({str(k) for run in rows for k in as_dict(run.get("after")) if "@" not in str(k)})
    table = Table(["seed", "status", "run folder", *keys],
                  [[str(run.get("seed")), str(run.get("status")), str(run.get("run_dir")),
                    *(fmt_number(as_dict(run.get("after")).get(key)) for key in keys)] for run in rows])
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
    rows += [[f"model.{key}", str(value)] for key, value in as_dict(report.get("model")).items()]
    return [Heading("Summary"), Table(["field", "value"], rows)] if rows else []


def _notes_blocks(notes: Any) -> list[Block]:
    """The notes as a bullet list."""
    items = [str(note) for note in as_list(notes)]
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
    stages = [stage for stage in as_list(training.get("stages")) if isinstance(stage, Mapping)]
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
        counts = as_dict(counts)
        trainable, total = to_float(counts.get("trainable")), to_float(counts.get("total"))
        percent = f"{100 * trainable / total:.3f}%" if trainable is not None and total else ""
        rows.append([str(component), human_count(counts.get("trainable")), human_count(counts.get("total")), percent])
    return [Heading("Parameters"), Table(["component", "trainable", "total", "% trainable"], rows)] if rows else []


def _data_blocks(data: Mapping) -> list[Block]:
    """Kept, capped and skipped examples per split: items a size cap left out are counted apart from those that could
    not be used, whose reasons are given by count with the first items named."""
    rows = []
    for split, info in data.items():
        info = as_dict(info)
        reasons = sorted(as_dict(info.get("skip_reasons")).items(), key=lambda kv: -(finite(kv[1]) or 0))
        named = as_dict(info.get("skipped_items"))
        parts = []
        for reason, count in reasons:
            names = [str(n) for n in (named.get(reason) or [])]
            more = " ..." if names and (finite(count) or 0) > len(names) else ""
            parts.append(f"{reason}: {count}" + (f" ({', '.join(names)}{more})" if names else ""))
        caps = as_dict(info.get("cap_reasons"))
        capped = fmt_count(info.get("capped")) + (f" ({', '.join(caps)})" if caps else "") if info.get("capped") else "0"
        rows.append([str(split), fmt_count(info.get("kept")), capped, fmt_count(info.get("skipped")), "; ".join(parts)])
    if not rows:
        return []
    return [Heading("Data"), Table(["split", "kept", "left out by a size cap (--quick, max_*)", "skipped",
                                    "skip reasons (first items; all in skipped.jsonl)"], rows)]


def _timing_row(name: Any, seconds: Any) -> list[str]:
    """One timing table row."""
    number = finite(seconds)
    return [str(name), f"{number:,.2f}" if number is not None else str(seconds), human_seconds(seconds)]


def _memory_row(name: Any, megabytes: Any) -> list[str]:
    """One memory table row."""
    mb = finite(megabytes)
    return [str(name), f"{mb:,.1f}" if mb is not None else str(megabytes), f"{mb / 1024:.2f}" if mb is not None else ""]


def _simple_table_blocks(title: str, section: Any, headers: list[str], row: Any) -> list[Block]:
    """A name -> value section as a small table built by ``row(name, value)``."""
    rows = [row(name, value) for name, value in as_dict(section).items()]
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
    for plot in as_list(plots):
        plot = as_dict(plot)
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
