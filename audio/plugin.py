"""modaltune.audio's registrations (the ``modaltune.plugins`` entry point ``audio``): Whisper's speech encoder for
composed models, the Whisper zoo entries and the domain-asr and audio-llm recipes. Light: the modules load on first use."""

import modaltune.audio.zoo  # noqa: F401  (registers its zoo entries; imports nothing heavy)
from modaltune.shared.registry import ENCODERS, RECIPES

EXTRA = "pip install 'modaltune[audio]'"
ENCODERS.declare("whisper", "modaltune.audio.encoders", missing=EXTRA)
RECIPES.declare("domain-asr", "modaltune.recipes.domain_asr", missing=EXTRA)
RECIPES.declare("audio-llm", "modaltune.recipes.audio_llm", missing=EXTRA)
