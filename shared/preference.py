"""Preference optimisation (DPO and its relatives) on any modaltune model: sequence log-probabilities from the
model's own label-position loss, and the pairwise losses.

One implementation serves every model the core composes: a causal LM, or an LLM reading projected image or audio
tokens (``ComposedLM``), for which trl's ``DPOTrainer`` has no forward. A model's forward called with
``per_row=True`` returns each row's summed negative log-likelihood over its labelled (completion) tokens; the
policy and the reference are the same model with its adapters on and off (or a named reference adapter).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F

from modaltune.shared.config import doc
from modaltune.shared.errors import ConfigError

LOSS_TYPES = ("sigmoid", "hinge", "ipo")


@dataclasses.dataclass
class PreferenceConfig:
    """The preference loss."""

    beta: float = doc(0.1, "strength of the pull towards the reference (DPO's beta)")
    loss_type: Literal["sigmoid", "hinge", "ipo"] = doc("sigmoid", "sigmoid: DPO; hinge: SLiC; ipo: IPO (per-token "
                                                                   "averaged log-ratios, as trl computes it)")

    def validate(self, where: str) -> None:
        if self.beta <= 0:
            raise ConfigError(f"{where}.beta must be positive, got {self.beta}")


def sequence_logps(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Each row's log-probability of its labelled tokens, ``(B,)``: the negative of the model's per-row loss."""
    return -model(**batch, per_row=True)["loss"]


@contextlib.contextmanager
def reference_of(model: Any, adapter: str | None = None) -> Iterator[None]:
    """Run the block with the model as its own reference: every PEFT adapter switched off, or, with ``adapter``,
    that named adapter (e.g. a frozen copy of the SFT adapter) active instead of the trained one."""
    peft_models = [m for m in model.modules() if hasattr(m, "disable_adapter") and hasattr(m, "peft_config")]
    if not peft_models:
        raise ConfigError("the reference is the model with its adapters off, but this model has no adapters; "
                          "use an adapter method (lora, dora, ...) for preference training")
    flags = {id(p): p.requires_grad for p in model.parameters()}
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [p.requires_grad_(flags[id(p)]) for p in model.parameters()])  # set_adapter flips them
        for m in peft_models:
            if adapter is None:
                stack.enter_context(m.disable_adapter())
            else:
                active = m.active_adapter
                m.set_adapter(adapter)
                stack.callback(m.set_adapter, active)
        yield


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, cfg: PreferenceConfig, *, chosen_tokens: torch.Tensor | None = None,
                    rejected_tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The pairwise loss of sequence log-probs ``(B,)`` and the implicit rewards ``beta * (policy - reference)``.

    Returns ``loss`` (mean over pairs), ``per_pair``, ``chosen_rewards``, ``rejected_rewards``; a pair counts as
    preferred when its chosen reward beats its rejected one (``accuracy``), by ``margin``.
    """
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    if cfg.loss_type == "sigmoid":
        per_pair = -F.logsigmoid(cfg.beta * (chosen - rejected))
    elif cfg.loss_type == "hinge":
        per_pair = torch.relu(1 - cfg.beta * (chosen - rejected))
    elif cfg.loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo averages log-ratios per token: give chosen_tokens and rejected_tokens")
        delta = chosen / chosen_tokens.clamp(min=1) - rejected / rejected_tokens.clamp(min=1)
        per_pair = (delta - 1 / (2 * cfg.beta)) ** 2
    else:
        raise ConfigError(f"unknown preference loss {cfg.loss_type!r}; choose from {', '.join(LOSS_TYPES)}")
    chosen_rewards, rejected_rewards = cfg.beta * chosen.detach(), cfg.beta * rejected.detach()
    return {"loss": per_pair.mean(), "per_pair": per_pair, "chosen_rewards": chosen_rewards,
            "rejected_rewards": rejected_rewards, "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "margin": (chosen_rewards - rejected_rewards).mean()}
