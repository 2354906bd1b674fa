"""Preference pairs for causal LMs: reading them, DPO training on trl's ``DPOTrainer`` inside modaltune's stages
(checkpoints, resume, reports), and the preference metrics of a report.

Pairs come as ``prompt`` / ``chosen`` / ``rejected`` rows in trl's standard form (strings), its conversational
form (lists of messages, the prompt explicit or implied by what ``chosen`` and ``rejected`` share), or with an
``instruction`` (and ``context``) in place of the prompt, like the instruction data. The prompt is rendered exactly
as instruction tuning renders it (:class:`~modaltune.text.data.PromptFormatter`), so DPO continues an SFT model in
its own prompt format.

The reference of DPO is the policy as the DPO stage starts: the SFT adapter (frozen) when DPO follows SFT or
starts from an SFT checkpoint, which for a fresh adapter is the base model with its adapter off. The report's
implicit rewards are measured against that same reference.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any

import torch

from modaltune.shared.config import doc
from modaltune.shared.errors import ConfigError
from modaltune.shared.loss import head_logits, head_transform, labelled_positions, unwrap_peft
from modaltune.shared.preference import PreferenceConfig, preference_loss, sequence_logps
from modaltune.shared.skips import Skips
from modaltune.shared.training import CheckpointingMixin, autocast
from modaltune.text.data import (Example, PadCollator, PromptFormatter, RowSkip, split_and_cap, text_field,
                                 to_example)


@dataclasses.dataclass
class PairDataConfig:
    """Where preference pairs come from and how they are split and cut."""

    source: str = doc("builtin:clinical_pref", "JSONL/JSON/CSV/Parquet/Arrow file, builtin:NAME, or hf:NAME[:CONFIG] "
                                               "with prompt (or instruction [+ context]), chosen and rejected")
    validation: str | None = doc(None, "separate validation file/dataset (default: split from source)")
    test: str | None = doc(None, "separate test file/dataset (default: split from source)")
    columns: dict[str, str] = doc({}, "map our field names (prompt, instruction, context, chosen, rejected, "
                                      "category) to your columns")
    hf_split: str = doc("train", "split to read from a datasets dataset")
    split: list[float] = doc([0.8, 0.1, 0.1], "train/validation/test fractions when the data has no split (the "
                                              "built-in pairs follow the instruction data row for row, so the same "
                                              "fractions and seed keep every test prompt out of training)")
    split_seed: int = doc(42, "seed of the train/validation/test shuffle")
    max_length: int = doc(256, "pairs whose prompt plus longer answer exceed this many tokens are dropped (counted)")
    max_train_pairs: int | None = doc(None, "use at most this many training pairs")
    max_eval_pairs: int | None = doc(None, "use at most this many validation and test pairs each")

    def validate(self, where: str) -> None:
        if len(self.split) != 3 or any(x < 0 for x in self.split) or abs(sum(self.split) - 1.0) > 1e-6:
            raise ConfigError(f"{where}.split must be three non-negative fractions summing to 1, got {self.split}")


@dataclasses.dataclass
class Pair:
    """One preference pair: the prompt with the chosen answer (an :class:`Example`) and the rejected answer."""

    example: Example
    rejected: str
    failure: str = ""  # what is wrong with the rejected answer, when the data says

    @property
    def rejected_example(self) -> Example:
        return dataclasses.replace(self.example, response=self.rejected)


def to_pair(rid: str, row: dict[str, Any], columns: dict[str, str]) -> Pair | str:
    """Normalise one row; returns a skip reason string when the row cannot be used.

    ``chosen`` and ``rejected`` are read as the answer field of the row's form (by
    :func:`~modaltune.text.data.to_example`, with its type checks), so a wrong one is named as itself: "chosen:
    expected a string, got list" (an instruction row's answers are strings; a prompt row's may be lists of
    messages).
    """
    def get(name: str) -> Any:
        return row.get(columns.get(name, name))

    chosen, rejected = get("chosen"), get("rejected")
    if chosen is None or rejected is None:
        return "missing chosen or rejected field"
    if get("instruction") is not None:
        fmt = "alpaca" if get("input") is not None else "dolly"
        answer = "output" if fmt == "alpaca" else "response"
    elif get("prompt") is not None:
        fmt, answer = "prompt_completion", "completion"
    elif isinstance(chosen, list) and isinstance(rejected, list):  # whole conversations: the prompt is implied
        fmt, answer = "messages", "messages"
    else:
        return "no prompt or instruction field (and chosen/rejected are not conversations)"
    both = [to_example(rid, row, fmt, {**columns, answer: columns.get(side, side)}) for side in ("chosen", "rejected")]
    for ex in both:
        if isinstance(ex, str):
            return ex
    good, bad = both
    if good.messages != bad.messages:
        return "chosen and rejected continue different conversations"
    if good.response == bad.response:
        return "chosen and rejected are the same answer"
    failure = get("failure")
    try:
        failure = "" if failure is None else text_field(failure, columns.get("failure", "failure"))
    except RowSkip as skip:
        return str(skip)
    return Pair(good, bad.response, failure)


def load_pairs(cfg: PairDataConfig) -> tuple[dict[str, list[Pair]], dict[str, Skips]]:
    """Read, normalise and split the pairs; malformed rows are counted per reason, not lost silently."""
    caps = {"train": cfg.max_train_pairs, "validation": cfg.max_eval_pairs, "test": cfg.max_eval_pairs}
    return split_and_cap(lambda rid, row: to_pair(rid, row, cfg.columns), cfg, caps, "pairs")


class TokenizedPairs(torch.utils.data.Dataset):
    """Pairs tokenised as instruction tuning tokenises an example: each item holds the chosen and the rejected
    sequence with labels on the answer (and EOS) only. Pairs longer than ``max_length`` are dropped and counted."""

    def __init__(self, pairs: list[Pair], formatter: PromptFormatter, max_length: int, skipped: Skips) -> None:
        self.pairs: list[Pair] = []
        self.items: list[dict[str, dict]] = []
        for pair in pairs:
            encoded = {side: formatter.encode(ex, max_length)
                       for side, ex in (("chosen", pair.example), ("rejected", pair.rejected_example))}
            if None in encoded.values():
                skipped.add(f"longer than max_length={max_length} tokens", pair.example.id)
                continue
            self.pairs.append(pair)
            self.items.append({side: {"input_ids": e.input_ids, "labels": e.labels} for side, e in encoded.items()})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, dict]:
        return self.items[i]

    def for_trl(self, formatter: PromptFormatter):
        """The pairs as a ``datasets.Dataset`` in trl's form: the rendered prompt and the answers as text for a
        plain template (trl adds EOS), messages for a chat template (trl applies it)."""
        from datasets import Dataset

        rows = []
        for pair in self.pairs:
            if formatter.use_chat:
                rows.append({"prompt": pair.example.messages,
                             "chosen": [{"role": "assistant", "content": pair.example.response}],
                             "rejected": [{"role": "assistant", "content": pair.rejected}]})
            else:
                rows.append({"prompt": formatter.prompt(pair.example), "chosen": pair.example.response,
                             "rejected": pair.rejected})
        return Dataset.from_list(rows)


@torch.no_grad()
def pair_logps(model: Any, pairs: TokenizedPairs, pad_id: int, *, batch_size: int, precision: str
               ) -> list[dict[str, float]]:
    """Each pair's summed log-probability of its chosen and its rejected answer (and their token counts)."""
    model.eval()
    collate = PadCollator(pad_id)
    rows: list[dict[str, float]] = []
    for start in range(0, len(pairs), batch_size):
        part = [pairs[i] for i in range(start, min(start + batch_size, len(pairs)))]
        got = {}
        for side in ("chosen", "rejected"):
            batch = {k: v.to(model.device) for k, v in collate([p[side] for p in part]).items()}
            with autocast(precision, model.device):
                got[side] = sequence_logps(model, batch).float().cpu()
        rows += [{"chosen_logp": float(got["chosen"][i]), "rejected_logp": float(got["rejected"][i]),
                  "chosen_tokens": sum(x != -100 for x in p["chosen"]["labels"]),
                  "rejected_tokens": sum(x != -100 for x in p["rejected"]["labels"])} for i, p in enumerate(part)]
    return rows


