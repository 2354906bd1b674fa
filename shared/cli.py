"""The ``modaltune`` command line (also ``python -m modaltune.shared.cli`` and ``python -m modaltune``)."""

from __future__ import annotations

import argparse
import os
import sys

from modaltune.shared.errors import ModaltuneError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="modaltune",
        description="Fine-tune multimodal and speech models with parameter-efficient methods.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="train a recipe and write a report", description="Train a recipe, evaluate "
                         "before and after, and write report.json/md/html into the run folder.")
    run.add_argument("recipe", help="recipe name (see `modaltune recipes`)")
    run.add_argument("--config", help="YAML config (default: the recipe's shipped config)")
    run.add_argument("--out", help="run folder (default: runs/RECIPE-run-TIMESTAMP)")
    run.add_argument("--quick", action="store_true", help="same pipeline on a small slice of data and steps")
    run.add_argument("--seeds", metavar="N|S1,S2,...",
                     help="run once per seed (N seeds from train.seed on, or a list) into OUT/seed-S and write a "
                          "summary report with mean, std and worst seed of every metric")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=50")

    ev = sub.add_parser("eval", help="evaluate a checkpoint against its base model",
                        description="Evaluate a checkpoint (and its base model, side by side) on the test split.")
    ev.add_argument("recipe", help="recipe name")
    ev.add_argument("--checkpoint", required=True, help="a run's checkpoint folder")
    ev.add_argument("--out", help="report folder (default: runs/RECIPE-eval-TIMESTAMP)")
    ev.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.max_examples=50")

    merge = sub.add_parser("merge", help="merge adapters into a plain transformers model folder",
                           description="Merge a checkpoint's adapters into its base model; the result loads with "
                           "plain transformers.")
    merge.add_argument("--checkpoint", required=True, help="a run's checkpoint folder")
    merge.add_argument("--out", required=True, help="new folder for the merged model")
    merge.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides, e.g. model.name=DIR (the base model's folder on this machine) or "
                            "model.trust_remote_code=true (never taken from the checkpoint)")

    zoo = sub.add_parser("zoo", help="list or install catalogued models", description="Model catalogue.")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True, metavar="ACTION")
    zsub.add_parser("list", help="list catalogued models and whether they are installed")
    inst = zsub.add_parser("install", help="install a model and print its local folder")
    inst.add_argument("name", help="zoo model name")
    inst.add_argument("--force", action="store_true", help="rebuild even if installed")

    sub.add_parser("recipes", help="list recipes and their config files")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = _parser()
    # key=value overrides may come before or after options (`run text-sft --quick a=1 --out d b=2`)
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return _dispatch(args)
    except ModaltuneError as exc:
        print(f"modaltune: error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "recipes":
        from modaltune.shared.recipe import all_recipes

        for name, r in all_recipes().items():
            if isinstance(r, str):
                print(f"{name:14s} unavailable: {r}")
            else:
                print(f"{name:14s} {r.description}\n{'':14s} config: {r.default_config_path()}")
        return 0
    if args.command == "zoo":
        from modaltune.shared import zoo

        if args.zoo_command == "list":
            for name in zoo.ZOO.names():
                e = zoo.ZOO.get(name)
                state = f"installed at {zoo.model_dir(name)}" if zoo.is_installed(name) else "not installed"
                print(f"{name:16s} {e.kind:14s} {state}\n{'':16s} {e.description}\n{'':16s} licence: {e.license}")
            return 0
        path = zoo.install(args.name, force=args.force, log=lambda m: print(m, file=sys.stderr))
        print(path)
        return 0
    if args.command == "merge":
        from modaltune.shared.recipe import merge

        path = merge(args.checkpoint, args.out, log=lambda m: print(m, file=sys.stderr), overrides=args.overrides)
        print(path)
        return 0
    from modaltune.shared.recipe import execute, execute_seeds

    if getattr(args, "seeds", None):
        summary, code = execute_seeds(args.recipe, args.seeds, config=args.config, out=args.out, quick=args.quick,
                                      overrides=args.overrides)
        from modaltune.shared import dist

        if dist.is_main():
            _print_spread(summary)
        return code
    report, code = execute(
        args.recipe,
        mode=args.command,
        config=getattr(args, "config", None),
        out=args.out,
        quick=getattr(args, "quick", False),
        overrides=args.overrides,
        checkpoint=getattr(args, "checkpoint", None),
    )
    from modaltune.shared import dist

    if not dist.is_main():  # rank 0 prints the run's summary; the others printed their own errors
        return code
    if report.get("status") != "ok":
        print(f"modaltune: {report.get('status')}: {report.get('error')} (see {report['run_dir']}/report.md)",
              file=sys.stderr)
    else:
        _print_summary(report)
    return code


def _print_summary(report: dict) -> None:
    before, after = report["metrics"].get("before", {}), report["metrics"].get("after", {})
    print(f"\n{report['recipe']}: {report['status']}  ({report['run_dir']})")
    for key in sorted(set(before) | set(after)):
        b, a = before.get(key), after.get(key)
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"  {key:28s} before {fmt(b):>10s}   after {fmt(a):>10s}")
    print(f"  report: {report['run_dir']}/report.html")


def _print_spread(summary: dict) -> None:
    metrics = summary["metrics"]
    mean, std, worst = (metrics.get(k, {}) for k in ("after_mean", "after_std", "after_worst"))
    print(f"\n{summary['recipe']}: {summary['status']}, seeds {summary['seeds']}  ({summary['run_dir']})")
    for key in sorted(k for k in mean if "@" not in k):
        print(f"  {key:28s} after {mean[key]:10.4f} ± {std.get(key, 0.0):.4f}   worst seed {worst.get(key):10.4f}")
    print(f"  report: {summary['run_dir']}/report.html")


if __name__ == "__main__":
    raise SystemExit(main())
