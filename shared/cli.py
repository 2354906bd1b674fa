"""The ``modaltune`` command line (also ``python -m modaltune.shared.cli`` and ``python -m modaltune``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from modaltune.shared.errors import ModaltuneError


def _parser() -> argparse.ArgumentParser:
    """The ``modaltune`` argument parser: one sub-command per action."""
    p = argparse.ArgumentParser(
        prog="modaltune",
        description="Fine-tune multimodal and speech models with parameter-efficient methods.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run, _add_eval, _add_merge, _add_combine, _add_config, _add_generate, _add_zoo):
        add(sub)
    sub.add_parser("recipes", help="list recipes and their config files")
    return p


def _add_run(sub: argparse._SubParsersAction) -> None:
    """``modaltune run``."""
    run = sub.add_parser("run", help="train a recipe and write a report", description="Train a recipe, evaluate "
                         "before and after, and write report.json/md/html into the run folder. `modaltune run RECIPE "
                         "--help` also lists every config key.", add_help=False)
    run.add_argument("-h", "--help", action="store_true", help="show this help and, after RECIPE, its config keys")
    run.add_argument("recipe", nargs="?", help="recipe name (see `modaltune recipes`)")
    run.add_argument("--config", help="YAML config (default: the recipe's shipped config)")
    run.add_argument("--out", help="run folder (default: runs/RECIPE-run-TIMESTAMP)")
    run.add_argument("--quick", action="store_true", help="same pipeline on a small slice of data and steps")
    run.add_argument("--seeds", metavar="N|S1,S2,...",
                     help="run once per seed (N seeds from train.seed on, or a list) into OUT/seed-S and write a "
                          "summary report with mean, std and worst seed of every metric")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=50")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    """``modaltune eval``."""
    ev = sub.add_parser("eval", help="evaluate a checkpoint against its base model",
                        description="Evaluate a checkpoint (and its base model, side by side) on the test split.")
    ev.add_argument("recipe", help="recipe name")
    ev.add_argument("--checkpoint", required=True, help="a run's checkpoint folder")
    ev.add_argument("--out", help="report folder (default: runs/RECIPE-eval-TIMESTAMP)")
    ev.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.max_examples=50")


def _add_merge(sub: argparse._SubParsersAction) -> None:
    """``modaltune merge``."""
    merge = sub.add_parser("merge", help="merge adapters into a plain transformers model folder",
                           description="Merge a checkpoint's adapters into its base model; the result loads with "
                           "plain transformers.")
    merge.add_argument("--checkpoint", required=True, help="a run's checkpoint folder")
    merge.add_argument("--out", required=True, help="new folder for the merged model")
    merge.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                       help="precision of the saved weights (default: the precision the run trained in)")
    merge.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides, e.g. model.name=DIR (the base model's folder on this machine) or "
                            "model.trust_remote_code=true (never taken from the checkpoint)")


def _add_combine(sub: argparse._SubParsersAction) -> None:
    """``modaltune combine``."""
    comb = sub.add_parser("combine", help="combine task adapters into one PEFT adapter (cat/linear/svd/ties/dare)",
                          description="Combine LoRA, rsLoRA or DoRA adapters (PEFT folders, or modaltune checkpoints "
                          "as CKPT or CKPT:COMPONENT) in weight space; writes a plain PEFT adapter folder and a "
                          "report (combine.json/md) of its rank and its distance from the exact weighted sum.")
    comb.add_argument("--adapter", action="append", required=True, metavar="DIR[:COMPONENT]",
                      help="an adapter to combine (repeat for each)")
    comb.add_argument("--weight", action="append", type=float, metavar="W",
                      help="its weight, in the same order (repeat; one value applies to all; default 1 each)")
    comb.add_argument("--how", choices=["cat", "linear", "svd", "ties", "dare"], default="cat",
                      help="cat (exact, ranks add up), linear (factors mixed, same rank), svd (cat truncated to "
                           "--rank), ties, dare (sparsified, then SVD to --rank); default cat")
    comb.add_argument("--rank", type=int, help="svd/ties/dare: rank of the result (default: svd the largest input "
                                               "rank, ties/dare the sum of the input ranks)")
    comb.add_argument("--density", type=float, default=0.5, help="ties/dare: fraction of each delta kept (0.5)")
    comb.add_argument("--seed", type=int, default=0, help="dare: seed of the random drop")
    comb.add_argument("--base", help="base model (zoo name, folder or hub id) when the adapters name none or "
                                     "differently; DoRA adapters read their weight norms from it")
    comb.add_argument("--out", required=True, help="new folder for the combined adapter")


def _add_config(sub: argparse._SubParsersAction) -> None:
    """``modaltune config``."""
    conf = sub.add_parser("config", help="print a recipe's resolved config as YAML",
                          description="Print the config a run would use: the shipped YAML, a --config file laid "
                          "over it, then --quick and key=value overrides.")
    conf.add_argument("recipe", help="recipe name")
    conf.add_argument("--config", help="your YAML, laid over the shipped one")
    conf.add_argument("--quick", action="store_true", help="apply the recipe's --quick overrides")
    conf.add_argument("--keys", action="store_true", help="list every key with its type, value and meaning instead")
    conf.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    """``modaltune generate``."""
    gen = sub.add_parser("generate", help="answer prompts with a checkpoint (a quick look, no Python)",
                         description="Answer each prompt with a run's checkpoint, formatted as in training.")
    gen.add_argument("--checkpoint", required=True, help="a run's checkpoint folder")
    gen.add_argument("--input", help="the image or audio file the prompt is about (med-vqa, audio-llm)")
    gen.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value",
                     help="config override, e.g. --set eval.max_new_tokens=64 (repeatable)")
    gen.add_argument("prompts", nargs="*", metavar="PROMPT", help="one or more prompts (none for domain-asr: it "
                                                                  "transcribes the --input recording)")


def _add_zoo(sub: argparse._SubParsersAction) -> None:
    """``modaltune zoo list|install``."""
    zoo = sub.add_parser("zoo", help="list or install catalogued models", description="Model catalogue.")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True, metavar="ACTION")
    zsub.add_parser("list", help="list catalogued models and whether they are installed")
    inst = zsub.add_parser("install", help="install a model and print its local folder")
    inst.add_argument("name", help="zoo model name")
    inst.add_argument("--force", action="store_true", help="rebuild even if installed")


class _DropMessage:
    """A logging filter that drops records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        self.prefixes = prefixes

    def filter(self, record) -> bool:  # noqa: D102
        return not str(record.msg).startswith(self.prefixes)


