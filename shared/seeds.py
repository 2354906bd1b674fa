"""``--seeds``: one run per seed and a summary of the spread, the worst seed included.

A claim about a fine-tuning method is worth reading when its worst seed holds: :func:`execute_seeds` runs a recipe
once per ``train.seed`` into ``OUT/seed-S`` and writes ``OUT/report.*`` with every metric's mean, spread and worst
seed; with ``train.resume=true`` the seeds that finished are reused (if they ran this very config).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modaltune.shared import dist
from modaltune.shared.config import to_dict
from modaltune.shared.environment import environment
from modaltune.shared.errors import ModaltuneError
from modaltune.shared.provenance import config_differences
from modaltune.shared.recipe import Recipe, get_recipe, recipe_config
from modaltune.shared.report import write_report
from modaltune.shared.run import default_run_dir, execute
from modaltune.shared.runfolder import FINISHED, RunLock, check_out_folder
from modaltune.shared.spread import seed_metrics


def parse_seeds(text: str, base: int) -> list[int]:
    """``--seeds``: a count N (seeds ``base`` .. ``base+N-1``, ``base`` being the config's ``train.seed``) or an
    explicit comma-separated list.

    Example:
        >>> parse_seeds("3", 42), parse_seeds("1,7,9", 42)
        ([42, 43, 44], [1, 7, 9])
    """
    try:
        if "," in text:
            seeds = [int(part) for part in text.split(",") if part.strip()]
        else:
            seeds = [base + i for i in range(int(text))]
    except ValueError:
        raise ModaltuneError(f"--seeds {text!r}: give a count (--seeds 3) or a list (--seeds 1,2,3)") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ModaltuneError(f"--seeds {text!r}: give at least one seed, each once")
    return seeds


def execute_seeds(
    recipe_name: str,
    seeds: str,
    *,
    config: str | None = None,
    out: str | None = None,
    quick: bool = False,
    overrides: list[str] | None = None,
) -> tuple[dict[str, Any], int]:
    """Run a recipe once per seed (``train.seed``; data splits keep their own seeds) and write a summary report.

    Each seed runs in ``OUT/seed-S`` with its full report; ``OUT/report.json`` holds the spread over seeds of every
    metric (``metrics.after_mean``, ``after_std``, ``after_min``, ``after_max``, ``after_worst``, and the same for
    ``before``) and one row per seed. With ``train.resume=true`` a seed whose run already finished is not run again.

    Returns:
        ``(summary report, exit code)``: 0 when every seed succeeded, else the first failing seed's code.
    """
    say = (lambda msg: print(msg, flush=True)) if dist.is_main() else (lambda msg: None)
    recipe = get_recipe(recipe_name)
    cfg = recipe_config(recipe, config, overrides, quick=quick, say=lambda m: None)
    train_cfg = getattr(cfg, "train", None)
    if train_cfg is None or not hasattr(train_cfg, "seed"):
        raise ModaltuneError(f"recipe {recipe.name!r} has no train.seed to vary")
    seed_list = parse_seeds(seeds, train_cfg.seed)
    resume = bool(getattr(train_cfg, "resume", False))
    if resume and out is None:
        raise ModaltuneError("train.resume=true continues earlier seed runs: name their folder with --out DIR")
    out_dir = Path(out) if out else default_run_dir(recipe.name, "seeds")
    lock = None
    if dist.is_main():
        check_out_folder(out_dir)
        lock = RunLock(out_dir).acquire()
    try:
        return _execute_seeds_locked(recipe, cfg, seed_list, config=config, out_dir=out_dir, quick=quick,
                                     overrides=overrides, resume=resume, say=say)
    finally:
        if lock is not None:
            lock.release()


def _execute_seeds_locked(recipe: Recipe, cfg: Any, seed_list: list[int], *, config: str | None, out_dir: Path,
                          quick: bool, overrides: list[str] | None, resume: bool,
                          say: Callable[[str], None]) -> tuple[dict[str, Any], int]:
    """:func:`execute_seeds` once its folder is locked."""
    started = time.time()
    runs, reports, code = [], [], 0
    for i, seed in enumerate(seed_list):
        seed_dir = out_dir / f"seed-{seed}"
        earlier = seed_dir / "report.json"
        if resume and earlier.is_file() and json.loads(earlier.read_text(encoding="utf-8")).get("status") in FINISHED:
            report, seed_code = json.loads(earlier.read_text(encoding="utf-8")), 0
            _check_same_config(report.get("config") or {}, to_dict(cfg), seed, seed_dir)
            say(f"[modaltune] seed {seed}: finished earlier, its report is reused")
        else:
            say(f"[modaltune] seed {seed} ({i + 1} of {len(seed_list)}) -> {seed_dir}")
            report, seed_code = execute(recipe.name, mode="run", config=config, out=str(seed_dir), quick=quick,
                                        overrides=[*(overrides or []), f"train.seed={seed}"])
        code = code or seed_code
        reports.append(report)
        metrics = report.get("metrics") or {}
        runs.append({"seed": seed, "status": report.get("status"), "run_dir": str(seed_dir),
                     "before": metrics.get("before", {}), "after": metrics.get("after", {}),
                     "total_seconds": (report.get("timing") or {}).get("total_seconds")})
    ok = [r for r in reports if r.get("status") in FINISHED]
    regressed = [r["seed"] for r in runs if r["status"] == "regressed"]
    summary: dict[str, Any] = {
        "recipe": recipe.name,
        "mode": "seeds",
        "status": "failed" if len(ok) < len(reports) else "regressed" if regressed else "ok",
        "command": "modaltune " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else "",
        "run_dir": str(out_dir),
        "seeds": seed_list,
        "metrics": seed_metrics(ok),
        "runs": runs,
        "timing": {"total_seconds": round(time.time() - started, 2)},
        "environment": environment(),
        "config": to_dict(cfg),
    }
    if regressed:
        summary["regression"] = f"seeds {regressed} measured worse after tuning than before (their reports say how)"
    if len(ok) < len(reports):
        failed = [r["seed"] for r in runs if r["status"] not in FINISHED]
        summary["error"] = f"seeds {failed} did not finish; the spread covers the {len(ok)} that did"
    if dist.is_main():
        write_report(out_dir, summary)
    return summary, code


def _check_same_config(earlier: dict, now: dict, seed: int, seed_dir: Path) -> None:
    """A reused seed run must have run this config with this seed (``train.resume`` aside), else the summary would
    mix runs of different configs."""
    differ = config_differences(earlier, {**now, "train": {**now.get("train", {}), "seed": seed}},
                                ignore=("train.resume",))
    if differ:
        shown = "; ".join(differ[:5])
        raise ModaltuneError(f"{seed_dir} finished with another config ({shown}{'; ...' if len(differ) > 5 else ''}): "
                             "give --out a new folder, or the same config")
