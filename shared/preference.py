"""Preference optimisation (DPO and its relatives) on any modaltune model: sequence log-probabilities from the
model's own label-position loss, and the pairwise losses.

One implementation serves every model the core composes: a causal LM, or an LLM reading projected image or audio
tokens (``ComposedLM``), for which trl's ``DPOTrainer`` has no forward. A model's forward called with
``per_row=True`` returns each row's summed negative log-likelihood over its labelled (completion) tokens. The
reference is the same model: with its adapters off or a named reference adapter (:func:`reference_of`), or, in a
preference stage (:func:`preference_stage_trainer`), with the weights the stage started from.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from transformers import TrainingArguments

from modaltune.shared.config import doc
from modaltune.shared.errors import ConfigError
from modaltune.shared.loss import labelled_tokens
from modaltune.shared.provenance import data_fingerprint, fingerprint
from modaltune.shared.training import ModaltuneTrainer

LOSS_TYPES = ("sigmoid", "hinge", "ipo")


@dataclasses.dataclass
class PreferenceConfig:
    """The preference loss."""

    beta: float = doc(0.1, "strength of the pull towards the reference (DPO's beta)")
    loss_type: Literal["sigmoid", "hinge", "ipo"] = doc("sigmoid", "sigmoid: DPO; hinge: SLiC; ipo: IPO (per-token "
                                                                   "averaged log-ratios, as trl computes it)")
    sft_weight: float = doc(0.0, "add this weight times the chosen answers' per-token negative log-likelihood (RPO; "
                                 "trl's loss_type 'sft'): keeps the chosen answers likely while the gap grows")

    def validate(self, where: str) -> None:
        if self.beta <= 0:
            raise ConfigError(f"{where}.beta must be positive, got {self.beta}")
        if self.sft_weight < 0:
            raise ConfigError(f"{where}.sft_weight must be 0 or more, got {self.sft_weight}")


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

    Returns ``loss`` (mean over pairs, plus ``sft_weight`` times the chosen tokens' mean negative log-likelihood),
    ``per_pair``, ``chosen_rewards``, ``rejected_rewards``; a pair counts as
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
    loss = per_pair.mean()
    if cfg.sft_weight > 0:
        if chosen_tokens is None:
            raise ValueError("sft_weight averages the chosen answers' log-likelihood per token: give chosen_tokens")
        loss = loss - cfg.sft_weight * policy_chosen.sum() / chosen_tokens.sum().clamp(min=1)
    chosen_rewards, rejected_rewards = cfg.beta * chosen.detach(), cfg.beta * rejected.detach()
    return {"loss": loss, "per_pair": per_pair, "chosen_rewards": chosen_rewards,
            "rejected_rewards": rejected_rewards, "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "margin": (chosen_rewards - rejected_rewards).mean()}


class PairedDataset(torch.utils.data.Dataset):
    """Preference pairs from two aligned datasets of model items (the same prompt and input; the chosen answer in
    one, the rejected in the other): item ``i`` is ``{"chosen": ..., "rejected": ..., "index": i}``."""

    def __init__(self, chosen: Any, rejected: Any) -> None:
        if len(chosen) != len(rejected):
            raise ValueError(f"{len(chosen)} chosen items but {len(rejected)} rejected ones")
        self.chosen, self.rejected = chosen, rejected

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"chosen": self.chosen[i], "rejected": self.rejected[i], "index": i}

    def fingerprint(self) -> str:
        """Both sides' training content (see :func:`modaltune.shared.provenance.data_fingerprint`)."""
        return fingerprint(data_fingerprint(self.chosen), data_fingerprint(self.rejected))


class PairCollator:
    """Collates pairs into one batch of ``2B`` rows (the chosen answers, then the rejected ones), so a single
    forward scores both, with the pairs' dataset indices."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [b["chosen"] for b in batch] + [b["rejected"] for b in batch]
        return {"pairs": self.collator(rows), "index": torch.tensor([b["index"] for b in batch])}


def answer_tokens(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Each row's number of labelled (scored) tokens, ``(B,)``."""
    return labelled_tokens(model, batch["labels"])


def preference_stage_trainer(cfg: PreferenceConfig) -> Any:
    """A ``StagePlan.trainer`` for any modaltune model (a causal LM, an LLM reading image or audio tokens): the
    loss of :func:`preference_loss` on pairs from :class:`PairedDataset` / :class:`PairCollator`, against the
    model as the stage starts."""
    def make(*, arguments: dict[str, Any], **kwargs: Any) -> Any:
        return PreferenceTrainer(args=TrainingArguments(**arguments), preference=cfg, **kwargs)
    return make