def quiet_third_party() -> None:
    """Silence third-party messages that say nothing to a modaltune user, on every command (not in tests, which
    see them): bitsandbytes' note that an optional CPU kernel package is absent (its own fallback is used), peft's
    use of a transformers property renamed in v5, and Whisper's generate noting the max_length it sets itself."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        _DropMessage("Failed to load CPU gemm_4bit_forward"))
    # Whisper's generate passes its own max_length beside the max_new_tokens modaltune sets; the latter applies
    logging.getLogger("transformers.generation.utils").addFilter(_DropMessage("Both `max_new_tokens`"))
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    quiet_third_party()
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
    """Run the parsed command; returns the exit code."""
    if args.command == "run" and (args.help or not args.recipe):
        print(_run_help(args.recipe))
        return 0 if args.help else 2
    handler = {"recipes": _recipes, "zoo": _zoo, "config": _config, "generate": _generate, "combine": _combine,
               "merge": _merge}.get(args.command, _run)
    return handler(args)


# Each command imports what it needs when it runs, not at the top: `modaltune --help` and a mistyped option answer
# at once instead of loading the library (torch, transformers) first.


def _recipes(args: argparse.Namespace) -> int:
    """``modaltune recipes``: every recipe with its description and shipped config, or why it cannot load."""
    from modaltune.shared.recipe import all_recipes  # lazy: start-up time

    for name, r in all_recipes().items():
        if isinstance(r, str):
            print(f"{name:14s} unavailable: {r}")
        else:
            print(f"{name:14s} {r.description}\n{'':14s} config: {r.default_config_path()}")
    return 0


def _zoo(args: argparse.Namespace) -> int:
    """``modaltune zoo list|install``."""
    from modaltune.shared import zoo  # lazy: start-up time

    if args.zoo_command == "list":
        for name in zoo.ZOO.names():
            e = zoo.ZOO.get(name)
            state = f"installed at {zoo.model_dir(name)}" if zoo.is_installed(name) else "not installed"
            print(f"{name:16s} {e.kind:14s} {state}\n{'':16s} {e.description}\n{'':16s} licence: {e.license}")
        return 0
    path = zoo.install(args.name, force=args.force, log=lambda m: print(m, file=sys.stderr))
    print(path)
    return 0


def _config(args: argparse.Namespace) -> int:
    """``modaltune config``: the resolved config as YAML, or every key with ``--keys``."""
    import yaml  # lazy: start-up time

    from modaltune.shared.config import to_dict  # lazy: start-up time
    from modaltune.shared.recipe import get_recipe, recipe_config  # lazy: start-up time

    cfg = recipe_config(get_recipe(args.recipe), args.config, args.overrides, quick=args.quick)
    if args.keys:
        print(_keys(cfg))
    else:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _generate(args: argparse.Namespace) -> int:
    """``modaltune generate``: print the checkpoint's answer to each prompt."""
    from modaltune.shared.generate_cli import generate  # lazy: start-up time

    answers = generate(args.checkpoint, args.prompts, args.input, overrides=args.overrides,
                       log=lambda m: print(m, file=sys.stderr))
    for prompt, answer in zip(args.prompts or [""], answers):
        print(answer if len(args.prompts) <= 1 else f"> {prompt}\n{answer}\n")
    return 0


