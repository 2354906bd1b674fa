"""modaltune.text's registrations (the ``modaltune.plugins`` entry point ``text``): the text-sft, text-dpo and
text-multitask recipes."""

from modaltune.shared.registry import RECIPES

RECIPES.declare("text-sft", "modaltune.recipes.text_sft")
RECIPES.declare("text-dpo", "modaltune.recipes.text_dpo")
RECIPES.declare("text-multitask", "modaltune.recipes.text_multitask")
