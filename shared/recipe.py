"""Recipes: the base class, the registry of recipes and the config a run resolves.

A recipe wires library pieces together (build model, apply PEFT, build data, train stages, evaluate) and returns
report sections; :func:`modaltune.shared.run.execute` owns everything around it (the run folder, the log, timing,
peak memory and the report); ``modaltune merge`` is :func:`modaltune.shared.merge.merge` and ``modaltune generate``
:func:`modaltune.shared.generate_cli.generate`.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from modaltune.shared import dist
from modaltune.shared.config import load_config, overlay, read_yaml
from modaltune.shared.errors import ModaltuneError
from modaltune.shared.registry import RECIPES


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
        # lazy: modaltune.shared.merge imports this module (a cycle); checkpoint and training (torch, transformers)
        # stay beside it so that importing the recipe registry stays light
        from modaltune.shared import checkpoint as ckpt
        from modaltune.shared.merge import merge_config
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
    shipped = recipe.default_config_path()
    if config is None or Path(config).resolve() == shipped.resolve():
        return load_config(recipe.config_cls, shipped, overrides, quick=quick)
    if say is None:
        say = (lambda m: print(m, file=sys.stderr)) if dist.is_main() else (lambda m: None)
    say(f"config: {config} laid over the shipped {shipped.name} (keys it does not set keep the shipped values)")
    return load_config(recipe.config_cls, None, overrides, quick=quick, base=overlay(read_yaml(shipped),
                                                                                       read_yaml(config)))
