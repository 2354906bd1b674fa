"""Numbers and counts as report cells, and the tolerant readers of a report dict's sections.

A report dict comes from a recipe (or from a ``report.json`` on disk), so any section may be missing or of the wrong
type; :func:`as_dict`, :func:`as_list`, :func:`to_float` and :func:`finite` read it without failing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def as_dict(value: Any) -> dict:
    """The value when it is a mapping, else an empty dict."""
    return dict(value) if isinstance(value, Mapping) else {}


def as_list(value: Any) -> list:
    """The value when it is a list or tuple, else an empty list."""
    return list(value) if isinstance(value, (list, tuple)) else []


def to_float(value: Any) -> float | None:
    """The value as a finite-or-not float when it is a real number (bools excluded), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def finite(value: Any) -> float | None:
    """The value as a float when it is a finite number, else None."""
    number = to_float(value)
    return number if number is not None and math.isfinite(number) else None


def fmt_number(value: Any) -> str:
    """A metric value for a table: 4 decimals, scientific when very small or large, text for non-numbers."""
    number = to_float(value)
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
    b, a = finite(before), finite(after)
    if a is None or b is None:
        return ""
    delta = a - b
    if delta != 0 and (abs(delta) < 1e-3 or abs(delta) >= 1e6):
        return f"{delta:+.3e}"
    return f"{delta:+.4f}"


def fmt_count(value: Any) -> str:
    """An integer count with thousands separators, or its text when not a number."""
    number = to_float(value)
    if number is None:
        return "" if value is None else str(value)
    return f"{int(number):,}" if number.is_integer() else str(value)


def human_count(n: Any) -> str:
    """A parameter count such as 1.2M, 3.4B or 950."""
    number = to_float(n)
    if number is None:
        return "" if n is None else str(n)
    for threshold, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(number) >= threshold:
            return f"{number / threshold:.1f}{suffix}"
    return f"{number:g}"


def human_seconds(seconds: Any) -> str:
    """A duration such as 1h 02m 03s, 4m 05s or 12.3s."""
    number = finite(seconds)
    if number is None:
        return ""
    if number < 60:
        return f"{number:.1f}s"
    minutes, secs = divmod(int(round(number)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"
