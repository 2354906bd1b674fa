"""Metric columns across runs: the spread of a ``--seeds`` run and two reports side by side.

A report's ``metrics`` holds columns (``before``, ``after``, ``prompted`` ...), each a flat ``"<split>/<name>"`` ->
value dict. A seed summary adds ``<column>_mean``, ``_std``, ``_min``, ``_max`` and ``_worst`` columns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from modaltune.shared.errors import ModaltuneError
from modaltune.shared.formatting import as_dict, finite, to_float

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


def metric_columns(metrics: Mapping) -> dict[str, dict]:
    """The metric columns in the order given (e.g. before, after, prompted), each a flat key -> value dict.

    Example:
        >>> metric_columns({"before": {"test/acc": 0.5}, "after": {"test/acc": 0.7}, "note": "not a column"})
        {'before': {'test/acc': 0.5}, 'after': {'test/acc': 0.7}}
    """
    return {str(name): as_dict(values) for name, values in metrics.items() if isinstance(values, Mapping)}


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
        for column, metrics in metric_columns(as_dict(run.get("metrics"))).items():
            for key, value in metrics.items():
                number = finite(value)
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
    return {key: (to_float(after_a.get(key)), to_float(after_b.get(key))) for key in sorted({*after_a, *after_b})}


def _after(report: Mapping, stat: str) -> dict:
    """The ``after_<stat>`` column of a seed summary, or a single run's ``after`` (which has no std)."""
    metrics = as_dict(report.get("metrics"))
    if f"after_{stat}" in metrics:
        return as_dict(metrics[f"after_{stat}"])
    return {} if stat == "std" else as_dict(metrics.get("after"))
