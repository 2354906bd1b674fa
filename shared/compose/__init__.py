"""Composed models: encoder -> token grouping -> projector -> causal LM, by config, as a transformers model.

- :mod:`~modaltune.shared.compose.core`: the composition (:class:`ComposedLM`, :class:`ComposedConfig`, grouping,
  splicing): what a new modality's author reads.
- :mod:`~modaltune.shared.compose.parts`: the encoder and projector configs and builders.
- :mod:`~modaltune.shared.compose.projectors`: the registered projectors and :class:`ProjectorOutput`.
- :mod:`~modaltune.shared.compose.build`: building from pretrained parts with their tuning methods; saving merged.
- :mod:`~modaltune.shared.compose.words`, :mod:`~modaltune.shared.compose.reading`,
  :mod:`~modaltune.shared.compose.heldout`: the word-reading layer (word tokens, grounding, held-out readings).

Importing this package registers :class:`ComposedConfig` and :class:`ComposedLM` with transformers' ``AutoConfig``
and ``AutoModel`` (model type ``modaltune_composed``; no remote code), so ``AutoModel.from_pretrained(folder)``
reads what :func:`save_merged` (``modaltune merge``) wrote. It is not registered at ``import modaltune``: that
would load torch and transformers for every command line start (``modaltune --help`` takes 0.1 s without).
Not ``AutoModelForCausalLM``: the model reads an encoder input besides the prompt, so text-only callers of a
causal LM (pipelines) cannot drive it.
"""

from transformers import AutoConfig, AutoModel

from modaltune.shared.compose.build import build_composed_lm, composed_report, load_legacy_composition, save_merged
from modaltune.shared.compose.core import (ComposedConfig, ComposedLM, EncoderBatch, Readings, group_tokens, splice,
                                           token_mask)
from modaltune.shared.compose.heldout import HeldoutConfig, check_heldout, heldout_readings, reader_schedule
from modaltune.shared.compose.parts import EncoderConfig, ProjectorConfig, build_encoder, build_projector
from modaltune.shared.compose.projectors import NormedProjector, ProjectorOutput, SwiGLUProjector, embedding_rms
from modaltune.shared.compose.reading import anchor_on_text, check_stage_losses, read_tokens, read_words
from modaltune.shared.compose.words import (WordAndFeatureProjector, WordAnchoredProjector, WordChoices,
                                            anchor_embeddings, word_grounding_loss, word_projector)

AutoConfig.register(ComposedConfig.model_type, ComposedConfig, exist_ok=True)
AutoModel.register(ComposedConfig, ComposedLM, exist_ok=True)

__all__ = [
    "ComposedConfig", "ComposedLM", "EncoderBatch", "EncoderConfig", "HeldoutConfig", "NormedProjector",
    "ProjectorConfig", "ProjectorOutput", "Readings", "SwiGLUProjector", "WordAndFeatureProjector",
    "WordAnchoredProjector", "WordChoices", "anchor_embeddings", "anchor_on_text", "build_composed_lm",
    "build_encoder", "build_projector", "check_heldout", "check_stage_losses", "composed_report", "embedding_rms",
    "group_tokens", "heldout_readings", "load_legacy_composition", "read_tokens", "read_words", "reader_schedule",
    "save_merged", "splice", "token_mask", "word_grounding_loss", "word_projector",
]
