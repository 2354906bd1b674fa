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


def count_flops(run: Callable[[], object]) -> int:
    """Floating-point operations one call of ``run`` executes (matrix products, convolutions and attention, forward
    and backward), as PyTorch's ``FlopCounterMode`` counts them from the operations actually run: a step that
    computes the output layer only at answer positions is counted as doing that."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def matmul_peak(dtype: str, *, size: int = 2048, reps: int = 8) -> float:
    """This machine's measured ceiling for ``dtype`` (``fp32``, ``bf16``, ``fp16``): FLOP/s of the fastest of ``reps``
    square products of side ``size`` (after 2 untimed ones), on the device and thread count the benchmark uses."""
    import time

    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, device=device).to(dt)
    b = torch.randn(size, size, device=device).to(dt)
    best = float("inf")
    for i in range(reps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            best = min(best, time.perf_counter() - t)
    return 2.0 * size**3 / best


def utilisation(flops: int, step_seconds: float, peak: float) -> dict[str, float]:
    """FLOPs per step, achieved FLOP/s at ``step_seconds`` a step, the measured ``peak`` and their ratio.

    Example:
        >>> utilisation(4 * 10**9, 2.0, 1e11)["utilisation"]
        0.02
    """
    achieved = flops / step_seconds
    return {"gflop_per_step": flops / 1e9, "achieved_gflops": achieved / 1e9, "peak_gflops": peak / 1e9,
            "utilisation": achieved / peak}


def utilisations(rounds: list[dict[str, list[float]]], flops: dict[str, int], precisions: dict[str, str],
                 peaks: dict[str, float] | None = None) -> dict[str, dict[str, float]]:
    """:func:`utilisation` per variant of ``precisions``, at its median step time over every round; ``peaks`` per
    precision (default: :func:`matmul_peak` measured now)."""
    peaks = peaks or {p: matmul_peak(p) for p in set(precisions.values())}
    return {name: utilisation(flops[name], statistics.median([t for r in rounds for t in r[name]]),
                              peaks[precisions[name]]) for name in precisions}


def utilisation_table(rows: dict[str, dict[str, float]], precisions: dict[str, str]) -> str:
    """Per variant: counted GFLOP a step, achieved GFLOP/s at its median step time, this machine's measured matmul
    peak for the variant's precision, and the utilisation (achieved / peak): the ceiling beside each speed."""
    lines = [f"{'variant':22s} {'precision':9s} {'GFLOP/step':>11s} {'GFLOP/s':>9s} {'peak GFLOP/s':>13s} "
             f"{'utilisation':>12s}"]
    for name, u in rows.items():
        lines.append(f"{name:22s} {precisions[name]:9s} {u['gflop_per_step']:11.1f} {u['achieved_gflops']:9.1f} "
                     f"{u['peak_gflops']:13.1f} {100 * u['utilisation']:11.1f}%")
    lines.append("(FLOPs counted by torch's FlopCounterMode on one step, forward and backward; peak = the fastest "
                 "square matmul of that precision measured in this run, same threads)")
    return "\n".join(lines)


def step_arguments(description: str, variants: list[str], *, model: str = "gemma-3-270m", batch_size: int = 8):
    """The command line of a step benchmark whose variants each run in their own process (``--variant``)."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=model, help="zoo name, local folder or hub id")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every variant once, interleaved")
    p.add_argument("--variant", choices=variants, help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results here")
    return p


def check_step_arguments(p, args) -> None:
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        p.error("--steps and --rounds must be at least 1, --warmup at least 0")


def variant_rounds(script: str, variants: list[str], args) -> tuple[list[dict[str, list[float]]], dict[str, list]]:
    """Run ``script --variant V`` for every variant, ``args.rounds`` times interleaved, each in a fresh process (so
    its peak memory is its own). Returns the step times per round and every process's ``RESULT`` dict per variant;
    a process that printed no result stops the benchmark with its output."""
    import json
    import subprocess
    import sys

    rounds: list[dict[str, list[float]]] = []
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for k in range(args.rounds):
        rounds.append({})
        for variant in variants:
            cmd = [sys.executable, script, "--variant", variant, "--model", args.model, "--batch-size",
                   str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{variant} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
            r = json.loads(line[7:])
            rounds[k][variant] = r["times"]
            results[variant].append(r)
            print(f"round {k + 1}/{args.rounds} {variant}: median {statistics.median(r['times']):.2f} s/step, "
                  f"peak {r['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    return rounds, results
