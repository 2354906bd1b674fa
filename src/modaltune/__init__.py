"""modaltune: parameter-efficient fine-tuning of multimodal and speech models.

The repository's root folders install as subpackages: ``modaltune.shared`` (the core), ``modaltune.text``,
``modaltune.vision``, ``modaltune.audio`` and ``modaltune.recipes``.
"""

__version__ = "0.1.0"
