"""Recipes and the runner every CLI command goes through.

A recipe wires library pieces together (build model, apply PEFT, build data, train stages, evaluate) and returns
report sections; :func:`execute` owns everything around it: config loading, the run folder, the resolved config,
timing and peak memory, and the report, written even when the run fails so the folder says what happened.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import resource
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from modaltune.shared.config import dump_yaml, from_dict, load_config, parse_overrides, apply_dotted, to_dict
from modaltune.shared.environment import environment
from modaltune.shared.errors import ModaltuneError
from modaltune.shared.registry import RECIPES
from modaltune.shared.skips import SKIPPED_FILE, write_skipped
from modaltune.shared.tracking import log_results


@dataclasses.dataclass
class RunContext:
    """What a recipe gets besides its config."""

    run_dir: Path
    quick: bool
    report: dict[str, Any]  # sections filled as the run goes, so a failure still reports what was done
    log: Callable[[str], None]


MERGE_DTYPES = ("bf16", "fp16", "fp32")


class Recipe:
    """Base class: subclasses set the class attributes and implement :meth:`run`, :meth:`evaluate`, :meth:`merge`."""

    name: str = ""
    description: str = ""
    config_cls: type = object
    config_file: str = ""  # file name under modaltune/recipes/configs
    # metric -> how much worse than before it may end before the run counts as regressed (status "regressed")
    regression_margins: dict[str, float] = {}

    def default_config_path(self) -> Path:
        return Path(str(resources.files("modaltune.recipes").joinpath("configs", self.config_file)))

    def run(self, cfg: Any, ctx: RunContext) -> None:
        raise NotImplementedError

    def evaluate(self, cfg: Any, checkpoint: Path, ctx: RunContext) -> None:
        raise NotImplementedError

    def build_model(self, cfg: Any, log: Callable[[str], None]) -> tuple[Any, Any, dict[str, Any]]:
        """``(model, tokenizer or processor, source)`` as the config describes (used by :meth:`merge`)."""
        raise NotImplementedError

    def save_merged(self, cfg: Any, model: Any, tokenizer: Any, out: Path, log: Callable[[str], None],
                    dtype: Any = None, meta: dict | None = None) -> Path:
        """Save a model whose checkpoint is loaded, adapters merged and then cast to ``dtype``, into ``out``
        (``meta``: the checkpoint's record, e.g. the prompt format it trained on); returns the folder holding the
        base model's weights (``out`` itself, or a part of it such as ``out/llm``)."""
        raise NotImplementedError

    def generate(self, cfg: Any, checkpoint: Path, prompts: list[str], input_file: str | None,
                 log: Callable[[str], None]) -> list[str]:
        """The checkpoint's answer to each prompt (formatted as in training), about ``input_file`` for a recipe
        whose model reads one (an image, a clip)."""
        raise ModaltuneError(f"recipe {self.name!r} has no generate yet; evaluate it with `modaltune eval`")

    def merge(self, cfg: Any, checkpoint: Path, out: Path, log: Callable[[str], None],
              dtype: str | None = None) -> list[tuple[str, Path]]:
        """Write the merged model into ``out``: the model is rebuilt in fp32 (quantised components as plain LoRA),
        the checkpoint loaded, adapters merged by :meth:`save_merged` and saved in ``dtype`` (bf16, fp16 or fp32;
        default the precision the run trained in). Returns ``(base model folder, merged folder)`` pairs, so the base
        model's licence files can follow its weights."""
        from modaltune.shared import checkpoint as ckpt
        from modaltune.shared.harness import merge_config
        from modaltune.shared.training import compute_dtype, resolve_precision

        trained_in = getattr(getattr(cfg, "train", None), "precision", "fp32")
        dtype = dtype or resolve_precision(trained_in)
        if dtype not in MERGE_DTYPES:
            raise ModaltuneError(f"--dtype {dtype!r}: choose one of {', '.join(MERGE_DTYPES)}")
        cfg = merge_config(cfg)
        model, tokenizer, source = self.build_model(cfg, log)
        ckpt.load_trained(model, checkpoint)
        out.mkdir(parents=True, exist_ok=True)
        folder = self.save_merged(cfg, model, tokenizer, out, log, dtype=compute_dtype(dtype),
                                  meta=ckpt.read_meta(checkpoint))
        log(f"saved in {dtype}")
        log(f"merged {checkpoint} into {out}")
        return [(source["path"], folder)]


def register_recipe(recipe: Recipe) -> Recipe:
    """Add a recipe instance to the registry."""
    RECIPES.register(recipe.name, recipe, owner=type(recipe).__module__ + "." + type(recipe).__qualname__)
    return recipe


def get_recipe(name: str) -> Recipe:
    """The registered recipe ``name`` (a declared one is imported on first use and registers itself)."""
    return RECIPES.get(name)


def all_recipes() -> dict[str, Recipe | str]:
    """Every recipe, built-in or plugin: the recipe, or why it cannot load (a missing extra, say)."""
    out: dict[str, Recipe | str] = {}
    for name in RECIPES.names():
        try:
            out[name] = get_recipe(name)
        except ModaltuneError as exc:
            out[name] = str(exc)
    return out


def recipe_config(recipe: Recipe, config: str | Path | None = None, overrides: list[str] | None = None, *,
                  quick: bool = False, say: Callable[[str], None] | None = None) -> Any:
    """The resolved config of a run: the recipe's shipped YAML, with ``config`` (a user's YAML, often partial) laid
    over it key by key, then ``--quick`` and ``key=value`` overrides. ``say`` is told when a user file is laid over
    the shipped one (default: a line on stderr from rank 0)."""
    from modaltune.shared import dist
    from modaltune.shared.config import overlay, read_yaml

    shipped = recipe.default_config_path()
    if config is None or Path(config).resolve() == shipped.resolve():
        return load_config(recipe.config_cls, shipped, overrides, quick=quick)
    if say is None:
        say = (lambda m: print(m, file=sys.stderr)) if dist.is_main() else (lambda m: None)
    say(f"config: {config} laid over the shipped {shipped.name} (keys it does not set keep the shipped values)")
    return load_config(recipe.config_cls, None, overrides, quick=quick, base=overlay(read_yaml(shipped),
                                                                                       read_yaml(config)))


def default_run_dir(recipe: str, mode: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{recipe}-{mode}-{stamp}"


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process and, when present, peak CUDA memory."""
    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

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
    from modaltune.shared import dist

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
    from modaltune.shared import checkpoint as ckpt
    from modaltune.shared import dist
    from modaltune.shared.runfolder import RunLock, check_out_folder, check_run_folder

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
    from modaltune.shared import dist

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
    from modaltune.shared import dist
    from modaltune.shared.io import write_failure
    from modaltune.shared.runfolder import EXIT_REGRESSED, keep_traceback, regressions, remove_stale_temp_files

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
    from modaltune.shared.report import write_report
    from modaltune.shared.runfolder import FINISHED

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


CODE_FLAGS = ("trust_remote_code",)  # config keys that let a model folder run its own code


def _code_flags(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{dotted key: value}`` of every code-running flag set anywhere in a nested config mapping."""
    found: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            dotted = f"{prefix}{key}"
            if key in CODE_FLAGS and value:
                found[dotted] = data.get("name", value)
            found.update(_code_flags(value, dotted + "."))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found.update(_code_flags(value, f"{prefix[:-1]}[{i}]."))
    return found


def checkpoint_config(recipe: Recipe, meta: dict[str, Any], overrides: list[str] | None, checkpoint: str) -> Any:
    """The config a checkpoint was trained with, made safe to rebuild the model from, plus command-line overrides.

    A checkpoint is data from someone else: a flag in it that lets a model folder run its own code
    (``trust_remote_code``) is refused unless the user running the command sets it too.

    Raises:
        ModaltuneError: the checkpoint asks for remote code and the command line does not.
    """
    given = parse_overrides(overrides or [])
    asked = _code_flags(meta.get("config") or {})
    refused = {key: model for key, model in asked.items() if given.get(key) is not True}
    if refused:
        keys = " ".join(f"{key}=true" for key in refused)
        models = ", ".join(repr(str(m)) for m in refused.values() if not isinstance(m, bool))
        raise ModaltuneError(
            f"checkpoint {str(checkpoint)!r} asks to run code shipped with its model{' ' + models if models else ''} "
            f"({', '.join(refused)} is on); a checkpoint cannot turn that on by itself. Read that code, and if you "
            f"trust it pass {keys} on the command line"
        )
    base = apply_dotted(meta.get("config") or {}, {key: False for key in asked}, "checkpoint")
    return from_dict(recipe.config_cls, apply_dotted(base, given, "command line"))


def merge(checkpoint: str, out: str, log: Callable[[str], None] = print, overrides: list[str] | None = None,
          dtype: str | None = None) -> Path:
    """Merge a checkpoint's adapters into its base model and save a plain transformers folder at ``out`` in
    ``dtype`` (bf16, fp16 or fp32; default the precision the run trained in).

    Licence and notice files of the base model folders travel into ``out`` with the weights.
    """
    from modaltune.shared import checkpoint as ckpt

    meta = ckpt.read_meta(checkpoint)
    recipe = get_recipe(str(meta.get("recipe")))
    cfg = checkpoint_config(recipe, meta, overrides, checkpoint)
    out_path = Path(out)
    if out_path.is_dir() and any(out_path.iterdir()):
        raise ModaltuneError(f"--out {out!r} exists and is not empty; choose a new folder")
    from modaltune.shared.runfolder import check_out_folder

    check_out_folder(out_path)
    if dtype is None:
        from modaltune.shared.training import resolve_precision

        dtype = resolve_precision(getattr(getattr(cfg, "train", None), "precision", "fp32"))
    copied = copy_licences(recipe.merge(cfg, Path(checkpoint), out_path, log, dtype=dtype) or [], out_path)
    if copied:
        log(f"carried the base model's licence files into {out}: {', '.join(copied)}")
    (out_path / "modaltune-merge.json").write_text(
        json.dumps({"checkpoint": os.path.abspath(checkpoint), "recipe": recipe.name,
                    "base_model": (meta.get("model_source") or {}).get("name"), "dtype": dtype,
                    "licence_files": copied}, indent=2) + "\n",
        encoding="utf-8",
    )
    return out_path


def generate(checkpoint: str, prompts: list[str], input_file: str | None = None, overrides: list[str] | None = None,
             log: Callable[[str], None] = print) -> list[str]:
    """Answers of a run's checkpoint to ``prompts`` (about ``input_file`` where the recipe reads one), built and
    formatted from the checkpoint's own config: a quick look without writing Python."""
    from modaltune.shared import checkpoint as ckpt

    meta = ckpt.read_meta(checkpoint)
    recipe = get_recipe(str(meta.get("recipe")))
    cfg = checkpoint_config(recipe, meta, overrides, checkpoint)
    if input_file is not None and not Path(input_file).is_file():
        raise ModaltuneError(f"--input {input_file!r} does not exist")
    return recipe.generate(cfg, Path(checkpoint), prompts, input_file, log)


LICENCE_NAMES = ("licen", "notice", "copying", "terms", "use_policy", "acceptable_use")


def copy_licences(pairs: list[tuple[str | Path, Path]], out: Path) -> list[str]:
    """Copy the licence, notice and terms files of each base model folder into its merged folder; returns their
    paths relative to ``out``."""
    import shutil

    copied = []
    for source, dest in pairs:
        source = Path(source)
        if not source.is_dir():
            continue
        for file in sorted(source.iterdir()):
            if file.is_file() and any(key in file.name.lower() for key in LICENCE_NAMES):
                shutil.copy2(file, Path(dest) / file.name)
                copied.append((Path(dest) / file.name).relative_to(out).as_posix())
    return copied