class PreferenceTrainer(ModaltuneTrainer):
    """ModaltuneTrainer (component learning rates, checkpoints, resume) with a preference loss against the
    model as the stage starts: the weights this stage trains are kept as they were when the trainer was built,
    and a pair's reference log-probabilities are computed with them the first time the pair is seen, then
    reused. The reference is exact whatever trains: adapters, a projector, whole weights."""

    def __init__(self, *args: Any, preference: PreferenceConfig, **kwargs: Any) -> None:
        self.preference = preference
        super().__init__(*args, **kwargs)
        self.start = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        self.references: dict[tuple[int, int], tuple[float, float]] = {}
        self._logged: dict[str, list[float]] = {}

    @torch.no_grad()
    def _reference(self, inputs: dict[str, Any], dataset: Any) -> torch.Tensor:
        """``(B, 2)`` reference log-probs of a batch's pairs, computed with the stage's starting weights."""
        keys = [(id(dataset), int(i)) for i in inputs["index"]]
        missing = [k for k in keys if k not in self.references]
        if missing:
            model = self.model
            params = dict(model.named_parameters())
            now = {n: params[n].data for n in self.start}
            was_training = model.training
            model.eval()
            try:
                for n, value in self.start.items():
                    params[n].data = value
                with self.compute_loss_context_manager():
                    logps = sequence_logps(model, inputs["pairs"]).float().cpu()
            finally:
                for n, value in now.items():
                    params[n].data = value
                model.train(was_training)
            chosen, rejected = logps.chunk(2)
            for i, k in enumerate(keys):
                self.references[k] = (float(chosen[i]), float(rejected[i]))
        return torch.tensor([self.references[k] for k in keys], dtype=torch.float32)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """Trains with dropout off, as trl's DPOTrainer does: the log-probability ratios DPO compares would
        otherwise be noise on top of the policy's change."""
        rates = {m: m.p for m in self.model.modules() if isinstance(m, torch.nn.Dropout)}
        for m in rates:
            m.p = 0.0
        try:
            return super().train(*args, **kwargs)
        finally:
            for m, p in rates.items():
                m.p = p

    def _pair_loss(self, model: Any, inputs: dict[str, Any], dataset: PairedDataset) -> dict[str, torch.Tensor]:
        pairs = inputs["pairs"]
        ref = self._reference(inputs, dataset)
        logps = sequence_logps(model, pairs)
        tokens = answer_tokens(self.model, pairs)
        ref = ref.to(logps.device)
        chosen, rejected = logps.chunk(2)
        n_chosen, n_rejected = tokens.chunk(2)
        return preference_loss(chosen, rejected, ref[:, 0].to(logps.dtype), ref[:, 1].to(logps.dtype),
                               self.preference, chosen_tokens=n_chosen, rejected_tokens=n_rejected)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        out = self._pair_loss(model, inputs, self.train_dataset)
        for key in ("accuracy", "margin"):
            self._logged.setdefault(f"rewards/{key}", []).append(float(out[key]))
        for key in ("chosen_rewards", "rejected_rewards"):
            self._logged.setdefault(f"rewards/{key.split('_')[0]}", []).append(float(out[key].mean()))
        return (out["loss"], out) if return_outputs else out["loss"]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._logged:  # training logs carry the rewards since the last log
            logs.update({k: sum(v) / len(v) for k, v in self._logged.items()})
            self._logged = {}
        super().log(logs, *args, **kwargs)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"
                 ) -> dict:
        """Mean preference loss, reward accuracy and margin over the validation pairs."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        model, size = self.model, self.args.per_device_eval_batch_size
        was_training = model.training
        model.eval()
        sums = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
        with torch.no_grad():
            for start in range(0, len(dataset), size):
                part = [dataset[i] for i in range(start, min(start + size, len(dataset)))]
                with self.compute_loss_context_manager():
                    out = self._pair_loss(model, self._prepare_inputs(self.data_collator(part)), dataset)
                for key in sums:
                    sums[key] += float(out[key]) * len(part)
        model.train(was_training)
        metrics = {f"{metric_key_prefix}_{'loss' if k == 'loss' else 'rewards/' + k}": v / max(len(dataset), 1)
                   for k, v in sums.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
