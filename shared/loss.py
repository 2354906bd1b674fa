"""Causal-LM loss that runs the output layer only where a label is.

With short sequences and a large vocabulary (Gemma-3's 262k entries) the ``(B, T, V)`` logits tensor is the biggest
cost of a training step: prompt tokens, padding and placeholder positions never carry a label, so projecting them
through the output layer is wasted time and memory. :func:`causal_lm_loss` runs the LM body, gathers the hidden
states at labelled positions and projects only those.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def labelled_positions(hidden: torch.Tensor, labels: torch.Tensor, *, shift: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hidden states that predict a label, their target ids, and where they are.

    Args:
        hidden: final hidden states, ``(B, T, D)``.
        labels: token ids with ``-100`` where no loss is taken, ``(B, T)``.
        shift: position ``t`` predicts ``labels[t+1]`` (causal LMs); else ``labels[t]`` (Whisper's decoder).

    Returns:
        ``(selected, targets, mask)``: ``(N, D)`` hidden states, ``(N,)`` ids, and the ``(B, T-1)`` (or ``(B, T)``
        unshifted) mask of the labelled positions.
    """
    shift_labels = labels[:, 1:] if shift else labels  # (B, T-1) or (B, T)
    mask = shift_labels != IGNORE_INDEX
    return (hidden[:, :-1] if shift else hidden)[mask], shift_labels[mask], mask  # (N, D), (N,), (B, T')


def head_logits(selected: torch.Tensor, head: nn.Module, *, softcap: float | None = None,
                logit_scale: float | None = None) -> torch.Tensor:
    """fp32 logits ``(N, V)`` of hidden states ``(N, D)``, scaled and soft-capped as the model declares
    (:func:`head_transform`)."""
    logits = head(selected).float()  # (N, V)
    if logit_scale is not None:
        logits = logits * logit_scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def label_logits_cross_entropy(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: nn.Module,
    *,
    softcap: float | None = None,
    logit_scale: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    shift: bool = True,
    per_row: bool = False,
) -> torch.Tensor:
    """Next-token cross entropy computing logits only at labelled positions.

    Args:
        hidden: final hidden states, ``(B, T, D)``.
        labels: token ids with ``-100`` where no loss is taken, ``(B, T)``; position ``t`` predicts ``labels[t+1]``.
        head: the output projection (``lm_head``).
        softcap: Gemma-2 style final-logit soft-capping (``tanh(x / c) * c``), if the model uses it.
        logit_scale: multiplier applied to logits (Cohere ``logit_scale``; Granite's ``1 / logits_scaling``).
        num_items_in_batch: token count to divide by (the whole accumulated batch); default: this batch's count.
        shift: ``True`` for causal LMs (position ``t`` predicts ``labels[t+1]``); ``False`` for encoder-decoders
            such as Whisper, whose decoder input is already shifted (position ``t`` predicts ``labels[t]``).
        per_row: return each row's summed loss, ``(B,)`` (a sequence's negative log-likelihood, as preference losses
            need), instead of the mean.

    Returns:
        The mean loss over labelled tokens, as a scalar (``per_row``: the per-row sums).
    """
    selected, targets, mask = labelled_positions(hidden, labels, shift=shift)  # (N, D), (N,)
    if targets.numel() == 0:
        return hidden.new_zeros(labels.size(0)) + hidden.sum() * 0.0 if per_row else hidden.sum() * 0.0
    logits = head_logits(selected, head, softcap=softcap, logit_scale=logit_scale)  # (N, V)
    if per_row:
        token_loss = F.cross_entropy(logits, targets.to(logits.device), reduction="none")  # (N,)
        rows = mask.nonzero()[:, 0].to(token_loss.device)  # the row of each selected position
        return token_loss.new_zeros(labels.size(0)).index_add(0, rows, token_loss)
    loss = F.cross_entropy(logits, targets.to(logits.device), reduction="sum")
    denom = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    if isinstance(denom, torch.Tensor):
        denom = denom.to(loss.device)
    return loss / denom


def full_logits_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None,
    per_row: bool = False,
) -> torch.Tensor:
    """Reference next-token loss from full ``(B, T, V)`` logits (what plain transformers computes); ``per_row``:
    each row's summed loss."""
    if per_row:
        token_loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:].to(logits.device),
                                     ignore_index=IGNORE_INDEX, reduction="none")  # (B, T-1)
        return token_loss.sum(dim=1)
    shift_logits = logits[:, :-1].float().reshape(-1, logits.size(-1))
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    denom = num_items_in_batch if num_items_in_batch is not None else (shift_labels != IGNORE_INDEX).sum()
    return loss / denom


