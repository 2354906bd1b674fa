"""Timing helpers shared by the benchmarks: warm-up, repeated rounds, medians and the spread of ratios.

A benchmark runs every variant in ``rounds`` rounds, interleaved (round 1: A, B, C; round 2: A, B, C; ...), so a
slow patch of the machine (another process, thermal or frequency changes) lands on every variant rather than on
one. Within a round each variant does ``warmup`` untimed steps, then ``steps`` timed ones over the same batches as
the others. A round's ratio is the variant's median step time over the baseline's median step time in that round;
the table reports the median ratio over the rounds and its range (min-max), beside each variant's median step
time over all rounds and its interquartile range.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile of ``values`` (``q`` in [0, 1])."""
    xs = sorted(values)
    if not xs:
        raise ValueError("no values")
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def describe(values: list[float]) -> dict[str, float]:
    """Median, quartiles, min, max and count of ``values``."""
    return {"median": statistics.median(values), "q1": quantile(values, 0.25), "q3": quantile(values, 0.75),
            "min": min(values), "max": max(values), "n": len(values)}


def ratios(rounds: list[dict[str, list[float]]], base: str) -> dict[str, dict[str, float]]:
    """Per variant: the per-round ratio of its median step time to ``base``'s, summarised over the rounds.

    Args:
        rounds: one dict per round, variant name -> timed step seconds in that round.
        base: the baseline variant's name (its ratio is 1 in every round).
    """
    out: dict[str, dict[str, float]] = {}
    for name in rounds[0]:
        per_round = [statistics.median(r[name]) / statistics.median(r[base]) for r in rounds]
        out[name] = {**describe(per_round), "per_round": per_round}
    return out


def timed_steps(step: Callable[[object], None], batches: Iterable, warmup: int) -> list[float]:
    """Run ``step`` on each batch; return the wall seconds of every step after the first ``warmup``."""
    import time

    times = []
    for i, batch in enumerate(batches):
        t = time.perf_counter()
        step(batch)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def table(title: str, rounds: list[dict[str, list[float]]], base: str, *, unit: str = "s/step",
          label: str = "x base", what: str = "timed steps per variant, after warm-up") -> str:
    """A plain-text table: per variant the median step time (IQR over all rounds' steps) and the ratio to
    ``base`` (median over rounds, min-max)."""
    rs = ratios(rounds, base)
    lines = [title, f"{'variant':22s} {unit + ' median':>13s} {'IQR':>15s} {label + ' (median)':>16s} {'range':>13s}"]
    for name in rounds[0]:
        d = describe([t for r in rounds for t in r[name]])
        rr = rs[name]
        lines.append(f"{name:22s} {d['median']:13.3f} {d['q1']:7.3f}-{d['q3']:<7.3f} {rr['median']:16.3f} "
                     f"{rr['min']:6.3f}-{rr['max']:<6.3f}")
    n_steps = len(next(iter(rounds[0].values())))
    lines.append(f"({len(rounds)} rounds x {n_steps} {what}; ratio = the variant's median over {base}'s median in "
                 "the same round)")
    return "\n".join(lines)


def summary(rounds: list[dict[str, list[float]]], base: str) -> dict:
    """The JSON form of :func:`table`."""
    rs = ratios(rounds, base)
    return {name: {"step_seconds": describe([t for r in rounds for t in r[name]]), "ratio": rs[name],
                   "steps": [r[name] for r in rounds]} for name in rounds[0]}
