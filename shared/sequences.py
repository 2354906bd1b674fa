"""Token sequences for training: a prompt and its target as one sequence with the loss on the target only, and a
batch of sequences padded to one width.

Every dataset that trains an LM on a prompt and an answer (instruction tuning, preference pairs, composed models,
the audio-LLM cascade) builds its items with :func:`encode_prompt_target`, and every collator pads with
:func:`pad_sequences` / :func:`pad_batch`, so the rule (the target ends with EOS, the prompt carries no loss,
padding carries no loss and no attention) is written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from modaltune.shared.loss import IGNORE_INDEX


class PromptTarget(NamedTuple):
    """A prompt and its target tokenised as one training sequence."""

    prompt_ids: list[int]
    """The prompt's tokens (what generation starts from)."""
    input_ids: list[int]
    """The prompt's tokens, then the target's, then EOS."""
    labels: list[int]
    """``input_ids`` with ``-100`` where no loss is taken (the prompt, unless ``prompt_labels`` says otherwise)."""


def encode_prompt_target(tokenizer: Any, prompt: str | list[int], target: str, *,
                         prompt_labels: list[int] | None = None, special_tokens: bool = True,
                         max_length: int | None = None) -> PromptTarget | None:
    """A prompt and its target as token ids with the loss on the target (and its EOS) only.

    Args:
        tokenizer: the LM's tokenizer.
        prompt: the prompt's text, or its token ids when the caller tokenised it (a chat template, a placeholder).
        target: the target's text exactly as it is tokenised (no special tokens; the caller adds any leading
            space); EOS is appended so the model learns to stop.
        prompt_labels: the prompt's labels (default: ``-100`` on every prompt token), e.g. a conversation's earlier
            answers left trainable.
        special_tokens: tokenise a text ``prompt`` with the tokenizer's special tokens (BOS).
        max_length: a longer sequence gives None (the caller counts it as skipped).

    Returns:
        The sequence, or None when it is longer than ``max_length``.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=special_tokens)["input_ids"] if isinstance(prompt, str) \
        else prompt
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt_ids + target_ids
    if max_length is not None and len(ids) > max_length:
        return None
    if prompt_labels is None:
        prompt_labels = [IGNORE_INDEX] * len(prompt_ids)
    return PromptTarget(prompt_ids, ids, prompt_labels + target_ids)


def pad_sequences(sequences: Sequence[Sequence[int]], value: int, *, left: bool = False,
                  width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of ids as one batch, each padded with ``value`` to the longest (or to ``width``).

    Args:
        sequences: the rows, of any lengths.
        value: the padding id (the pad token; ``-100`` for labels).
        left: pad on the left (generation: every prompt ends where its answer starts), else on the right.
        width: the batch's width (default: the longest row).

    Returns:
        ``(B, T)`` long tensor of the rows and ``(B, T)`` attention mask (1 on a row's tokens, 0 on padding).

    Example:
        >>> ids, mask = pad_sequences([[5, 6, 7], [8]], 0, left=True)
        >>> ids.tolist(), mask.tolist()
        ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    width = max(len(s) for s in sequences) if width is None else width
    out = torch.full((len(sequences), width), value, dtype=torch.long)  # (B, T)
    mask = torch.zeros_like(out)
    for i, seq in enumerate(sequences):
        n = len(seq)
        off = width - n if left else 0
        out[i, off : off + n] = torch.tensor(seq)
        mask[i, off : off + n] = 1
    return out, mask


def pad_batch(input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]] | None = None, *, pad_id: int,
              left: bool = False) -> dict[str, torch.Tensor]:
    """``input_ids`` padded with ``pad_id``, their ``attention_mask``, and ``labels`` (if given; each as long as its
    row of ids) padded with ``-100`` on the same side, all ``(B, T)``.

    Example:
        >>> batch = pad_batch([[5, 6, 7], [8]], [[-100, 6, 7], [8]], pad_id=0)
        >>> batch["input_ids"].tolist(), batch["labels"].tolist()
        ([[5, 6, 7], [8, 0, 0]], [[-100, 6, 7], [8, -100, -100]])
    """
    ids, mask = pad_sequences(input_ids, pad_id, left=left)
    out = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        out["labels"] = pad_sequences(labels, IGNORE_INDEX, left=left, width=ids.size(1))[0]
    return out
