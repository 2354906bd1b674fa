"""modaltune.text's registrations (the ``modaltune.plugins`` entry point ``text``): the text-sft recipe."""

from modaltune.shared.registry import RECIPES

RECIPES.declare("text-sft", "modaltune.recipes.text_sft")
