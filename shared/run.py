"""The runner every ``run`` and ``eval`` goes through: :func:`execute`.

A recipe wires library pieces together and fills report sections; :func:`execute` owns everything around it: the
config, the run folder (checked and locked), the log, seeds, timing and peak memory, and the report, written even
when the run fails so the folder says what happened.
"""

from __future__ import annotations

import json
import logging
import random
import resource
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modaltune.shared import checkpoint as ckpt
from modaltune.shared import dist
from modaltune.shared.config import dump_yaml, to_dict
from modaltune.shared.environment import environment
from modaltune.shared.errors import ModaltuneError
from modaltune.shared.io import write_failure
from modaltune.shared.recipe import Recipe, RunContext, get_recipe, recipe_config
from modaltune.shared.report import write_report
from modaltune.shared.runfolder import (EXIT_REGRESSED, FINISHED, RunLock, check_out_folder, check_run_folder,
                                        keep_traceback, regressions, remove_stale_temp_files)
from modaltune.shared.skips import SKIPPED_FILE, write_skipped
from modaltune.shared.tracking import log_results
from modaltune.shared.trust import checkpoint_config


def default_run_dir(recipe: str, mode: str) -> Path:
    """``runs/RECIPE-MODE-TIMESTAMP``: where a run goes without ``--out``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{recipe}-{mode}-{stamp}"


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process and, when present, peak CUDA memory."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's random generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _RunLogHandler(logging.FileHandler):
    """``run.log``: a write that fails (a full disk) turns the file off instead of printing a logging traceback;
    the lines still reach the terminal."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        self.broken = True

    def emit(self, record: logging.LogRecord) -> None:
        if not getattr(self, "broken", False):
            super().emit(record)


def _logger(run_dir: Path) -> Callable[[str], None]:
    """The run's ``log``: rank 0 prints each line and appends it to ``run.log``; other ranks print only errors."""
    if not dist.is_main():  # one log per run: rank 0's (the others print only their own errors)
        def quiet(msg: str) -> None:
            if msg.startswith("error:") or msg.startswith("interrupted:"):
                print(f"[modaltune rank {dist.rank()}] {msg}", file=sys.stderr, flush=True)

        quiet.close = lambda: None  # type: ignore[attr-defined]
        return quiet
    handler = _RunLogHandler(run_dir / "run.log", encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log = logging.getLogger(f"modaltune.run.{run_dir}")
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    log.propagate = False

    def emit(msg: str) -> None:
        print(f"[modaltune] {msg}", flush=True)
        log.info(msg)

    def close() -> None:
        log.removeHandler(handler)
        handler.close()

    emit.close = close  # type: ignore[attr-defined]
    return emit


def execute(
    recipe_name: str,
    *,
    mode: str = "run",
    config: str | None = None,
    out: str | None = None,
    quick: bool = False,
    overrides: list[str] | None = None,
    checkpoint: str | None = None,
) -> tuple[dict[str, Any], int]:
    """Run (``mode="run"``) or evaluate (``mode="eval"``) a recipe; returns ``(report, exit code)``.

    Config errors, an ``--out`` that is a file or unwritable, a folder another run holds (its lock) or one that
    holds another run fail before any work (no report). Once the run folder is locked, every failure is recorded in
    its report (``status: failed``, exit 1); a run that finished but measured worse than before by more than the
    recipe's margins is ``status: regressed`` (exit 3).
    """
    recipe = get_recipe(recipe_name)
    if mode == "eval":
        if checkpoint is None:
            raise ModaltuneError("eval needs --checkpoint DIR (a run's 'checkpoint' folder)")
        if config is not None:
            raise ModaltuneError("eval takes its config from the checkpoint; change settings with key=value")
        meta = ckpt.read_meta(checkpoint)
        if meta.get("recipe") != recipe.name:
            raise ModaltuneError(
                f"checkpoint {checkpoint!r} was trained by recipe {meta.get('recipe')!r}, not {recipe.name!r}"
            )
        cfg = checkpoint_config(recipe, meta, overrides, checkpoint)
    else:
        cfg = recipe_config(recipe, config, overrides, quick=quick)
    train_cfg = getattr(cfg, "train", None)
    resume = bool(getattr(train_cfg, "resume", False)) and mode == "run"
    if resume and out is None:
        raise ModaltuneError("train.resume=true continues an earlier run: name its folder with --out DIR")
    run_dir = Path(out) if out else default_run_dir(recipe.name, mode)
    dist.refuse_sharded_parameters()
    lock = None
    if dist.is_main():  # rank 0 owns the folder; a refusal there ends the launcher's whole job
        check_out_folder(run_dir)
        lock = RunLock(run_dir).acquire()  # first: a live run's folder is refused as in use, whatever it holds
        try:
            check_run_folder(run_dir, mode=mode, resume=resume)
        except BaseException:
            lock.release()
            raise
    try:
        return _execute_locked(recipe, cfg, mode=mode, run_dir=run_dir, quick=quick, checkpoint=checkpoint)
    finally:
        if lock is not None:
            lock.release()


def _execute_locked(recipe: Recipe, cfg: Any, *, mode: str, run_dir: Path, quick: bool,
                    checkpoint: str | None) -> tuple[dict[str, Any], int]:
    """:func:`execute` once the run folder is checked and (on rank 0) locked."""
    train_cfg = getattr(cfg, "train", None)
    distributed = dist.init()  # under torchrun / accelerate launch: one run, rank 0 writes it (see shared.dist)
    if distributed:
        dist.barrier()  # every rank has checked the folder before rank 0 writes to it
    run_dir.mkdir(parents=True, exist_ok=True)
    log = _logger(run_dir)
    command = "modaltune " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""
    report: dict[str, Any] = {
        "recipe": recipe.name,
        "mode": mode,
        "status": "running",
        "command": command,
        "run_dir": str(run_dir),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": to_dict(cfg),
        "metrics": {"before": {}, "after": {}},
    }
    if checkpoint:
        report["checkpoint"] = str(checkpoint)
    report["environment"] = environment()
    if distributed:
        report["environment"]["processes"] = dist.world_size()
    ctx = RunContext(run_dir=run_dir, quick=quick, report=report, log=log)
    seed_everything(getattr(train_cfg, "seed", 0))
    started = time.time()
    try:
        return _run_and_report(recipe, cfg, ctx, mode=mode, checkpoint=checkpoint, started=started)
    finally:
        dist.restore_sigterm()


def _run_and_report(recipe: Recipe, cfg: Any, ctx: RunContext, *, mode: str, checkpoint: str | None,
                    started: float) -> tuple[dict[str, Any], int]:
    """Run the recipe, record how it ended (ok, regressed, failed, interrupted) and, on rank 0, write the report."""
    run_dir, report, log = ctx.run_dir, ctx.report, ctx.log
    train_cfg = getattr(cfg, "train", None)
    code = 0
    try:
        with dist.watch_ranks(run_dir):  # SIGTERM (a launcher, a scheduler) ends the work, not the report
            if dist.is_main():
                remove_stale_temp_files(run_dir, log)
                dump_yaml(cfg, run_dir / "config.yaml")
            if mode == "eval":
                recipe.evaluate(cfg, Path(checkpoint), ctx)
            else:
                recipe.run(cfg, ctx)
        report["status"] = "ok"
    except KeyboardInterrupt:
        report["status"], report["error"], code = "interrupted", "interrupted by the user", 130
        log("interrupted: resume with train.resume=true --out " + str(run_dir))
    except dist.Stopped if dist.world_size() <= 1 else ():
        report["status"], report["error"], code = "interrupted", "stopped by SIGTERM", 143
        log("interrupted (SIGTERM): resume with train.resume=true --out " + str(run_dir))
    except Exception as exc:  # noqa: BLE001 - every failure ends in the report
        exc = write_failure(exc, run_dir)  # a full disk (or another write error) as one line
        exc = dist.explain_failure(exc, run_dir)
        if isinstance(exc, ModaltuneError):
            report["status"], report["error"], code = "failed", str(exc), 1
        else:  # a bug or a library failure: keep the traceback in the run folder
            name = "traceback.txt" if dist.is_main() else f"traceback-rank{dist.rank()}.txt"
            keep_traceback(run_dir, traceback.format_exc(), name)
            report["status"], code = "failed", 1
            report["error"] = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''} " \
                              f"(full traceback in {run_dir / name})"
        log(f"error: {report['error']}")
    if report["status"] == "ok" and mode == "run":
        metrics = report.get("metrics") or {}
        worse = regressions(metrics.get("before") or {}, metrics.get("after") or {}, recipe.regression_margins)
        if worse:
            report["status"], report["regression"], code = "regressed", "; ".join(worse), EXIT_REGRESSED
            log(f"regressed: the tuned model measures worse than the untrained one: {report['regression']}")
    if not dist.is_main():
        log.close()
        return report, code
    return _finish(report, code, run_dir, log, started, mode, train_cfg)


