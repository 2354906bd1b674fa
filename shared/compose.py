"""Composition: encoder -> token grouping -> projector -> causal LM, by config.

The encoder (image or speech) yields ``(B, N, D_enc)`` tokens; :func:`group_tokens` concatenates ``k`` consecutive
tokens into one (``(B, N/k, k*D_enc)``), a projector maps them into the LM's embedding space, and they are spliced
into the prompt at the placeholder position through ``inputs_embeds``. Rows may be left- or right-padded: each row
carries its own placeholder position. The loss is the core's label-position-only loss.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import nn

from modaltune.shared.config import doc
from modaltune.shared.errors import ConfigError, DataError, ModaltuneError
from modaltune.shared.loss import IGNORE_INDEX, causal_lm_loss, unwrap_peft
from modaltune.shared.model import ModaltuneModel
from modaltune.shared.registry import ENCODERS, PROJECTORS


@dataclasses.dataclass
class EncoderConfig:
    """Which encoder to build (a name registered in ``ENCODERS``: image encoders, Whisper's speech encoder)."""

    kind: str = doc("efficientnet-lite0", "efficientnet-lite0 | timm | clip | siglip | whisper (or a plugin's name)")
    name: str | None = doc(None, "timm architecture, or the CLIP/SigLIP/Whisper folder, zoo name or hub id")
    weights: str | None = doc(None, "timm: local .safetensors/.pth file or folder with model.safetensors")
    pretrained: bool = doc(False, "timm: download timm's pretrained weights (needs the hub)")
    layer: int | None = doc(None, "take tokens from this block/hidden state instead of the last (e.g. -2)")
    image_size: int | None = doc(None, "image encoders: override the input size")


def build_encoder(cfg: EncoderConfig, log: Callable[[str], None] = print) -> nn.Module:
    """The registered encoder ``cfg.kind`` (importing the modality packages registers theirs)."""
    return ENCODERS.get(cfg.kind)(cfg, log=log)


@dataclasses.dataclass
class ProjectorConfig:
    """The trainable bridge from encoder tokens to LLM embeddings."""

    kind: str = doc("linear", "linear | mlp2x_gelu | swiglu (or a plugin's name)")
    group: int = doc(4, "concatenate this many consecutive encoder tokens into one")
    group_mode: str = doc("pad", "when the token count is not divisible by group: pad | trim")
    lr: float | None = doc(None, "learning rate of the projector (null: train.lr)")
    norm: str = doc("both", "both: every token group gives a word token and a feature token | words: each "
                            "projected token is a soft mixture of the LLM's embeddings of the training text's most "
                            "frequent tokens, so the LM reads it as words | rms: RMS-normalised to the LLM's "
                            "embedding scale | none: the raw projector output")
    anchor_words: int = doc(256, "norm=words/both: how many of the training text's most frequent tokens are anchors")
    word_grounding: float = doc(0.0, "norm=words/both: weight of a loss, on caption rows, that makes each input's "
                                     "word tokens the words of its caption (0: off)")
    words: str = doc("soft", "norm=words/both: soft (each word token a softmax mixture of anchors) | hard (exactly "
                             "one anchor word each, trained straight-through)")
    grounding: str = doc("bag", "word_grounding's target: bag (an input's word tokens as a whole are its caption's "
                                "words, in any order) | ctc (they spell its transcript in order, with blanks between: "
                                "speech)")
    collapse: bool = doc(False, "grounding=ctc: the LLM is given only the word tokens a CTC reading keeps (not "
                                "blank, not a repeat of the token before): a clip reads as its words, not as one "
                                "token per frame stack")
    word_dropout: float = doc(0.0, "collapse: in training, each kept word token is left out with this probability, "
                                   "so the LLM also learns to fill a gap from the words around it (held-out speech "
                                   "reads worse than training clips; audio-llm measured 0.2 as harmful: the LLM "
                                   "filled gaps with fluent text of its own)")

    def validate(self, where: str) -> None:
        if self.norm not in {"none", "rms", "words", "both"}:
            raise ConfigError(f"{where}.norm must be none, rms, words or both, got {self.norm!r}")
        if self.word_grounding < 0:
            raise ConfigError(f"{where}.word_grounding must be 0 (off) or positive")
        if self.words not in {"soft", "hard"}:
            raise ConfigError(f"{where}.words must be soft or hard, got {self.words!r}")
        if self.grounding not in {"bag", "ctc"}:
            raise ConfigError(f"{where}.grounding must be bag or ctc, got {self.grounding!r}")
        if self.collapse and not (self.uses_words and self.grounding == "ctc"):
            raise ConfigError(f"{where}.collapse needs word tokens read as CTC: set {where}.norm to words or both "
                              f"and {where}.grounding to ctc, or collapse to false")
        if not 0.0 <= self.word_dropout < 1.0:
            raise ConfigError(f"{where}.word_dropout must be in [0, 1), got {self.word_dropout}")
        if self.word_dropout and not self.collapse:
            raise ConfigError(f"{where}.word_dropout needs {where}.collapse: true")
        if self.anchor_words < 2:
            raise ConfigError(f"{where}.anchor_words must be at least 2")
        if self.group < 1:
            raise ConfigError(f"{where}.group must be at least 1")
        if self.group_mode not in {"pad", "trim"}:
            raise ConfigError(f"{where}.group_mode must be pad or trim")

    @property
    def uses_words(self) -> bool:
        return self.norm in {"words", "both"}


def group_tokens(tokens: torch.Tensor, k: int, mode: Literal["pad", "trim"] = "pad") -> torch.Tensor:
    """Concatenate ``k`` consecutive tokens: ``(B, N, D) -> (B, ceil(N/k) or floor(N/k), k*D)``.

    A length not divisible by ``k`` is zero-padded at the end (``pad``) or cut (``trim``).

    Example:
        >>> group_tokens(torch.arange(10.).view(1, 5, 2), 2, "pad").shape
        torch.Size([1, 3, 4])
    """
    if k < 1:
        raise ConfigError(f"token grouping k must be at least 1, got {k}")
    if k == 1:
        return tokens
    b, n, d = tokens.shape
    rest = n % k
    if rest:
        if mode == "trim":
            if n < k:
                raise ConfigError(f"cannot trim {n} tokens to groups of {k}: use grouping mode 'pad'")
            tokens = tokens[:, : n - rest]
        else:
            tokens = torch.cat([tokens, tokens.new_zeros(b, k - rest, d)], dim=1)
    return tokens.reshape(b, -1, k * d)  # (B, N/k, k*D)


@PROJECTORS.register("linear")
def build_linear(*, in_dim: int, out_dim: int) -> nn.Module:
    """One linear layer (MiniGPT-4 / MiniGPT-Med style)."""
    return nn.Linear(in_dim, out_dim)


@PROJECTORS.register("mlp2x_gelu")
def build_mlp2x_gelu(*, in_dim: int, out_dim: int) -> nn.Module:
    """Linear -> GELU -> Linear (LLaVA-1.5 style)."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class SwiGLUProjector(nn.Module):
    """RMSNorm -> Linear -> SwiGLU -> Linear -> RMSNorm (Ultravox style): gated, with normalised input and output."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or out_dim
        self.norm_in = nn.RMSNorm(in_dim, eps=1e-6)
        self.up = nn.Linear(in_dim, 2 * hidden)
        self.down = nn.Linear(hidden, out_dim)
        self.norm_out = nn.RMSNorm(out_dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.up(self.norm_in(x)).chunk(2, dim=-1)
        return self.norm_out(self.down(nn.functional.silu(gate) * value))


@PROJECTORS.register("swiglu")
def build_swiglu(*, in_dim: int, out_dim: int) -> nn.Module:
    """:class:`SwiGLUProjector` (Ultravox style)."""
    return SwiGLUProjector(in_dim, out_dim)


class NormedProjector(nn.Module):
    """A projector whose every output token is RMS-normalised, then scaled per channel (the scale trains).

    The scale starts at the LLM's own input-embedding RMS, so visual tokens enter the residual stream at a word's
    magnitude: the LM's layers then process them as they process words, instead of being swamped by (or swamping)
    them. Unnormalised projectors drift to token norms far from the text's (measured on gemma-3-270m: 16-250 against
    26), and the layers above can then barely move those positions.
    """

    def __init__(self, inner: nn.Module, dim: int, scale: float) -> None:
        super().__init__()
        self.inner = inner
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        with torch.no_grad():
            self.norm.weight.fill_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.inner(x).float())  # normalised in float32, also under bf16 autocast


class WordAnchoredProjector(nn.Module):
    """A projector whose output tokens are soft mixtures of the LLM's own word embeddings.

    Each projected vector picks (by softmax over cosine similarities) a mixture of ``words``, the input embeddings
    of a fixed set of anchor tokens, typically the most frequent tokens of the training text. The LM then reads
    visual tokens the way it reads words, and its pretrained in-context machinery (does the question's word occur
    in the context?) applies to them. On easy-vqa with gemma-3-270m, unconstrained tokens let the LM name an
    image's colour and shape but never compare them with a question's ("is there a red shape?": the yes/no logits
    did not depend on the image at all), while the same LM given each image's colour and shape as text learned
    that comparison to 0.95 test accuracy in 300 LoRA steps.
    """

    def __init__(self, inner: nn.Module, words: torch.Tensor, hard: bool = False, blank: bool = False,
                 collapse: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.hard = hard
        if collapse and not blank:
            raise ConfigError("collapsing word tokens needs the CTC blank (grounding: ctc)")
        self.collapse = collapse  # which word tokens the LLM sees: those a CTC reading keeps (see `kept`)
        self.dropout = 0.0  # collapse: share of kept word tokens left out in training
        self.kept: torch.Tensor | None = None  # (B, M) bool, set by each forward when collapsing
        self.chosen: torch.Tensor | None = None  # (B, M) the best choice of each word token, likewise
        # ctc grounding: one more choice, "no word here" (a zero vector), so frames between words can stay silent
        self.blank = nn.Linear(words.size(1), 1) if blank else None
        self.register_buffer("words", words.detach().float().clone())  # (K, D); saved with the projector
        # the anchors' token ids: only the grounding loss needs them, so a checkpoint does not carry them
        self.register_buffer("word_ids", torch.full((words.size(0),), -1, dtype=torch.long), persistent=False)
        self.record = False  # keep the soft weights of a training forward for word_grounding_loss (which drops them)
        self.last_weights: torch.Tensor | None = None  # (B, M, K)

    def set_words(self, words: torch.Tensor, ids: list[int] | None = None) -> None:
        if words.shape != self.words.shape:
            raise ModaltuneError(f"anchor words have shape {tuple(words.shape)}, expected {tuple(self.words.shape)}")
        self.words.copy_(words.detach().float())
        if ids is not None:
            self.word_ids.copy_(torch.tensor(ids, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(x).float()  # (B, M, D)
        words = self.words  # (K, D)
        logits = h @ torch.nn.functional.normalize(words, dim=-1).T  # (B, M, K)
        if self.blank is not None:
            logits = torch.cat([logits, self.blank(h)], dim=-1)  # (B, M, K+1): the last is "no word"
        weights = torch.softmax(logits, dim=-1)
        self.last_weights = weights if self.training and self.record else None
        if self.collapse:  # a greedy CTC reading: a word where the best choice is not blank and not a repeat
            choice = weights.detach().argmax(-1)  # (B, M)
            before = nn.functional.pad(choice[:, :-1], (1, 0), value=-1)
            self.kept, self.chosen = (choice != words.size(0)) & (choice != before), choice
            if self.training and self.dropout:
                self.kept &= torch.rand(choice.shape, device=choice.device) >= self.dropout
        if self.hard:  # exactly one word each; gradients as if soft (straight-through)
            one_hot = torch.nn.functional.one_hot(weights.argmax(-1), weights.size(-1)).to(weights.dtype)
            weights = one_hot + weights - weights.detach()
        return weights[..., : words.size(0)] @ words  # (B, M, D); a blank adds nothing


class WordAndFeatureProjector(nn.Module):
    """Two views of every group of encoder tokens: a word-anchored token (:class:`WordAnchoredProjector`, for the
    LM's word matching) and an RMS-normalised feature token (:class:`NormedProjector`, for detail words cannot
    carry). Output ``(B, 2M, D)``: the M word tokens, then the M feature tokens.

    Measured on the med-vqa default (easy-vqa, 300 test questions): closed accuracy 0.96 (balanced 0.92) and open
    0.96, where feature tokens alone gave closed 0.79 (balanced 0.50: never looking) and word tokens alone 0.86
    closed but 0.61 open.
    """

    def __init__(self, words_inner: nn.Module, features_inner: nn.Module, dim: int, scale: float,
                 words: torch.Tensor, hard: bool = False, blank: bool = False, collapse: bool = False) -> None:
        super().__init__()
        self.words = WordAnchoredProjector(words_inner, words, hard, blank, collapse)
        self.features = NormedProjector(features_inner, dim, scale)

    def set_words(self, words: torch.Tensor, ids: list[int] | None = None) -> None:
        self.words.set_words(words, ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.words(x), self.features(x)], dim=1)  # (B, 2M, D)


def word_projector(projector: nn.Module) -> WordAnchoredProjector | None:
    """The :class:`WordAnchoredProjector` of a projector (itself, or the ``.words`` part of ``both``), if any."""
    if isinstance(projector, WordAnchoredProjector):
        return projector
    inner = getattr(projector, "words", None)
    return inner if isinstance(inner, WordAnchoredProjector) else None


def word_grounding_loss(projector: nn.Module, labels: torch.Tensor, rows: torch.Tensor,
                        real: torch.Tensor | None = None) -> torch.Tensor | None:
    """Cross-entropy between each flagged row's target words and its image's bag of word tokens.

    For a row whose labelled tokens describe its image (a caption), the target is uniform over those tokens that
    are anchor words; the image's bag is the mean over its word tokens of their softmax weights, summed per token
    id. Minimising it makes every word token pick one of the caption's words and none that the caption lacks, so
    the LLM then reads its image's colour and shape as the words it matches questions against.

    Args:
        projector: a :class:`WordAnchoredProjector` (or one holding it as ``.words``) after a training forward
            with ``record`` on; the kept weights are released here.
        labels: ``(B, T)`` with ``-100`` off the target.
        rows: ``(B,)`` bool, the rows to ground (captions, transcripts).
        real: ``(B, M)`` bool, which word tokens hold the input (clips of different lengths); None: all.

    Returns:
        The mean loss over flagged rows with at least one anchor word in their target; None when there is none.
    """
    words = word_projector(projector)
    if words is None or words.last_weights is None:
        return None
    weights, words.last_weights = words.last_weights.float(), None  # (B, M, K); not held past this step
    if not bool(rows.any()):
        return None
    ids = words.word_ids  # (K,)
    if bool((ids < 0).all()):
        raise ModaltuneError("word grounding needs the anchor token ids: set_words(embeddings, ids)")
    if words.blank is not None:
        return _ctc_grounding(weights, ids, labels, rows, real)
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


def _ctc_grounding(weights: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor,
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


@torch.no_grad()
def _each_reading(model: "ComposedLM", words: WordAnchoredProjector, features: list[torch.Tensor]):
    """For each input's encoder states alone: its projected tokens ``(M, D)``, which a greedy CTC reading keeps
    ``(M,)`` and their best choices ``(M,)`` (the model in eval mode meanwhile)."""
    was, weight = model.training, next(model.projector.parameters())
    model.eval()
    try:
        for f in features:  # cached states may sit on the CPU while the model is on a GPU
            prefix, _ = model.project(features=f.unsqueeze(0).to(weight.device, weight.dtype),
                                      features_lengths=torch.tensor([f.size(0)], device=weight.device))
            kept, chosen = words.kept[0], words.chosen[0]
            words.kept = words.chosen = None
            yield prefix[0], kept, chosen
    finally:
        model.train(was)


def read_words(model: "ComposedLM", features: list[torch.Tensor]) -> list[list[int]]:
    """The token ids a collapsing word projector reads from each input's encoder states (its greedy CTC reading:
    the words the LLM is shown). Needs the anchors' token ids (:func:`anchor_on_text`, i.e. a training run).

    Args:
        model: a composed model with ``projector.collapse``.
        features: one ``(N, D_enc)`` tensor of encoder output states per input.
    """
    words = word_projector(model.projector)
    if words is None or not words.collapse:
        raise ConfigError("reading words needs a collapsing word projector (projector.collapse: true)")
    ids = words.word_ids.tolist()
    if min(ids) < 0:
        raise ModaltuneError("the anchors' token ids are unknown here (a checkpoint does not carry them)")
    return [[ids[c] for c in chosen[kept].tolist()] for _, kept, chosen in _each_reading(model, words, features)]


def anchor_embeddings(lm: nn.Module, token_ids: list[int]) -> torch.Tensor:
    """The LM's input embeddings (as it sees them, Gemma's scaling included) of ``token_ids``: ``(K, D)``."""
    emb = unwrap_peft(lm).get_input_embeddings()
    with torch.no_grad():
        return emb(torch.tensor(token_ids, device=emb.weight.device)).float().cpu()


def embedding_rms(lm: nn.Module, samples: int = 4096) -> float:
    """Mean per-token RMS of ``lm``'s input embeddings as the LM sees them (Gemma's scaling included)."""
    emb = unwrap_peft(lm).get_input_embeddings()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, emb.num_embeddings, (samples,), generator=gen).to(emb.weight.device)
    with torch.no_grad():
        vecs = emb(ids).float()  # (S, D)
    return float(vecs.pow(2).mean(-1).sqrt().mean())


def build_projector(kind: str, *, in_dim: int, out_dim: int, group: int = 1, norm: str = "none",
                    scale: float | None = None, words: torch.Tensor | None = None,
                    hard_words: bool = False, blank: bool = False, collapse: bool = False) -> nn.Module:
    """A registered projector taking ``group`` concatenated encoder tokens of width ``in_dim``.

    ``norm="rms"`` wraps it in :class:`NormedProjector` with its output scale starting at ``scale`` (typically
    :func:`embedding_rms` of the LLM); ``norm="words"`` in :class:`WordAnchoredProjector` over ``words``
    (``(K, out_dim)``, e.g. from :func:`anchor_embeddings`); ``norm="both"`` in :class:`WordAndFeatureProjector`
    (two projectors of ``kind``: twice the tokens). ``blank`` adds CTC's "no word" choice to the word tokens and
    ``collapse`` shows the LLM only the word tokens a greedy CTC reading keeps.
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
        return WordAnchoredProjector(make(), words, hard_words, blank, collapse)
    if norm == "rms":
        return NormedProjector(make(), out_dim, scale)
    return WordAndFeatureProjector(make(), make(), out_dim, scale, words, hard_words, blank, collapse)


def splice(embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None, positions: torch.Tensor,
           inserted: torch.Tensor, inserted_mask: torch.Tensor | None = None, *,
           left: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Replace the placeholder token at ``positions[b]`` of each row with that row's ``inserted`` tokens.

    Args:
        embeds: prompt embeddings, ``(B, T, D)``.
        mask: attention mask, ``(B, T)``.
        labels: labels or ``None``, ``(B, T)``; inserted positions get ``-100``.
        positions: placeholder index per row, ``(B,)``.
        inserted: tokens to insert, ``(B, M, D)``.
        inserted_mask: ``(B, M)`` bool, which of a row's tokens are real (clips of different lengths); None: all.
        left: rows that come out shorter than the longest are padded on the left (generation), else on the right.

    Returns:
        ``(embeds, mask, labels)``; every row holds ``T - 1`` prompt positions plus its real inserted tokens,
        padding stays where it was and rows shorter than the longest get more of it.

    Example:
        >>> e, m, _ = splice(torch.zeros(2, 3, 1), torch.ones(2, 3, dtype=torch.long), None, torch.tensor([1, 1]),
        ...                  torch.ones(2, 2, 1), torch.tensor([[True, True], [True, False]]), left=True)
        >>> m.tolist()
        [[1, 1, 1, 1], [0, 1, 1, 1]]
    """
    b, t, _ = embeds.shape
    if positions.shape != (b,) or bool(((positions < 0) | (positions >= t)).any()):
        raise ModaltuneError("every prompt needs exactly one placeholder (image, audio) inside it")
    rows_e, rows_m, rows_l = [], [], []
    for i in range(b):
        p = int(positions[i])
        tokens = inserted[i] if inserted_mask is None else inserted[i][inserted_mask[i]]  # (M_i, D)
        n = tokens.size(0)
        rows_e.append(torch.cat([embeds[i, :p], tokens.to(embeds.dtype), embeds[i, p + 1 :]]))
        rows_m.append(torch.cat([mask[i, :p], mask.new_ones(n), mask[i, p + 1 :]]))
        if labels is not None:
            rows_l.append(torch.cat([labels[i, :p], labels.new_full((n,), IGNORE_INDEX), labels[i, p + 1 :]]))
    if inserted_mask is None:
        return (torch.stack(rows_e), torch.stack(rows_m), torch.stack(rows_l) if labels is not None else None)
    width = max(r.size(0) for r in rows_e)

    def pad(rows: list[torch.Tensor], value) -> torch.Tensor:
        out = []
        for r in rows:
            fill = r.new_full((width - r.size(0), *r.shape[1:]), value)
            out.append(torch.cat([fill, r] if left else [r, fill]))
        return torch.stack(out)

    return pad(rows_e, 0.0), pad(rows_m, 0), pad(rows_l, IGNORE_INDEX) if labels is not None else None


def token_mask(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, n)`` bool: the first ``lengths[b]`` tokens of each row are real."""
    return torch.arange(n, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def _with_readings(prefix: torch.Tensor, shown: torch.Tensor | None, readings: torch.Tensor,
                   lengths: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens to splice and which are real: ``readings`` on ``rows`` (None: all), ``prefix`` elsewhere."""
    readings = readings.to(prefix.device, prefix.dtype)  # (B, R, D)
    given = token_mask(lengths.to(prefix.device), readings.size(1))  # (B, R)
    if rows is None:
        return readings, given
    own = shown if shown is not None else torch.ones(prefix.shape[:2], dtype=torch.bool, device=prefix.device)
    width = max(prefix.size(1), readings.size(1))
    widen = lambda t, value: nn.functional.pad(t, (0, 0, 0, width - t.size(1)) if t.dim() == 3  # noqa: E731
                                               else (0, width - t.size(1)), value=value)
    use = rows.to(prefix.device)
    return (torch.where(use[:, None, None], widen(readings, 0.0), widen(prefix, 0.0)),
            torch.where(use[:, None], widen(given, False), widen(own, False)))


class ComposedLM(ModaltuneModel):
    """``encoder -> grouping -> projector -> causal LM``; components ``encoder``, ``projector``, ``llm``.

    ``forward`` takes ``input_ids``/``attention_mask`` with one placeholder per row at ``placeholder_positions`` and
    either the encoder's inputs (``encoder_inputs``: pixels, log-mel features) or states from a
    :class:`~modaltune.shared.features.FeatureCache` (``features``, ``(B, N, D_enc)``, at ``features_depth``).
    In training, ``readings`` (``(B, R, D)``, ``readings_lengths`` ``(B,)``) are word tokens another reader gave
    each input (:func:`~modaltune.shared.compose_data.heldout_readings`); on the rows ``readings_rows`` (``(B,)``
    bool; None: all) the LLM is shown them instead of this projector's own.
    """

    def __init__(self, encoder: nn.Module, projector: nn.Module, llm: nn.Module, *, group: int = 1,
                 group_mode: Literal["pad", "trim"] = "pad", label_logits_only: bool = True,
                 encoder_train_mode: bool = False, word_grounding: float = 0.0) -> None:
        super().__init__()
        self.word_grounding = word_grounding  # weight of word_grounding_loss on rows flagged ground_words
        self.encoder = encoder
        self.encoder_train_mode = encoder_train_mode
        self.projector = projector
        if word_grounding and word_projector(projector) is not None:
            word_projector(projector).record = True  # only then are the soft weights kept between forward and loss
        self.llm = llm
        self.group = group
        self.group_mode = group_mode
        self.label_logits_only = label_logits_only
        self.components = {"encoder": "encoder", "projector": "projector", "llm": "llm"}

    @property
    def config(self):
        return self.llm.config

    def train(self, mode: bool = True):
        """Train mode everywhere but in the encoder, unless it is fully trained: a frozen or adapter-tuned encoder
        keeps its normalisation statistics and drops no paths, so it computes what its feature cache holds."""
        super().train(mode)
        if mode and not self.encoder_train_mode:
            self.encoder.eval()
        return self

    def prefix_tokens(self, encoder_inputs: torch.Tensor | None = None, features: torch.Tensor | None = None,
                      features_depth: int | None = None) -> torch.Tensor:
        """Projected encoder tokens ``(B, M, D_llm)`` of inputs whose every encoder token is real (see :meth:`project`)."""
        return self.project(encoder_inputs, features, features_depth)[0]

    def project(self, encoder_inputs: torch.Tensor | None = None, features: torch.Tensor | None = None,
                features_depth: int | None = None, features_lengths: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Projected encoder tokens ``(B, M, D_llm)`` and which are real (``(B, M)`` bool; None: all).

        ``features`` cached at ``features_depth`` (None: the encoder output) go through the encoder's remaining
        blocks first. ``features_lengths`` (``(B,)``) says how many encoder tokens of each row hold its input (clips
        of different lengths); the rest are padding and are not projected into the prompt.
        """
        if features is None:
            if encoder_inputs is None:
                raise ModaltuneError("ComposedLM needs encoder_inputs or cached features")
            features = self.encoder(encoder_inputs)  # (B, N, D_enc)
        elif features_depth is not None:
            rest = unwrap_peft(self.encoder).encode_rest
            if features_lengths is None:
                features = rest(features, int(features_depth))  # (B, N, D_enc)
            else:  # each row on its own real tokens: the blocks above see no padding
                features = torch.cat([nn.functional.pad(
                    rest(features[i : i + 1, : int(n)], int(features_depth)), (0, 0, 0, features.size(1) - int(n)))
                    for i, n in enumerate(features_lengths)])
        proj_dtype = next(self.projector.parameters()).dtype
        if features_lengths is None:
            grouped = group_tokens(features, self.group, self.group_mode)  # (B, N/k, k*D_enc)
            return self.projector(grouped.to(proj_dtype)), None  # (B, M, D_llm)
        lengths = features_lengths.to(features.device).clamp(max=features.size(1))
        features = features * token_mask(lengths, features.size(1)).unsqueeze(-1).to(features.dtype)  # zero padding
        grouped = group_tokens(features, self.group, self.group_mode)  # (B, M, k*D_enc)
        counts = lengths // self.group if self.group_mode == "trim" else -(-lengths // self.group)  # ceil
        out = self.projector(grouped.to(proj_dtype))  # (B, r*M, D_llm): r blocks of M tokens (norm=both: r=2)
        blocks = out.size(1) // grouped.size(1)
        return out, token_mask(counts.clamp(min=1), grouped.size(1)).repeat(1, blocks)

    def embed(self, input_ids, attention_mask, placeholder_positions, labels=None, encoder_inputs=None, features=None,
              features_depth=None, features_lengths=None, left: bool = False):
        """Prompt embeddings with the projected tokens spliced in (shorter rows padded on the ``left`` or right)."""
        return self._embed(input_ids, attention_mask, placeholder_positions, labels, encoder_inputs, features,
                           features_depth, features_lengths, left)[:3]

    def _embed(self, input_ids, attention_mask, placeholder_positions, labels, encoder_inputs, features,
               features_depth, features_lengths, left, readings=None, readings_lengths=None, readings_rows=None):
        lm = unwrap_peft(self.llm)
        embeds = lm.get_input_embeddings()(input_ids)  # (B, T, D); Gemma scales inside this lookup
        prefix, real = self.project(encoder_inputs, features, features_depth, features_lengths)  # (B, M, D)
        shown = self._shown(prefix, real)
        if readings is not None:  # held-out readings (see heldout_readings) stand in for this reader's own words
            # on the rows that have one; the projector still ran above, so its grounding loss sees every input
            prefix, shown = _with_readings(prefix, shown, readings, readings_lengths, readings_rows)
        return (*splice(embeds, attention_mask, labels, placeholder_positions, prefix, shown, left=left), real)

    def _shown(self, prefix: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor | None:
        """Which projected tokens go into the prompt: the real ones, less the word tokens a collapsing word
        projector drops (at least one token per row is kept)."""
        words = word_projector(self.projector)
        if words is None or not words.collapse or words.kept is None:
            return real
        kept, words.kept, words.chosen = words.kept.to(prefix.device), None, None  # (B, M): the first M tokens
        shown = (real.clone() if real is not None
                 else torch.ones(prefix.shape[:2], dtype=torch.bool, device=prefix.device))  # (B, r*M)
        m = kept.size(1)
        shown[:, :m] &= kept
        empty = ~shown.any(dim=1)
        shown[empty, 0] = True  # nothing read and nothing else: one (blank) token keeps the row well formed
        return shown

    def forward(self, input_ids, attention_mask, placeholder_positions, labels=None, encoder_inputs=None, features=None,
                features_depth=None, features_lengths=None, ground_words=None, objective=None, readings=None,
                readings_lengths=None, readings_rows=None, **kwargs):
        num_items = kwargs.pop("num_items_in_batch", None)
        if objective == "grounding":  # the projector's word-grounding loss alone: the LLM does not run
            return {"loss": self._grounding_only(labels, ground_words, encoder_inputs, features, features_depth,
                                                 features_lengths)}
        embeds, mask, labels, real = self._embed(input_ids, attention_mask, placeholder_positions, labels,
                                                 encoder_inputs, features, features_depth, features_lengths, False,
                                                 readings, readings_lengths, readings_rows)
        if labels is None:
            return self.llm(inputs_embeds=embeds, attention_mask=mask)
        per_row = bool(kwargs.pop("per_row", False))  # each row's summed loss (preference training)
        loss = causal_lm_loss(self.llm, labels=labels, label_logits_only=self.label_logits_only,
                              num_items_in_batch=num_items, inputs_embeds=embeds, attention_mask=mask, per_row=per_row)
        if self.word_grounding and ground_words is not None and self.training and not per_row:
            extra = word_grounding_loss(self.projector, labels, ground_words, real)
            if extra is not None:
                loss = loss + self.word_grounding * extra
        return {"loss": loss}

    def _grounding_only(self, labels, ground_words, encoder_inputs, features, features_depth, features_lengths):
        if not self.word_grounding or word_projector(self.projector) is None:
            raise ConfigError("a stage with loss: grounding needs word tokens and a grounding loss: set projector.norm "
                              "to words or both and projector.word_grounding above 0")
        prefix, real = self.project(encoder_inputs, features, features_depth, features_lengths)
        word_projector(self.projector).kept = None
        rows = (ground_words if ground_words is not None
                else torch.zeros(prefix.size(0), dtype=torch.bool, device=prefix.device))
        extra = word_grounding_loss(self.projector, labels, rows, real) if labels is not None else None
        # a batch with nothing to ground still returns a loss that reaches the projector (a zero gradient)
        return self.word_grounding * extra if extra is not None else prefix.sum() * 0.0

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, placeholder_positions, encoder_inputs=None, features=None,
                 features_depth=None, features_lengths=None, **gen_kwargs):
        """Generated token ids (new tokens only) for left-padded prompts."""
        embeds, mask, _ = self.embed(input_ids, attention_mask, placeholder_positions, None, encoder_inputs, features,
                                     features_depth, features_lengths, left=True)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=mask, **gen_kwargs)


def build_composed_lm(*, encoder: nn.Module, encoder_tuning, model, llm, projector: ProjectorConfig,
                      compute_dtype: torch.dtype = torch.float32, label_logits_only: bool = True,
                      gradient_checkpointing: bool = False, log: Callable[[str], None] = print):
    """Compose ``encoder -> grouping -> projector -> causal LM`` and apply each component's tuning method.

    Args:
        encoder: a :class:`~modaltune.shared.features.CachedEncoder` module (see :func:`build_encoder`).
        encoder_tuning: the encoder's :class:`~modaltune.shared.peft.ComponentConfig` (frozen, lora, full, ...).
        model: the LLM's :class:`~modaltune.shared.lm.ModelConfig`.
        llm: the LLM's :class:`~modaltune.shared.peft.ComponentConfig`.
        projector: the projector and token grouping.
        compute_dtype: compute dtype of quantised layers.
        label_logits_only: the output layer runs only at answer positions.
        gradient_checkpointing: trade compute for memory in the LLM.
        log: progress lines.

    Returns:
        ``(ComposedLM, tokenizer, source)``; with ``norm=words/both`` the anchor words are placeholders until
        :func:`anchor_on_text` (a run) or a checkpoint (evaluate, merge) fills them.
    """
    from modaltune.shared.lm import load_causal_lm
    from modaltune.shared.peft import ComponentSpec, apply_peft

    if llm.method in {"prompt_tuning", "prefix_tuning"}:
        raise ConfigError("llm.method: prompt/prefix tuning cannot take spliced encoder tokens; use lora, dora, ...")
    encoder = apply_peft(encoder, [ComponentSpec("encoder", "", encoder_tuning)], causal_lm=False)
    lm, tok, source = load_causal_lm(model, method=llm.method, compute_dtype=compute_dtype,
                                     quantize_head=llm.quantize_head, log_fn=log)
    if llm.method == "frozen":
        for p in lm.parameters():
            p.requires_grad_(False)
    else:
        lm = apply_peft(lm, [ComponentSpec("llm", "", llm)])
    hidden = unwrap_peft(lm).get_input_embeddings().embedding_dim
    scale = embedding_rms(lm) if projector.norm in {"rms", "both"} else None
    words = torch.zeros(projector.anchor_words, hidden) if projector.uses_words else None
    proj = build_projector(projector.kind, in_dim=unwrap_peft(encoder).out_dim, out_dim=hidden, group=projector.group,
                           norm=projector.norm, scale=scale, words=words, hard_words=projector.words == "hard",
                           blank=projector.uses_words and projector.grounding == "ctc", collapse=projector.collapse)
    if word_projector(proj) is not None:
        word_projector(proj).dropout = projector.word_dropout
    composed = ComposedLM(encoder, proj, lm, group=projector.group, group_mode=projector.group_mode,
                          label_logits_only=label_logits_only, encoder_train_mode=encoder_tuning.method == "full",
                          word_grounding=projector.word_grounding if projector.uses_words else 0.0)
    full = ["projector"] + [n for n, c in (("encoder", encoder_tuning), ("llm", llm)) if c.method == "full"]
    composed.record_trained(full_components=full)
    if gradient_checkpointing:
        composed.activation_checkpointing_enable()
    return composed, tok, source


def check_stage_losses(stages: Iterable[Any], projector: ProjectorConfig) -> None:
    """Refuse, when the config loads, a stage with ``loss: grounding`` whose projector has no grounding loss."""
    for i, stage in enumerate(stages):
        if stage.loss == "grounding" and not (projector.uses_words and projector.word_grounding > 0):
            raise ConfigError(f"stages[{i}].loss=grounding trains the projector's word grounding alone, and this "
                              "projector has none: set projector.norm to words or both and projector.word_grounding "
                              "above 0, or use loss: model")


def read_tokens(model: "ComposedLM", features: list[torch.Tensor]) -> list[torch.Tensor]:
    """The word tokens (``(R, D)``, float32 on the CPU) a collapsing word projector shows the LLM for each input's
    encoder states: the embeddings of :func:`read_words`'s reading, as the model splices them in (one token where
    nothing is read)."""
    words = word_projector(model.projector)
    if words is None or not words.collapse or words is not model.projector:
        raise ConfigError("reading word tokens needs a projector of word tokens only that collapses them "
                          "(projector.norm: words, collapse: true)")
    out = []
    for prefix, kept, _ in _each_reading(model, words, features):
        if not bool(kept.any()):
            kept = kept.clone()
            kept[0] = True  # nothing read: one (blank) token keeps the row well formed, as in training
        out.append(prefix[kept].float().cpu())
    return out


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


def composed_report(model: ComposedLM, encoder: Any, projector: ProjectorConfig, *,
                    cache: bool = True) -> dict[str, Any]:
    """The model section fields every composed recipe reports (``cache``: the recipe's feature cache is on)."""
    depth = unwrap_peft(model.encoder).cache_depth() if cache else None
    return {"encoder": encoder, "projector": projector.kind, "group": projector.group,
            "feature_cache": depth is not None, "feature_cache_depth": depth}


def save_composed(model: ComposedLM, tokenizer, out, composition: dict[str, Any], dtype: Any = None) -> Any:
    """Save a composed model whose checkpoint is loaded: the LLM with its adapters merged (``out/llm``, a plain
    transformers folder), the projector (``out/projector.safetensors``), a tuned encoder with its adapters merged
    (``out/encoder.safetensors``; a frozen one is rebuilt from its own weights) and ``out/composition.json`` (how the
    parts fit: encoder, projector, template). :func:`load_composed` reads it back. Every part is saved in ``dtype``
    (a ``torch.dtype``; default as built). Returns the LLM folder."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(out)

    def cast(v: torch.Tensor) -> torch.Tensor:
        return (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous()

    lm = model.llm.merge_and_unload() if hasattr(model.llm, "merge_and_unload") else model.llm
    (lm.to(dtype) if dtype is not None else lm).save_pretrained(str(out / "llm"))
    tokenizer.save_pretrained(str(out / "llm"))
    save_file({k: cast(v) for k, v in model.projector.state_dict().items()}, str(out / "projector.safetensors"))
    if any(model.component_of(n) == "encoder" for n in model.trained_names):
        encoder = model.encoder.merge_and_unload() if hasattr(model.encoder, "merge_and_unload") else model.encoder
        save_file({k: cast(v) for k, v in encoder.state_dict().items()}, str(out / "encoder.safetensors"))
    (out / "composition.json").write_text(json.dumps(composition, indent=2) + "\n", encoding="utf-8")
    return out / "llm"


def load_composed(folder, *, log: Callable[[str], None] = print) -> tuple[ComposedLM, Any, dict[str, Any]]:
    """A composed model saved by :func:`save_composed` (``modaltune merge``), ready to generate: the encoder named in
    ``composition.json`` (with the tuned weights of ``encoder.safetensors`` if there are any), the projector's
    weights and the merged LLM. Returns ``(model, tokenizer, composition)``; only data files are read, no code runs.
    """
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from modaltune.shared.config import from_dict
    from modaltune.shared.lm import ModelConfig
    from modaltune.shared.peft import ComponentConfig

    folder = Path(folder).expanduser()
    path = folder / "composition.json"
    if not path.is_file():
        raise ModaltuneError(f"{folder}: no composition.json; give a folder written by `modaltune merge` of a composed "
                             "recipe (med-vqa, audio-llm)")
    composition = json.loads(path.read_text(encoding="utf-8"))
    encoder_cfg = from_dict(EncoderConfig, composition["encoder"], where="composition.encoder")
    projector_cfg = from_dict(ProjectorConfig, composition["projector"], where="composition.projector")
    frozen = ComponentConfig(method="frozen")
    model, tok, _ = build_composed_lm(encoder=build_encoder(encoder_cfg, log=log), encoder_tuning=frozen,
                                      model=ModelConfig(name=str(folder / "llm")), llm=frozen, projector=projector_cfg,
                                      log=log)
    model.projector.load_state_dict(load_file(str(folder / "projector.safetensors")))
    if (folder / "encoder.safetensors").is_file():
        model.encoder.load_state_dict(load_file(str(folder / "encoder.safetensors")))
    return model.eval(), tok, composition
