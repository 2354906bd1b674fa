"""Evaluation of causal LMs: loss/perplexity on a split, batched generation, exact match and ROUGE-L."""

from __future__ import annotations

import dataclasses

import torch

from modaltune.shared.config import doc
from modaltune.shared.generation import DecodingConfig, TokenPrompts, generate
from modaltune.shared.loss import token_weighted_loss
from modaltune.shared.training import autocast
from modaltune.shared.metrics import exact_match, normalize_answer, perplexity, rouge_l
from modaltune.text.data import PadCollator, PromptFormatter, TokenizedDataset


@dataclasses.dataclass
class GenerationEvalConfig(DecodingConfig):
    """How responses are generated for evaluation (the decoding settings, and how many test examples)."""

    max_examples: int | None = doc(None, "generate for at most this many test examples (loss uses all)")


@torch.no_grad()
def evaluate_loss(model, dataset: TokenizedDataset, pad_id: int, *, batch_size: int, precision: str) -> dict:
    """Token-weighted mean loss and perplexity over ``dataset``."""
    if len(dataset) == 0:
        return {}
    model.eval()
    collate = PadCollator(pad_id)
    chunks = (range(start, min(start + batch_size, len(dataset))) for start in range(0, len(dataset), batch_size))
    batches = ({k: v.to(model.device) for k, v in collate([dataset[i] for i in chunk]).items()} for chunk in chunks)
    mean = token_weighted_loss(model, batches, lambda: autocast(precision, model.device))
    return {"loss": mean, "perplexity": perplexity(mean)}


def evaluate_generation(model, tokenizer, dataset: TokenizedDataset, formatter: PromptFormatter,
                        cfg: GenerationEvalConfig, *, precision: str, desc: str) -> tuple[dict, list[dict]]:
    """Exact match and ROUGE-L of generated responses; returns ``(metrics, per-item rows)``."""
    n = len(dataset) if cfg.max_examples is None else min(cfg.max_examples, len(dataset))
    if n == 0:
        return {}, []
    prompts = [dataset[i]["prompt_ids"] for i in range(n)]
    refs = [dataset.examples[i].response for i in range(n)]
    preds = generate(model, tokenizer, TokenPrompts(prompts, tokenizer), cfg, precision=precision, desc=desc)
    rouge = rouge_l(preds, refs)
    items = [
        {
            "id": dataset.examples[i].id,
            "category": dataset.examples[i].category,
            "prompt": formatter.prompt(dataset.examples[i]),
            "reference": refs[i],
            "prediction": preds[i],
            "exact": normalize_answer(preds[i]) == normalize_answer(refs[i]),
            "rougeL": rouge[i],
        }
        for i in range(n)
    ]
    metrics = {"exact_match": exact_match(preds, refs), "rougeL": sum(rouge) / n}
    return metrics, items


def measure_text(model, tokenizer, sets: dict[str, TokenizedDataset], formatter: PromptFormatter,
                 cfg: GenerationEvalConfig, *, batch_size: int, precision: str, label: str) -> tuple[dict, list[dict]]:
    """Loss and perplexity on the validation and test splits, exact match and ROUGE-L of generated test responses;
    returns ``(metrics, per-item rows)``."""
    metrics: dict[str, float] = {}
    for split in ("validation", "test"):
        for key, value in evaluate_loss(model, sets[split], tokenizer.pad_token_id, batch_size=batch_size,
                                        precision=precision).items():
            metrics[f"{split}/{key}"] = value
    gen_metrics, items = evaluate_generation(model, tokenizer, sets["test"], formatter, cfg, precision=precision,
                                             desc=f"test ({label})")
    metrics.update({f"test/{k}": v for k, v in gen_metrics.items()})
    return metrics, items


def measure_tasks(model, tokenizer, test: TokenizedDataset, formatter: PromptFormatter, cfg: GenerationEvalConfig,
                  tasks: list[str], *, batch_size: int, precision: str, label: str) -> tuple[dict, list[dict]]:
    """Per-task test loss, exact match and ROUGE-L (``TASK/loss``, ...), tasks being the examples' categories, and
    their macro mean (``mean/...``); one generation pass over ``test``. Returns ``(metrics, per-item rows)``."""
    metrics: dict[str, float] = {}
    _, items = evaluate_generation(model, tokenizer, test, formatter, cfg, precision=precision,
                                   desc=f"test ({label})")
    for task in tasks:
        part = test.subset(lambda ex: ex.category == task)
        loss = evaluate_loss(model, part, tokenizer.pad_token_id, batch_size=batch_size, precision=precision)
        rows = [r for r in items if r["category"] == task]
        metrics[f"{task}/loss"] = loss.get("loss", float("nan"))
        if rows:
            metrics[f"{task}/exact_match"] = sum(r["exact"] for r in rows) / len(rows)
            metrics[f"{task}/rougeL"] = sum(r["rougeL"] for r in rows) / len(rows)
    for key in ("loss", "exact_match", "rougeL"):
        values = [metrics[f"{t}/{key}"] for t in tasks if f"{t}/{key}" in metrics]
        if values:
            metrics[f"mean/{key}"] = sum(values) / len(values)
    return metrics, items