def _finish(report: dict[str, Any], code: int, run_dir: Path, log: Callable[[str], None], started: float, mode: str,
            train_cfg: Any) -> tuple[dict[str, Any], int]:
    """Rank 0's end of a run: skipped items, timing, trackers and the report; a report the disk cannot take goes
    to stderr instead."""

    try:
        named = write_skipped(run_dir, report.get("data") or {})
        if named:
            log(f"{named} skipped input items are named in {run_dir / SKIPPED_FILE} (the first few per reason in "
                "the report)")
    except OSError as exc:
        log(f"warning: could not write {run_dir / SKIPPED_FILE} ({exc.strerror})")
    timing = report.setdefault("timing", {})
    timing["total_seconds"] = round(time.time() - started, 2)
    report["memory"] = {k: round(v, 1) for k, v in peak_memory_mb().items()}
    report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    trackers = getattr(train_cfg, "report_to", None)
    if mode == "run" and trackers and report["status"] in FINISHED:
        try:
            written = log_results(trackers, run_dir, report["metrics"], run_name=run_dir.name)
            if written:
                log(f"before/after metrics logged to {', '.join(written)}")
        except Exception as exc:  # a tracker's failure must not lose the run's own report
            log(f"warning: could not log the metrics to {', '.join(trackers)}: {exc}")
    try:
        files = write_report(run_dir, report)
        log(f"report: {files.get('html', run_dir / 'report.html')}")
    except OSError as exc:
        brief = {k: report.get(k) for k in ("recipe", "status", "error", "regression", "run_dir") if report.get(k)}
        brief["metrics"] = report.get("metrics")
        print(f"[modaltune] the report could not be written into {run_dir} ({exc.strerror}); here it is:\n"
              f"{json.dumps(brief, indent=1, default=str)}", file=sys.stderr, flush=True)
    log.close()
    return report, code

