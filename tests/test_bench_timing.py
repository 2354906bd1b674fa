"""The benchmarks' statistics: per-round ratios of medians, their median and range, interquartile ranges."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from timing import describe, quantile, ratios, summary, table, timed_steps  # noqa: E402


def test_ratio_is_taken_per_round_then_summarised():
    rounds = [{"base": [2.0, 2.0, 10.0], "fast": [1.0, 1.0, 1.0]},   # one slow outlier step in the baseline
              {"base": [4.0, 4.0, 4.0], "fast": [1.0, 3.0, 1.0]},    # a slow round for both
              {"base": [2.0, 2.0, 2.0], "fast": [0.5, 0.5, 0.5]}]
    r = ratios(rounds, "base")
    assert r["base"]["per_round"] == [1.0, 1.0, 1.0]
    assert r["fast"]["per_round"] == [0.5, 0.25, 0.25]
    assert r["fast"]["median"] == 0.25 and r["fast"]["min"] == 0.25 and r["fast"]["max"] == 0.5
    out = table("t", rounds, "base")
    assert "0.250" in out and "3 rounds x 3 timed steps" in out
    s = summary(rounds, "base")
    assert s["fast"]["steps"][1] == [1.0, 3.0, 1.0] and s["fast"]["ratio"]["median"] == 0.25


def test_quantiles_interpolate():
    assert quantile([1, 2, 3, 4], 0.5) == 2.5
    assert quantile([4, 1, 3, 2], 0.25) == 1.75
    d = describe([5.0, 1.0, 3.0])
    assert (d["median"], d["min"], d["max"], d["n"]) == (3.0, 1.0, 5.0, 3)
    with pytest.raises(ValueError):
        quantile([], 0.5)


def test_warmup_steps_are_not_timed():
    seen = []
    times = timed_steps(seen.append, range(5), warmup=2)
    assert seen == [0, 1, 2, 3, 4] and len(times) == 3 and all(t >= 0 for t in times)
