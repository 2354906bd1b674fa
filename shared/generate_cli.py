"""``modaltune generate``: a run's checkpoint answering prompts, for a quick look without writing Python."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from modaltune.shared import checkpoint as ckpt
from modaltune.shared.errors import ModaltuneError
from modaltune.shared.recipe import get_recipe
from modaltune.shared.trust import checkpoint_config


def generate(checkpoint: str, prompts: list[str], input_file: str | None = None, overrides: list[str] | None = None,
             log: Callable[[str], None] = print) -> list[str]:
    """Answers of a run's checkpoint to ``prompts`` (about ``input_file`` where the recipe reads one), built and
    formatted from the checkpoint's own config: a quick look without writing Python."""
    meta = ckpt.read_meta(checkpoint)
    recipe = get_recipe(str(meta.get("recipe")))
    cfg = checkpoint_config(recipe, meta, overrides, checkpoint)
    if input_file is not None and not Path(input_file).is_file():
        raise ModaltuneError(f"--input {input_file!r} does not exist")
    return recipe.generate(cfg, Path(checkpoint), prompts, input_file, log)