def _combine(args: argparse.Namespace) -> int:
    """``modaltune combine``: write the combined adapter and print its folder."""
    from modaltune.shared.combine import combine_folders  # lazy: start-up time

    if args.weight and len(args.weight) not in (1, len(args.adapter)):
        raise ModaltuneError(f"{len(args.adapter)} adapters but {len(args.weight)} --weight values; give one "
                             "per adapter, or one for all")
    combine_folders(args.adapter, args.out, weights=args.weight, how=args.how, rank=args.rank,
                    density=args.density, seed=args.seed, base=args.base,
                    log=lambda m: print(m, file=sys.stderr))
    print(args.out)
    return 0


def _merge(args: argparse.Namespace) -> int:
    """``modaltune merge``: write the merged model and print its folder."""
    from modaltune.shared.merge import merge  # lazy: start-up time

    path = merge(args.checkpoint, args.out, log=lambda m: print(m, file=sys.stderr), overrides=args.overrides,
                 dtype=args.dtype)
    print(path)
    return 0


def _run(args: argparse.Namespace) -> int:
    """``modaltune run`` (once, or once per seed with ``--seeds``) and ``modaltune eval``; rank 0 prints the
    summary."""
    from modaltune.shared import dist  # lazy: start-up time
    from modaltune.shared.run import execute  # lazy: start-up time
    from modaltune.shared.runfolder import FINISHED  # lazy: start-up time
    from modaltune.shared.seeds import execute_seeds  # lazy: start-up time

    if getattr(args, "seeds", None):
        summary, code = execute_seeds(args.recipe, args.seeds, config=args.config, out=args.out, quick=args.quick,
                                      overrides=args.overrides)
        if dist.is_main():
            _print_spread(summary)
            if summary.get("regression"):
                print(f"modaltune: regressed: {summary['regression']}", file=sys.stderr)
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
    if not dist.is_main():  # rank 0 prints the run's summary; the others printed their own errors
        return code
    if report.get("status") not in FINISHED:
        print(f"modaltune: {report.get('status')}: {report.get('error')} (see {report['run_dir']}/report.md)",
              file=sys.stderr)
    else:
        _print_summary(report)
        if report.get("regression"):
            print(f"modaltune: regressed: {report['regression']} (exit {code})", file=sys.stderr)
    return code


def _run_help(recipe_name: str | None) -> str:
    """``modaltune run`` usage, and with a recipe every config key it takes (type, shipped value, meaning)."""
    sub = _parser()._subparsers._group_actions[0].choices["run"]  # noqa: SLF001 - argparse keeps them there
    text = sub.format_help()
    if not recipe_name:
        return text + "\nGive a recipe (`modaltune recipes` lists them) to see its config keys."
    from modaltune.shared.recipe import get_recipe, recipe_config  # lazy: start-up time

    recipe = get_recipe(recipe_name)
    cfg = recipe_config(recipe, None)
    return (f"{text}\nConfig keys of {recipe.name} (set any with key=value; shipped values from "
            f"{recipe.default_config_path()}):\n\n{_keys(cfg)}")


def _keys(cfg: object) -> str:
    """Every config key with its type, value and meaning, for ``--keys`` and ``run RECIPE --help``."""
    import json  # lazy: start-up time (only these two commands print JSON)

    from modaltune.shared.config import config_reference  # lazy: start-up time

    lines = []
    for key, type_name, value, help_text in config_reference(type(cfg), cfg):
        if type_name == "section":
            lines.append(f"{key}:  {help_text}")
            continue
        shown = json.dumps(value) if not isinstance(value, str) else value
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        lines.append(f"  {key} = {shown}   [{type_name}]\n      {help_text}")
    return "\n".join(lines)


def _print_summary(report: dict) -> None:
    before, after = report["metrics"].get("before", {}), report["metrics"].get("after", {})
    print(f"\n{report['recipe']}: {report['status']}  ({report['run_dir']})")
    if "after" not in report["metrics"]:  # columns of their own (e.g. one per adapter): a table of them all
        columns = {k: v for k, v in report["metrics"].items() if isinstance(v, dict)}
        print(f"  {'':24s}" + "".join(f"{c[:9]:>10s}" for c in columns))
        for key in sorted({k for v in columns.values() for k in v}):
            cells = "".join(f"{v[key]:10.4f}" if key in v else f"{'-':>10s}" for v in columns.values())
            print(f"  {key[:24]:24s}{cells}")
        print(f"  report: {report['run_dir']}/report.html")
        return
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
