"""The parts a composed model is built from, by config: the encoder (``ENCODERS``) and the projector
(``PROJECTORS``, wrapped for ``projector.norm``)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from modaltune.shared.compose.projectors import NormedProjector
from modaltune.shared.compose.words import WordAndFeatureProjector, WordAnchoredProjector
from modaltune.shared.config import doc
from modaltune.shared.errors import ConfigError, ModaltuneError
from modaltune.shared.registry import ENCODERS, PROJECTORS

Norm = Literal["none", "rms", "words", "both"]


@dataclasses.dataclass
class EncoderConfig:
    """Which encoder to build (a name registered in ``ENCODERS``: image encoders, Whisper's speech encoder)."""

    kind: str = doc("efficientnet-lite0", "efficientnet-lite0 | timm | clip | siglip | whisper (or a plugin's name)")
    name: str | None = doc(None, "timm architecture, or the CLIP/SigLIP/Whisper folder, zoo name or hub id")
    weights: str | None = doc(None, "timm: local .safetensors/.pth file or folder with model.safetensors")
    pretrained: bool = doc(False, "timm: download timm's pretrained weights (needs the hub)")
    layer: int | None = doc(None, "image encoders: take tokens from this block/hidden state instead of the last "
                                  "(e.g. -2)")
    image_size: int | None = doc(None, "image encoders: override the input size")


def build_encoder(cfg: EncoderConfig, log: Callable[[str], None] = print, *,
                  architecture: dict[str, Any] | None = None) -> nn.Module:
    """The registered encoder ``cfg.kind`` (importing the modality packages registers theirs).

    With ``architecture`` (what the encoder's ``architecture()`` returned when it was saved) the builder makes that
    architecture without loading or downloading weights: a saved state fills them (``from_pretrained``).

    Raises:
        ModaltuneError: ``architecture`` is given and the builder cannot rebuild one (it takes no ``architecture``).
    """
    builder = ENCODERS.get(cfg.kind)
    if architecture is None:
        return builder(cfg, log=log)
    if "architecture" not in inspect.signature(builder).parameters:
        raise ModaltuneError(f"encoder kind {cfg.kind!r} cannot be rebuilt from a saved config: its builder takes "
                             "no architecture (see docs/extending.md, 'Adding an encoder')")
    return builder(cfg, log=log, architecture=architecture)


@dataclasses.dataclass
class ProjectorConfig:
    """The trainable bridge from encoder tokens to LLM embeddings."""

    kind: str = doc("linear", "linear | mlp2x_gelu | swiglu (or a plugin's name)")
    group: int = doc(4, "concatenate this many consecutive encoder tokens into one")
    group_mode: Literal["pad", "trim"] = doc("pad", "when the token count is not divisible by group: pad | trim")
    lr: float | None = doc(None, "learning rate of the projector (null: train.lr)")
    norm: Norm = doc("both", "both: every token group gives a word token and a feature token | words: each "
                             "projected token is a soft mixture of the LLM's embeddings of the training text's most "
                             "frequent tokens, so the LM reads it as words | rms: RMS-normalised to the LLM's "
                             "embedding scale | none: the raw projector output")
    anchor_words: int = doc(256, "norm=words/both: how many of the training text's most frequent tokens are anchors")
    word_grounding: float = doc(0.0, "norm=words/both: weight of a loss, on caption rows, that makes each input's "
                                     "word tokens the words of its caption (0: off)")
    grounding: Literal["bag", "ctc"] = doc(
        "bag", "word_grounding's target: bag (an input's word tokens as a whole are its caption's words, in any "
               "order) | ctc (they spell its transcript in order, with blanks between: speech)")
    collapse: bool = doc(False, "grounding=ctc: the LLM is given only the word tokens a CTC reading keeps (not "
                                "blank, not a repeat of the token before): a clip reads as its words, not as one "
                                "token per frame stack")

    def validate(self, where: str) -> None:
        if self.word_grounding < 0:
            raise ConfigError(f"{where}.word_grounding must be 0 (off) or positive")
        if self.collapse and not (self.uses_words and self.grounding == "ctc"):
            raise ConfigError(f"{where}.collapse needs word tokens read as CTC: set {where}.norm to words or both "
                              f"and {where}.grounding to ctc, or collapse to false")
        if self.anchor_words < 2:
            raise ConfigError(f"{where}.anchor_words must be at least 2")
        if self.group < 1:
            raise ConfigError(f"{where}.group must be at least 1")

    @property
    def uses_words(self) -> bool:
        return self.norm in {"words", "both"}


def build_projector(kind: str, *, in_dim: int, out_dim: int, group: int = 1, norm: Norm = "none",
                    scale: float | None = None, words: torch.Tensor | None = None, blank: bool = False,
                    collapse: bool = False) -> nn.Module:
    """A registered projector taking ``group`` concatenated encoder tokens of width ``in_dim``.

    ``norm="rms"`` wraps it in :class:`~modaltune.shared.compose.projectors.NormedProjector` with its output scale
    starting at ``scale`` (typically :func:`~modaltune.shared.compose.projectors.embedding_rms` of the LLM);
    ``norm="words"`` in :class:`~modaltune.shared.compose.words.WordAnchoredProjector` over ``words``
    (``(K, out_dim)``, e.g. from :func:`~modaltune.shared.compose.words.anchor_embeddings`); ``norm="both"`` in
    :class:`~modaltune.shared.compose.words.WordAndFeatureProjector` (two projectors of ``kind``: twice the
    tokens). ``blank`` adds CTC's "no word" choice to the word tokens and ``collapse`` shows the LLM only the word
    tokens a greedy CTC reading keeps.
    """
    def make() -> nn.Module:
        return PROJECTORS.get(kind)(in_dim=in_dim * group, out_dim=out_dim)

    if norm not in {"none", "rms", "words", "both"}:
        raise ConfigError(f"projector norm must be none, rms, words or both, got {norm!r}")
    if norm == "none":
        return make()
    if norm in {"words", "both"} and (words is None or words.ndim != 2 or words.size(1) != out_dim):
        raise ConfigError(f"projector norm={norm} needs anchor embeddings of shape (K, {out_dim})")
    if norm in {"rms", "both"} and (scale is None or not scale > 0):
        raise ConfigError(f"projector norm={norm} needs a positive output scale (the LLM's embedding RMS)")
    if norm == "words":
        return WordAnchoredProjector(make(), words, blank, collapse)
    if norm == "rms":
        return NormedProjector(make(), out_dim, scale)
    return WordAndFeatureProjector(make(), make(), out_dim, scale, words, blank, collapse)
