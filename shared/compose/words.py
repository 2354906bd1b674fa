"""Word tokens: projectors whose tokens are mixtures of the LLM's own word embeddings, and their grounding losses.

This is the research layer on top of the composition core (:mod:`modaltune.shared.compose.core`): a new modality
needs none of it. ``projector.norm: words`` makes every projected token a soft mixture of the input embeddings of
anchor words (the training text's most frequent tokens), ``both`` adds a feature token beside each; a grounding
loss ties an input's word tokens to the words of its caption (``bag``) or spells its transcript in order
(``ctc``, with a "no word" blank), and ``collapse`` shows the LLM only the words a greedy CTC reading keeps.
Reading those words back, anchoring and held-out readings live in :mod:`~modaltune.shared.compose.reading` and
:mod:`~modaltune.shared.compose.heldout`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from modaltune.shared.compose.projectors import NormedProjector, ProjectorOutput
from modaltune.shared.errors import ConfigError, ModaltuneError
from modaltune.shared.loss import unwrap_peft


@dataclasses.dataclass
class WordChoices:
    """A word projector's choices for one batch (its :attr:`ProjectorOutput.aux`).

    Attributes:
        weights: ``(B, M, K)`` softmax weights over the ``K`` anchors (``K+1`` with the CTC blank, last).
        chosen: ``(B, M)`` the best choice of each word token when collapsing; None otherwise.
    """

    weights: torch.Tensor
    chosen: torch.Tensor | None = None


class WordAnchoredProjector(nn.Module):
    """A projector whose output tokens are soft mixtures of the LLM's own word embeddings.

    Each projected vector picks (by softmax over cosine similarities) a mixture of ``words``, the input embeddings
    of a fixed set of anchor tokens, typically the most frequent tokens of the training text. The LM then reads
    visual tokens the way it reads words, and its pretrained in-context machinery (does the question's word occur
    in the context?) applies to them. On easy-vqa with gemma-3-270m, unconstrained tokens let the LM name an
    image's colour and shape but never compare them with a question's ("is there a red shape?": the yes/no logits
    did not depend on the image at all), while the same LM given each image's colour and shape as text learned
    that comparison to 0.95 test accuracy in 300 LoRA steps.

    ``forward`` returns a :class:`ProjectorOutput` whose ``aux`` holds the :class:`WordChoices`; with ``collapse``
    its ``shown`` keeps the word tokens a greedy CTC reading keeps (not blank, not a repeat of the one before).
    """

    def __init__(self, inner: nn.Module, words: torch.Tensor, blank: bool = False, collapse: bool = False) -> None:
        super().__init__()
        self.inner = inner
        if collapse and not blank:
            raise ConfigError("collapsing word tokens needs the CTC blank (grounding: ctc)")
        self.collapse = collapse  # which word tokens the LLM sees: those a CTC reading keeps
        # ctc grounding: one more choice, "no word here" (a zero vector), so frames between words can stay silent
        self.blank = nn.Linear(words.size(1), 1) if blank else None
        self.register_buffer("words", words.detach().float().clone())  # (K, D); saved with the projector
        # the anchors' token ids: only the grounding loss needs them, so a checkpoint does not carry them
        self.register_buffer("word_ids", torch.full((words.size(0),), -1, dtype=torch.long), persistent=False)

    def init_buffers(self) -> None:
        """Rebuilt from a saved state: the anchors' token ids are unknown (the state does not carry them)."""
        with torch.no_grad():
            self.word_ids.fill_(-1)

    def set_words(self, words: torch.Tensor, ids: list[int] | None = None) -> None:
        if words.shape != self.words.shape:
            raise ModaltuneError(f"anchor words have shape {tuple(words.shape)}, expected {tuple(self.words.shape)}")
        self.words.copy_(words.detach().float())
        if ids is not None:
            self.word_ids.copy_(torch.tensor(ids, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> ProjectorOutput:
        h = self.inner(x).float()  # (B, M, D)
        words = self.words  # (K, D)
        logits = h @ torch.nn.functional.normalize(words, dim=-1).T  # (B, M, K)
        if self.blank is not None:
            logits = torch.cat([logits, self.blank(h)], dim=-1)  # (B, M, K+1): the last is "no word"
        weights = torch.softmax(logits, dim=-1)
        shown = chosen = None
        if self.collapse:  # a greedy CTC reading: a word where the best choice is not blank and not a repeat
            choice = weights.detach().argmax(-1)  # (B, M)
            before = nn.functional.pad(choice[:, :-1], (1, 0), value=-1)
            shown, chosen = (choice != words.size(0)) & (choice != before), choice
        tokens = weights[..., : words.size(0)] @ words  # (B, M, D); a blank adds nothing
        return ProjectorOutput(tokens, shown=shown, aux=WordChoices(weights, chosen))

    def grounding_loss(self, out: ProjectorOutput, labels: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """:func:`word_grounding_loss` of this projector's output."""
        return word_grounding_loss(self, out, labels, rows)


class WordAndFeatureProjector(nn.Module):
    """Two views of every group of encoder tokens: a word-anchored token (:class:`WordAnchoredProjector`, for the
    LM's word matching) and an RMS-normalised feature token (:class:`NormedProjector`, for detail words cannot
    carry). Output ``(B, 2M, D)``: the M word tokens, then the M feature tokens.

    Measured on the med-vqa default (easy-vqa, 300 test questions): closed accuracy 0.96 (balanced 0.92) and open
    0.96, where feature tokens alone gave closed 0.79 (balanced 0.50: never looking) and word tokens alone 0.86
    closed but 0.61 open.
    """

    def __init__(self, words_inner: nn.Module, features_inner: nn.Module, dim: int, scale: float,
                 words: torch.Tensor, blank: bool = False, collapse: bool = False) -> None:
        super().__init__()
        self.words = WordAnchoredProjector(words_inner, words, blank, collapse)
        self.features = NormedProjector(features_inner, dim, scale)

    def set_words(self, words: torch.Tensor, ids: list[int] | None = None) -> None:
        self.words.set_words(words, ids)

    def forward(self, x: torch.Tensor) -> ProjectorOutput:
        out = self.words(x)
        return ProjectorOutput(torch.cat([out.tokens, self.features(x)], dim=1), shown=out.shown,
                               aux=out.aux)  # (B, 2M, D)

    def grounding_loss(self, out: ProjectorOutput, labels: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """:func:`word_grounding_loss` of the word tokens."""
        return word_grounding_loss(self, out, labels, rows)


def word_projector(projector: nn.Module) -> WordAnchoredProjector | None:
    """The :class:`WordAnchoredProjector` of a projector (itself, or the ``.words`` part of ``both``), if any."""
    if isinstance(projector, WordAnchoredProjector):
        return projector
    inner = getattr(projector, "words", None)
    return inner if isinstance(inner, WordAnchoredProjector) else None


def word_grounding_loss(projector: nn.Module, out: ProjectorOutput, labels: torch.Tensor,
                        rows: torch.Tensor) -> torch.Tensor | None:
    """Cross-entropy between each flagged row's target words and its image's bag of word tokens.

    For a row whose labelled tokens describe its image (a caption), the target is uniform over those tokens that
    are anchor words; the image's bag is the mean over its word tokens of their softmax weights, summed per token
    id. Minimising it makes every word token pick one of the caption's words and none that the caption lacks, so
    the LLM then reads its image's colour and shape as the words it matches questions against. With the CTC blank
    (``grounding: ctc``) the loss is :func:`ctc_grounding` instead.

    Args:
        projector: a :class:`WordAnchoredProjector` (or one holding it as ``.words``).
        out: what it returned for the batch (its ``aux`` holds the :class:`WordChoices`; its ``real``, which word
            tokens hold the input: clips of different lengths).
        labels: ``(B, T)`` with ``-100`` off the target.
        rows: ``(B,)`` bool, the rows to ground (captions, transcripts).

    Returns:
        The mean loss over flagged rows with at least one anchor word in their target; None when there is none.
    """
    words = word_projector(projector)
    if words is None or not isinstance(out.aux, WordChoices):
        return None
    weights, real = out.aux.weights.float(), out.real  # (B, M, K), (B, r*M)
    if not bool(rows.any()):
        return None
    ids = words.word_ids  # (K,)
    if bool((ids < 0).all()):
        raise ModaltuneError("word grounding needs the anchor token ids: set_words(embeddings, ids)")
    if words.blank is not None:
        return ctc_grounding(weights, ids, labels, rows, real)
    weights = weights[..., : ids.numel()]
    distinct, column = torch.unique(ids, return_inverse=True)  # (V',), (K,)
    bag = torch.zeros(weights.size(0), distinct.numel(), device=weights.device)  # (B, V')
    if real is None:
        mean = weights.mean(dim=1)  # (B, K)
    else:
        keep = real[:, : weights.size(1)].to(weights.device, weights.dtype).unsqueeze(-1)  # (B, M, 1)
        mean = (weights * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)
    bag.index_add_(1, column.to(weights.device), mean)
    hit = (labels.unsqueeze(-1) == distinct.to(labels.device)).any(dim=1) & rows.unsqueeze(-1)  # (B, V')
    keep = hit.any(dim=1)
    if not bool(keep.any()):
        return None
    target = hit[keep].float()
    target = target / target.sum(dim=1, keepdim=True)
    return -(target * bag[keep].clamp_min(1e-8).log()).sum(dim=1).mean()


def ctc_grounding(weights: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor,
                  real: torch.Tensor | None) -> torch.Tensor | None:
    """CTC between each flagged row's word tokens (``(B, M, K+1)`` choices, the last a blank) and its target's anchor
    tokens in order (targets that are not anchors are left out)."""
    k = ids.numel()
    first = {}
    for j, t in enumerate(ids.tolist()):
        first.setdefault(t, j)  # anchors cycle when the text has fewer distinct tokens than anchor_words
    targets, target_lengths, keep = [], [], []
    for i in range(labels.size(0)):
        seq = [first[t] for t in labels[i][labels[i] >= 0].tolist() if t in first] if bool(rows[i]) else []
        if seq:
            keep.append(i)
            targets += seq
            target_lengths.append(len(seq))
    if not keep:
        return None
    m = weights.size(1)
    lengths = real[:, :m].sum(1) if real is not None else torch.full((weights.size(0),), m)
    log_probs = weights[keep].clamp_min(1e-8).log().transpose(0, 1)  # (M, B', K+1)
    return nn.functional.ctc_loss(log_probs, torch.tensor(targets, device=log_probs.device), lengths[keep].cpu(),
                                  torch.tensor(target_lengths),
                                  blank=k, reduction="mean", zero_infinity=True)


def anchor_embeddings(lm: nn.Module, token_ids: list[int]) -> torch.Tensor:
    """The LM's input embeddings (as it sees them, Gemma's scaling included) of ``token_ids``: ``(K, D)``."""
    emb = unwrap_peft(lm).get_input_embeddings()
    with torch.no_grad():
        return emb(torch.tensor(token_ids, device=emb.weight.device)).float().cpu()