def head_transform(config: object) -> dict[str, float | None]:
    """The logit post-processing a causal LM config declares (soft-capping, scaling)."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    granite = getattr(config, "logits_scaling", None)
    if granite:
        scale = (scale or 1.0) / granite
    return {"softcap": softcap, "logit_scale": scale}


def unwrap_peft(lm: nn.Module) -> nn.Module:
    """The transformers model under a ``PeftModel`` (LoRA layers stay injected)."""
    get_base = getattr(lm, "get_base_model", None)
    return get_base() if callable(get_base) else lm


def uses_virtual_tokens(lm: nn.Module) -> bool:
    """True for prompt/prefix tuning, whose PEFT forward must run (it prepends virtual tokens)."""
    cfg = getattr(lm, "peft_config", None)
    if not cfg:
        return False
    active = cfg.get(getattr(lm, "active_adapter", "default")) or next(iter(cfg.values()))
    return bool(getattr(active, "is_prompt_learning", False))


def causal_lm_loss(
    lm: nn.Module,
    *,
    labels: torch.Tensor,
    label_logits_only: bool = True,
    num_items_in_batch: int | torch.Tensor | None = None,
    per_row: bool = False,
    **inputs: torch.Tensor,
) -> torch.Tensor:
    """Loss of a (possibly PEFT-wrapped) causal LM on ``inputs`` (``input_ids`` or ``inputs_embeds``, mask).

    With ``label_logits_only`` the LM body runs once and the output layer only at labelled positions; prompt and
    prefix tuning fall back to the full forward, which PEFT needs to prepend virtual tokens.
    """
    if not label_logits_only or uses_virtual_tokens(lm):
        out = lm(**inputs, use_cache=False)
        logits = out.logits[:, -labels.size(1) :]  # prompt tuning prepends virtual-token positions
        return full_logits_cross_entropy(logits, labels, num_items_in_batch, per_row=per_row)
    base = unwrap_peft(lm)
    body = base.get_decoder()
    hidden = body(**inputs, use_cache=False).last_hidden_state  # (B, T, D)
    return label_logits_cross_entropy(
        hidden, labels, base.get_output_embeddings(), num_items_in_batch=num_items_in_batch, per_row=per_row,
        **head_transform(base.config)
    )


def labelled_tokens(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """Each row's number of labelled (scored) tokens, ``(B,)``, as ``model``'s loss counts them: ``labels[:, 1:]``
    for a causal LM, every position for a model whose labels are already shifted (``shifted_labels = False``:
    Whisper's decoder)."""
    scored = labels[:, 1:] if getattr(model, "shifted_labels", True) else labels
    return (scored != IGNORE_INDEX).sum(dim=1)


@torch.no_grad()
def token_weighted_loss(model: nn.Module, batches: Iterable[dict[str, Any]],
                        context: Callable[[], AbstractContextManager] = contextlib.nullcontext) -> float:
    """The mean loss over every labelled token of ``batches`` (a split's validation loss, as reports give it).

    Each batch's loss (its mean over its labelled tokens) is weighted by its labelled-token count, so the figure
    does not depend on how the split is batched. The model's train/eval mode is the caller's to set.

    Args:
        model: a model whose forward takes a batch (with ``labels``) and returns its mean ``loss``.
        batches: the split's batches on the model's device, made as they are consumed.
        context: a fresh context manager around each forward (autocast).

    Returns:
        The mean (0.0 when no token is labelled).
    """
    total, tokens = 0.0, 0
    for batch in batches:
        n = int(labelled_tokens(model, batch["labels"]).sum())
        with context():
            loss = model(**batch)["loss"]
        total += float(loss) * n
        tokens += n
    return total / max(tokens, 1)


@torch.no_grad()
def check_label_logits(lm: nn.Module, vocab_size: int, *, device: torch.device | str = "cpu") -> float:
    """Compare label-only and full-logits loss on a random batch; returns the absolute difference.

    Run once when a model is set up, so an architecture whose output layer does something :func:`causal_lm_loss`
    does not know about is caught (and trained with full logits) instead of silently mis-trained.
    """
    was_training = lm.training
    lm.eval()
    try:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, max(4, min(vocab_size, 1000)), (2, 12), generator=gen).to(device)
        labels = ids.clone()
        labels[:, :5] = IGNORE_INDEX
        mask = torch.ones_like(ids)
        fast = causal_lm_loss(lm, labels=labels, input_ids=ids, attention_mask=mask)
        full = causal_lm_loss(lm, labels=labels, label_logits_only=False, input_ids=ids, attention_mask=mask)
        return float((fast - full).abs())
    finally:
        lm.train(was_training)
