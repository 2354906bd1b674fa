"""Composition: encoder -> token grouping -> projector -> causal LM, by config.

The encoder (image or speech) yields ``(B, N, D_enc)`` tokens; :func:`group_tokens` concatenates ``k`` consecutive
tokens into one (``(B, N/k, k*D_enc)``), a projector maps them into the LM's embedding space, and they are spliced
into the prompt at the placeholder position through ``inputs_embeds``. Rows may be left- or right-padded: each row
carries its own placeholder position. The loss is the core's label-position-only loss.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from modaltune.shared.errors import ConfigError, ModaltuneError
from modaltune.shared.loss import IGNORE_INDEX, causal_lm_loss, unwrap_peft
from modaltune.shared.model import ModaltuneModel
from modaltune.shared.registry import PROJECTORS


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


def build_projector(kind: str, *, in_dim: int, out_dim: int, group: int = 1) -> nn.Module:
    """A registered projector taking ``group`` concatenated encoder tokens of width ``in_dim``."""
    return PROJECTORS.get(kind)(in_dim=in_dim * group, out_dim=out_dim)


def splice(embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None, positions: torch.Tensor,
           inserted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Replace the placeholder token at ``positions[b]`` of each row with that row's ``inserted`` tokens.

    Args:
        embeds: prompt embeddings, ``(B, T, D)``.
        mask: attention mask, ``(B, T)``.
        labels: labels or ``None``, ``(B, T)``; inserted positions get ``-100``.
        positions: placeholder index per row, ``(B,)``.
        inserted: tokens to insert, ``(B, M, D)``.

    Returns:
        ``(embeds, mask, labels)`` of length ``T + M - 1``; padding stays where it was (left or right).
    """
    b, t, _ = embeds.shape
    m = inserted.size(1)
    if positions.shape != (b,) or bool(((positions < 0) | (positions >= t)).any()):
        raise ModaltuneError("every prompt needs exactly one image placeholder inside it")
    rows_e, rows_m, rows_l = [], [], []
    ones = mask.new_ones(m)
    for i in range(b):
        p = int(positions[i])
        rows_e.append(torch.cat([embeds[i, :p], inserted[i].to(embeds.dtype), embeds[i, p + 1 :]]))
        rows_m.append(torch.cat([mask[i, :p], ones, mask[i, p + 1 :]]))
        if labels is not None:
            rows_l.append(torch.cat([labels[i, :p], labels.new_full((m,), IGNORE_INDEX), labels[i, p + 1 :]]))
    return (torch.stack(rows_e), torch.stack(rows_m), torch.stack(rows_l) if labels is not None else None)


class ComposedLM(ModaltuneModel):
    """``encoder -> grouping -> projector -> causal LM``; components ``encoder``, ``projector``, ``llm``.

    ``forward`` takes ``input_ids``/``attention_mask`` with one placeholder per row at ``image_positions`` and
    either raw inputs for the encoder (``pixel_values``) or its precomputed output (``features``, ``(B, N, D_enc)``).
    """

    def __init__(self, encoder: nn.Module, projector: nn.Module, llm: nn.Module, *, group: int = 1,
                 group_mode: Literal["pad", "trim"] = "pad", label_logits_only: bool = True,
                 encoder_train_mode: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.encoder_train_mode = encoder_train_mode
        self.projector = projector
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

    def prefix_tokens(self, pixel_values: torch.Tensor | None = None, features: torch.Tensor | None = None,
                      features_depth: int | None = None) -> torch.Tensor:
        """Projected encoder tokens ``(B, M, D_llm)``; ``features`` cached at ``features_depth`` (None: the
        encoder output) go through the encoder's remaining blocks first."""
        if features is None:
            if pixel_values is None:
                raise ModaltuneError("ComposedLM needs pixel_values or precomputed features")
            features = self.encoder(pixel_values)  # (B, N, D_enc)
        elif features_depth is not None:
            features = unwrap_peft(self.encoder).encode_rest(features, int(features_depth))  # (B, N, D_enc)
        grouped = group_tokens(features, self.group, self.group_mode)  # (B, N/k, k*D_enc)
        proj_dtype = next(self.projector.parameters()).dtype
        return self.projector(grouped.to(proj_dtype))  # (B, M, D_llm)

    def embed(self, input_ids, attention_mask, image_positions, labels=None, pixel_values=None, features=None,
              features_depth=None):
        """Prompt embeddings with the projected tokens spliced in."""
        lm = unwrap_peft(self.llm)
        embeds = lm.get_input_embeddings()(input_ids)  # (B, T, D); Gemma scales inside this lookup
        prefix = self.prefix_tokens(pixel_values, features, features_depth)  # (B, M, D); the projector learns its scale
        return splice(embeds, attention_mask, labels, image_positions, prefix)

    def forward(self, input_ids, attention_mask, image_positions, labels=None, pixel_values=None, features=None,
                features_depth=None, **kwargs):
        num_items = kwargs.pop("num_items_in_batch", None)
        embeds, mask, labels = self.embed(input_ids, attention_mask, image_positions, labels, pixel_values, features,
                                          features_depth)
        if labels is None:
            return self.llm(inputs_embeds=embeds, attention_mask=mask)
        loss = causal_lm_loss(self.llm, labels=labels, label_logits_only=self.label_logits_only,
                              num_items_in_batch=num_items, inputs_embeds=embeds, attention_mask=mask)
        return {"loss": loss}

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, image_positions, pixel_values=None, features=None,
                 features_depth=None, **gen_kwargs):
        """Generated token ids (new tokens only) for left-padded prompts."""
        embeds, mask, _ = self.embed(input_ids, attention_mask, image_positions, None, pixel_values, features,
                                     features_depth)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=mask, **gen_kwargs)