def preference_metrics(policy: list[dict], reference: list[dict], cfg: PreferenceConfig) -> dict[str, float]:
    """Implicit-reward accuracy and margin of ``policy`` against ``reference`` (per-pair log-probs from
    :func:`pair_logps`), and how often the policy alone gives the chosen answer the higher log-probability."""
    if not policy:
        return {}
    t = {f"{who}_{key}": torch.tensor([row[key] for row in rows], dtype=torch.float64)
         for who, rows in (("policy", policy), ("reference", reference)) for key in ("chosen_logp", "rejected_logp")}
    out = preference_loss(t["policy_chosen_logp"], t["policy_rejected_logp"], t["reference_chosen_logp"],
                          t["reference_rejected_logp"], cfg,
                          chosen_tokens=torch.tensor([r["chosen_tokens"] for r in policy], dtype=torch.float64),
                          rejected_tokens=torch.tensor([r["rejected_tokens"] for r in policy], dtype=torch.float64))
    return {"preference_accuracy": float(out["accuracy"]), "reward_margin": float(out["margin"]),
            "preference_loss": float(out["per_pair"].mean()),
            "logp_accuracy": float((t["policy_chosen_logp"] > t["policy_rejected_logp"]).double().mean())}


def dpo_stage_trainer(tokenizer: Any, cfg: PreferenceConfig, *, max_length: int,
                      gradient_checkpointing: bool = False):
    """A ``StagePlan.trainer`` that trains a modaltune causal LM on pairs with trl's ``DPOTrainer``.

    The reference is the LM as the stage starts: trl's frozen copy of the adapter (``ref``, removed when the stage
    ends), or a frozen copy of the whole LM for methods without adapters (``full``, ``hft``).
    """
    def make(*, model: Any, arguments: dict[str, Any], component_lrs: dict[str, float], data_collator: Any = None,
             **kwargs):
        try:
            from trl import DPOConfig
        except ImportError as exc:  # pragma: no cover - trl is in the dpo extra
            raise ConfigError("preference training needs trl: pip install 'modaltune[dpo]'") from exc
        lm = model.llm
        is_peft = hasattr(lm, "peft_config")
        ref = None if is_peft else copy.deepcopy(lm).eval().requires_grad_(False)
        args = DPOConfig(**{**arguments, "remove_unused_columns": True, "learning_rate": component_lrs.get(
            "llm", arguments["learning_rate"])}, beta=cfg.beta, max_length=max_length,
            loss_type=[cfg.loss_type, "sft"] if cfg.sft_weight else [cfg.loss_type],
            loss_weights=[1.0, cfg.sft_weight] if cfg.sft_weight else None,
            gradient_checkpointing=gradient_checkpointing, precompute_ref_log_probs=False)
        trainer = _dpo_trainer_class()(model=lm, ref_model=ref, args=args, processing_class=tokenizer, owner=model,
                                       **kwargs)
        if not torch.cuda.is_available():
            for scored in (unwrap_peft(lm), ref):
                if scored is not None:
                    _score_answers_only(scored)
        return trainer
    return make


