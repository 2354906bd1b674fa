"""Projectors: the trainable bridge from grouped encoder tokens into the LLM's embedding space.

A projector registered in ``PROJECTORS`` is a plain module, ``(B, M, k*D_enc) -> (B, M, D_llm)`` (LLaVA style);
the composed model wraps what it returns in a :class:`ProjectorOutput`. A projector that has more to say (which of
its tokens the LLM is shown, what its auxiliary loss needs) returns a :class:`ProjectorOutput` itself, and keeps no
state between calls.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from modaltune.shared.loss import unwrap_peft
from modaltune.shared.registry import PROJECTORS


@dataclasses.dataclass
class ProjectorOutput:
    """What a projector made of one batch of grouped encoder tokens.

    Attributes:
        tokens: ``(B, M, D_llm)`` tokens in the LLM's embedding space.
        shown: ``(B, M0)`` bool over the first ``M0 <= M`` tokens: which of them the LLM is shown (a collapsing
            word projector drops blanks and repeats); None: all.
        aux: what the projector's own ``grounding_loss(output, labels, rows)`` needs (e.g. the word projector's
            soft choices); None when it has none.
        real: ``(B, M)`` bool, which tokens hold the input (clips of different lengths); None: all. The composed
            model sets it (:meth:`~modaltune.shared.compose.core.ComposedLM.project`), not the projector.
    """

    tokens: torch.Tensor
    shown: torch.Tensor | None = None
    aux: Any = None
    real: torch.Tensor | None = None


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


def embedding_rms(lm: nn.Module, samples: int = 4096) -> float:
    """Mean per-token RMS of ``lm``'s input embeddings as the LM sees them (Gemma's scaling included)."""
    emb = unwrap_peft(lm).get_input_embeddings()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, emb.num_embeddings, (samples,), generator=gen).to(emb.weight.device)
    with torch.no_grad():
        vecs = emb(ids).float()  # (S, D)
    return float(vecs.pow(2).mean(-1).sqrt().mean())
