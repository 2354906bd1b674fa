"""The before/after evaluation harness every recipe uses: timing, "before" metrics kept for resumed runs, item
pairing across columns, and the log lines of data counts and metrics.

A recipe measures its model before training and after each stage; these helpers own what is the same for every
modality: how long each part took (``report["timing"]``), reusing the "before" column when a run resumes (the
model it measured is gone by then), and one row per test item with every column's output side by side. The charts
people compare are drawn by :mod:`modaltune.shared.plots` (:func:`~modaltune.shared.plots.grouped_bars`); merging
adapters into a model lives in :mod:`modaltune.shared.merge`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from modaltune.shared import dist
from modaltune.shared.io import atomic_write_json

BEFORE_FILE = "before.json"


@contextlib.contextmanager
def timed(report: dict[str, Any], name: str) -> Iterator[None]:
    """Record the seconds the block took as ``report["timing"][name]``."""
    started = time.time()
    try:
        yield
    finally:
        report.setdefault("timing", {})[name] = round(time.time() - started, 2)


def measure_before(run_dir: Path, resume: bool, measure: Callable[[], tuple[dict, list[dict]]], *,
                   name: str = BEFORE_FILE, collective: bool = False) -> tuple[dict, list[dict]]:
    """The "before" column: measured now and saved in ``run_dir`` (as ``name``), or, on a resumed run, read back
    from there (the untrained model it describes cannot be rebuilt once training has moved the weights on disk;
    a baseline that trains a model of its own is not worth training twice).

    Under a launcher ``measure`` runs on rank 0 (:func:`modaltune.shared.dist.on_main`) and every rank gets its
    result; ``collective=True`` runs it on every rank instead, for a baseline that trains (its own evaluation then
    goes through ``on_main``). Only rank 0 writes the file.
    """
    path = Path(run_dir) / name
    if resume and path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        return saved["metrics"], saved["items"]
    metrics, items = measure() if collective else dist.on_main(measure, "measuring the untrained model")
    if dist.is_main():
        atomic_write_json(path, {"metrics": metrics, "items": items})
    return metrics, items


def pair_items(columns: dict[str, list[dict]], *, key: tuple[str, ...], keep: tuple[str, ...], value: str | None,
               extra: Callable[[dict[str, dict]], dict] | None = None,
               sort: Callable[[dict], Any] | None = None) -> list[dict]:
    """One row per item of the last column, with every column's ``value`` beside it.

    Args:
        columns: column name (``before``, ``after_caption``, ``after``) -> per-item rows, in order.
        key: fields that identify an item across columns (``("id",)``, ``("set", "id")``).
        keep: fields copied from the last column's row (the reference, the question, ...).
        value: the field each column contributes under its own name (the prediction); None: none.
        extra: more fields from ``{column: row}`` of one item (per-item scores).
        sort: sort key of the paired rows (worst first, typically).

    Example:
        >>> pair_items({"before": [{"id": 1, "p": "a"}], "after": [{"id": 1, "p": "b", "ref": "b"}]},
        ...            key=("id",), keep=("ref",), value="p")
        [{'id': 1, 'ref': 'b', 'before': 'a', 'after': 'b'}]
    """
    if not columns:
        return []
    names = list(columns)
    index = {name: {tuple(r.get(k) for k in key): r for r in rows} for name, rows in columns.items()}
    rows = []
    for last in columns[names[-1]]:
        ident = tuple(last.get(k) for k in key)
        found = {name: index[name].get(ident, {}) for name in names}
        row = {k: last.get(k) for k in key}
        row.update({k: last.get(k) for k in keep})
        if value is not None:
            row.update({name: found[name].get(value) for name in names})
        if extra is not None:
            row.update(extra(found))
        rows.append(row)
    if sort is not None:
        rows.sort(key=sort)
    return rows


def data_line(counts: dict[str, dict]) -> str:
    """``train 3000 kept / 5 skipped (35570 capped), ...`` for the log."""
    parts = []
    for name, v in counts.items():
        capped = f" ({v['capped']} left out by size caps)" if v.get("capped") else ""
        parts.append(f"{name} {v['kept']} kept / {v['skipped']} skipped{capped}")
    return "data: " + ", ".join(parts)


def metric_line(metrics: dict[str, float], keys: Callable[[str], bool] | None = None, digits: int = 3) -> str:
    """``k=v, ...`` of the metrics (those ``keys`` accepts), sorted by name."""
    return ", ".join(f"{k}={v:.{digits}f}" for k, v in sorted(metrics.items()) if keys is None or keys(k))