def _score_answers_only(model: Any) -> None:
    """Make trl's fused LM head score only labelled (answer) positions on a CPU.

    trl 1.16 scores only the labelled positions with its Triton kernel; elsewhere it scores every position of the
    sequence against the whole vocabulary (so tile shapes stay fixed), which on a CPU with Gemma's 262k-token
    vocabulary is most of a DPO step (45 s of a 47 s step measured here). This forward keeps trl's contract (the
    same ``log_probs``, ``entropy``, ``mean_logits``, ``is_top1`` and ``label_mask``, zero off the labels) and
    computes the logits at the answer positions only, as modaltune's own loss does.
    """
    from trl.trainer.utils import FusedCausalLMOutput

    trl_forward = model.forward
    transform = head_transform(model.config.get_text_config())

    def forward(*args: Any, fused_lm_head: bool = False, labels: torch.Tensor | None = None, **kwargs: Any):
        if not fused_lm_head or labels is None or kwargs.get("output_router_logits") or kwargs.get("shift_labels") \
                is not None:
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        kwargs.pop("num_items_in_batch", None)
        hidden = model.get_decoder()(*args, **{**kwargs, "use_cache": False}).last_hidden_state  # (B, T, D)
        selected, targets, mask = labelled_positions(hidden, labels)  # (N, D), (N,), (B, T-1)
        logits = head_logits(selected, model.get_output_embeddings(), **transform)  # (N, V)
        log_z = torch.logsumexp(logits, dim=-1)
        chosen = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_z
        with torch.no_grad():
            probs = (logits - log_z.unsqueeze(-1)).exp()
            entropy = log_z - (probs * logits).sum(-1)
            mean, top1 = logits.mean(-1), logits.argmax(-1) == targets

        def spread(values: torch.Tensor) -> torch.Tensor:
            return values.new_zeros(mask.shape).masked_scatter(mask, values)

        log_probs = spread(chosen)
        return FusedCausalLMOutput(loss=-log_probs.sum() / mask.sum().clamp(min=1), log_probs=log_probs,
                                   entropy=spread(entropy), mean_logits=spread(mean), is_top1=spread(top1),
                                   label_mask=mask)

    model.forward = forward


@functools.cache
def _dpo_trainer_class() -> type:
    from trl import DPOTrainer

    class ModaltuneDPOTrainer(CheckpointingMixin, DPOTrainer):
        """trl's DPOTrainer writing modaltune checkpoints of the whole model (every trained weight, resumable)."""

        def create_model_card(self, *args: Any, **kwargs: Any) -> None:  # the checkpoint's metadata says it all
            return None

        def train(self, *args: Any, **kwargs: Any):
            try:
                return super().train(*args, **kwargs)
            finally:  # the frozen reference copy is not part of the trained model
                if "ref" in getattr(self.model, "peft_config", {}):
                    self.model.delete_adapter("ref")

    return ModaltuneDPOTrainer
