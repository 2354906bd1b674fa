"""modaltune.vision's registrations (the ``modaltune.plugins`` entry point ``vision``): image encoders, the
EfficientNet-Lite0 zoo entry and the med-vqa recipe. Light: the modules behind them load on first use."""

import modaltune.vision.zoo  # noqa: F401  (registers its zoo entries; imports nothing heavy)
from modaltune.shared.registry import ENCODERS, RECIPES

EXTRA = "pip install 'modaltune[vision]'"
for _name in ("efficientnet-lite0", "timm", "clip", "siglip"):
    ENCODERS.declare(_name, "modaltune.vision.encoders", missing=EXTRA)
RECIPES.declare("med-vqa", "modaltune.recipes.med_vqa", missing=EXTRA)
