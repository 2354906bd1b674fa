"""modaltune.audio's registrations (the ``modaltune.plugins`` entry point ``audio``): Whisper's speech encoder for
composed models, the Whisper zoo entries and the domain-asr recipe. Light: the modules load on first use."""

import modaltune.audio.zoo  # noqa: F401  (registers its zoo entries; imports nothing heavy)
from modaltune.shared.registry import ENCODERS, RECIPES

EXTRA = "pip install 'modaltune[audio]'"
ENCODERS.declare("whisper", "modaltune.audio.encoders", missing=EXTRA)
RECIPES.declare("domain-asr", "modaltune.recipes.domain_asr", missing=EXTRA)
