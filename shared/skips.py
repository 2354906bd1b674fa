"""Skipped input items: counted by reason and named, never lost silently.

Every data loader that drops an item (a missing image, unreadable audio, an over-long example ...) records it in a
:class:`Skips`: the report's data table shows the counts and the first few item names per reason, and the run folder
gets ``skipped.jsonl`` with every one of them (see :func:`write_skipped`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from modaltune.shared.io import atomic_write_text

SKIPPED_FILE = "skipped.jsonl"
SHOWN = 5  # item names per reason kept in the report (all of them go to skipped.jsonl)


class Skips(Counter):
    """Skip counts per reason that also remember which items were skipped.

    Example:
        >>> s = Skips()
        >>> s.add("missing image", "row 3")
        >>> s.add("missing image", "row 9")
        >>> s.cap("max_train=10", 40)  # a deliberate cap (--quick, max_*): counted apart, not a skip
        >>> dict(s), s.names["missing image"], s.capped
        ({'missing image': 2}, ['row 3', 'row 9'], {'max_train=10': 40})
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.names: dict[str, list[str]] = {}
        self.capped: dict[str, int] = {}  # items left out on purpose by a size cap, per cap
        super().__init__(*args, **kwargs)

    def cap(self, reason: str, count: int) -> None:
        """Count ``count`` items left out by a size cap (``max_train_questions=3000``, ``--quick``): data the
        config chose not to use, reported apart from the items that could not be used."""
        if count > 0:
            self.capped[reason] = self.capped.get(reason, 0) + count

    def add(self, reason: str, item: object = None, *, count: int = 1) -> None:
        """Count ``count`` skips for ``reason``, naming ``item`` (an id, ``file:line`` or path) when given."""
        self[reason] += count
        if item is not None:
            self.names.setdefault(reason, []).append(str(item))

    def update(self, other: Any = (), /, **kwargs: Any) -> None:  # type: ignore[override]
        """Add another tally's counts, and its item names when it is a :class:`Skips`."""
        super().update(other, **kwargs)
        for reason, names in getattr(other, "names", {}).items():
            self.names.setdefault(reason, []).extend(names)
        for reason, count in getattr(other, "capped", {}).items():
            self.cap(reason, count)

    def summary(self, kept: int) -> dict[str, Any]:
        """The report's data entry for one split: kept, skipped, counts per reason and the named items."""
        out = {
            "kept": kept,
            "skipped": sum(self.values()),
            "skip_reasons": dict(self),
            "skipped_items": {reason: list(names) for reason, names in self.names.items()},
        }
        if self.capped:
            out["capped"] = sum(self.capped.values())
            out["cap_reasons"] = dict(self.capped)
        return out


def add_to_summary(entry: dict[str, Any], skips: Skips, kept: int) -> None:
    """Fold a later stage's skips (e.g. over-long examples found while tokenising) into a split's summary."""
    entry["kept"] = kept
    entry["skipped"] = entry.get("skipped", 0) + sum(skips.values())
    reasons = entry.setdefault("skip_reasons", {})
    for reason, count in skips.items():
        reasons[reason] = reasons.get(reason, 0) + count
    named = entry.setdefault("skipped_items", {})
    for reason, names in skips.names.items():
        named.setdefault(reason, []).extend(names)


def write_skipped(run_dir: Path, data: dict[str, Any]) -> int:
    """Write every named skipped item of a report's ``data`` section to ``run_dir/skipped.jsonl`` and keep only the
    first :data:`SHOWN` per reason in the report; returns how many were written."""
    rows = []
    for split, info in data.items():
        if not isinstance(info, dict):
            continue
        named = info.get("skipped_items") or {}
        for reason, names in named.items():
            rows += [{"split": split, "reason": reason, "item": name} for name in names]
        if named:
            info["skipped_items"] = {reason: names[:SHOWN] for reason, names in named.items()}
    if rows:
        atomic_write_text(run_dir / SKIPPED_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)
