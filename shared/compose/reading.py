"""Reading word tokens: anchoring a word projector on the training text and reading back what its tokens say.

On top of :mod:`~modaltune.shared.compose.words`; a composed model whose projector has no word tokens never uses it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from modaltune.shared.compose.core import EncoderBatch
from modaltune.shared.compose.parts import ProjectorConfig
from modaltune.shared.compose.words import WordAnchoredProjector, anchor_embeddings, word_projector
from modaltune.shared.errors import ConfigError, DataError, ModaltuneError

if TYPE_CHECKING:
    from modaltune.shared.compose.core import ComposedLM


def check_stage_losses(stages: Iterable[Any], projector: ProjectorConfig) -> None:
    """Refuse, when the config loads, a stage with ``loss: grounding`` whose projector has no grounding loss."""
    for i, stage in enumerate(stages):
        if stage.loss == "grounding" and not (projector.uses_words and projector.word_grounding > 0):
            raise ConfigError(f"stages[{i}].loss=grounding trains the projector's word grounding alone, and this "
                              "projector has none: set projector.norm to words or both and projector.word_grounding "
                              "above 0, or use loss: model")


def anchor_on_text(model: ComposedLM, tokenizer, texts: Iterable[str], k: int,
                   log: Callable[[str], None] = print) -> list[int]:
    """Anchor a word projector (``norm=words/both``) on the ``k`` most frequent tokens of ``texts`` (the training
    text: captions, questions, answers, transcripts; not the prompt template). Returns the anchor token ids."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"])
    special = set(tokenizer.all_special_ids)
    ranked = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if t not in special]
    if not ranked:
        raise DataError("projector.norm=words/both needs training text (captions, questions, transcripts) to take "
                        "anchor words from; or set projector.norm=rms")
    ids = [ranked[i % len(ranked)] for i in range(k)]  # fewer distinct tokens than k: cycled, counts within 1
    model.projector.set_words(anchor_embeddings(model.llm, ids), ids)
    log(f"projector anchored on {min(k, len(ranked))} distinct words of the training text, e.g. "
        + " ".join(repr(tokenizer.decode([t]).strip()) for t in ranked[:12]))
    return ids


@torch.no_grad()
def _each_reading(model: ComposedLM, features: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, ...]]:
    """For each input's encoder states alone: its projected tokens ``(M, D)``, which a greedy CTC reading keeps
    ``(M,)`` and their best choices ``(M,)`` (the model in eval mode meanwhile)."""
    was, weight = model.training, next(model.projector.parameters())
    model.eval()
    try:
        for f in features:  # cached states may sit on the CPU while the model is on a GPU
            out = model.project(EncoderBatch(features=f.unsqueeze(0).to(weight.device, weight.dtype),
                                             features_lengths=torch.tensor([f.size(0)], device=weight.device)))
            yield out.tokens[0], out.shown[0], out.aux.chosen[0]
    finally:
        model.train(was)


def _collapsing(model: ComposedLM, alone: bool) -> WordAnchoredProjector:
    """The model's collapsing word projector (``alone``: which must be the whole projector)."""
    words = word_projector(model.projector)
    if alone and (words is None or not words.collapse or words is not model.projector):
        raise ConfigError("reading word tokens needs a projector of word tokens only that collapses them "
                          "(projector.norm: words, collapse: true)")
    if words is None or not words.collapse:
        raise ConfigError("reading words needs a collapsing word projector (projector.collapse: true)")
    return words


def read_words(model: ComposedLM, features: list[torch.Tensor]) -> list[list[int]]:
    """The token ids a collapsing word projector reads from each input's encoder states (its greedy CTC reading:
    the words the LLM is shown). Needs the anchors' token ids (:func:`anchor_on_text`, i.e. a training run).

    Args:
        model: a composed model with ``projector.collapse``.
        features: one ``(N, D_enc)`` tensor of encoder output states per input.
    """
    ids = _collapsing(model, alone=False).word_ids.tolist()
    if min(ids) < 0:
        raise ModaltuneError("the anchors' token ids are unknown here (a checkpoint does not carry them)")
    return [[ids[c] for c in chosen[kept].tolist()] for _, kept, chosen in _each_reading(model, features)]


def read_tokens(model: ComposedLM, features: list[torch.Tensor]) -> list[torch.Tensor]:
    """The word tokens (``(R, D)``, float32 on the CPU) a collapsing word projector shows the LLM for each input's
    encoder states: the embeddings of :func:`read_words`'s reading, as the model splices them in (one token where
    nothing is read)."""
    _collapsing(model, alone=True)
    out = []
    for prefix, kept, _ in _each_reading(model, features):
        if not bool(kept.any()):
            kept = kept.clone()
            kept[0] = True  # nothing read: one (blank) token keeps the row well formed, as in training
        out.append(prefix[kept].float().cpu())
    return out
