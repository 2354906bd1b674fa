"""Evaluation of a speech LLM on its tasks: generation for the test rows, the scores, the report's parts.

:func:`measure_audio_llm` generates for the test rows and scores WER/CER, per-slot exact match, all-slots and
valid-JSON rates, custom tasks' exact match and, with ``shuffle``, all of it again with every clip's audio swapped
for another's: a model that reads the audio collapses there, one that writes a language prior does not. Answers
are compared after :func:`~modaltune.shared.metrics.normalize_answer`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modaltune.audio.eval import score
from modaltune.audio.tasks import ORDER_KEYS, parse_order, shuffled
from modaltune.shared.compose_data import ComposedPrompts
from modaltune.shared.config import doc
from modaltune.shared.generation import DecodingConfig, generate
from modaltune.shared.harness import metric_line, pair_items
from modaltune.shared.plots import grouped_bars
from modaltune.shared.metrics import normalize_answer

REPORT_NOTES = (
    "before = untrained projector and fresh LoRA; after_<stage> = after that stage; *_shuffled = the same test rows "
    "with every clip's audio swapped for another clip's.",
    "cascade = zero-shot Whisper transcript (its WER is test/wer) read by the same LLM tuned with LoRA on gold "
    "transcripts for the same tasks.",
    "WER/CER use Whisper's English normaliser, as domain-asr does; orders/*_accuracy is exact match per slot over "
    "the test orders that have it.",
)


@dataclasses.dataclass
class AudioLLMEvalConfig(DecodingConfig):
    """Generation for evaluation (the decoding settings) and the audio shuffle of the last evaluation."""

    shuffle_seed: int = doc(0, "seed of the audio shuffle of the last evaluation")


def order_scores(predictions: list[str], golds: list[dict[str, str]]) -> tuple[dict[str, float], list[dict]]:
    """Per-slot exact match (over the rows whose gold has the slot), all slots right (the same keys, each value
    right) and valid JSON, with a row per answer.

    Example:
        >>> m, _ = order_scores(['{"drug": "Aspirin"}', 'no'], [{"drug": "aspirin"}, {"drug": "heparin"}])
        >>> m["orders/drug_accuracy"], m["orders/valid_json"], m["orders/all_slots"]
        (0.5, 0.5, 0.5)
    """
    hits = {k: [] for k in ORDER_KEYS}
    valid, complete, rows = [], [], []
    for pred, gold in zip(predictions, golds):
        parsed = parse_order(pred)
        valid.append(parsed is not None)
        got = {normalize_answer(k): normalize_answer(v) for k, v in (parsed or {}).items()}
        right = {k: got.get(k) == normalize_answer(v) for k, v in gold.items()}
        for k, ok in right.items():
            hits[k].append(ok)
        complete.append(parsed is not None and set(got) == set(gold) and all(right.values()))
        rows.append({"valid_json": parsed is not None, "slots_right": sum(right.values()), "slots": len(gold)})
    n = max(len(golds), 1)
    metrics = {f"orders/{k}_accuracy": sum(v) / len(v) for k, v in hits.items() if v}
    metrics.update({"orders/all_slots": sum(complete) / n, "orders/valid_json": sum(valid) / n,
                    "orders/items": float(len(golds))})
    return metrics, rows


def score_rows(rows: list[dict[str, Any]], predictions: list[str], *, normalizer, seconds: dict[str, float],
               suffix: str = "") -> tuple[dict[str, float], list[dict]]:
    """Metrics of one generation pass over :func:`task_rows` rows (``suffix`` is appended to every key) and a row
    per item: ``test/wer``/``test/cer`` on transcription, ``orders/*`` on orders, ``<task>/accuracy`` on others."""
    metrics: dict[str, float] = {}
    items = [{"id": r["id"], "task": r["task"], "reference": r["target"], "prediction": p}
             for r, p in zip(rows, predictions)]
    by_task: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_task.setdefault(r["task"], []).append(i)
    for task, idx in by_task.items():
        preds, refs = [predictions[i] for i in idx], [rows[i]["target"] for i in idx]
        if task == "transcribe":
            audio = sum(seconds.get(rows[i]["input"], 0.0) for i in idx)
            got = score(preds, refs, 0.0, audio, normalizer=normalizer, terms=[])
            metrics.update({f"test/{k}": v for k, v in got.items() if k in {"wer", "cer", "wer_raw"}})
            for i, p in zip(idx, preds):
                s = score([p], [rows[i]["target"]], 0.0, 1.0, normalizer=normalizer, terms=[])
                items[i]["error"] = round(s["wer"], 4)
        elif task == "orders":
            got, per = order_scores(preds, [json.loads(t) for t in refs])
            metrics.update(got)
            for i, one in zip(idx, per):
                items[i]["error"] = round(1.0 - one["slots_right"] / max(one["slots"], 1), 4)
        else:
            right = [normalize_answer(p) == normalize_answer(t) for p, t in zip(preds, refs)]
            metrics[f"{task}/accuracy"] = sum(right) / len(right)
            for i, ok in zip(idx, right):
                items[i]["error"] = 0.0 if ok else 1.0
    return {k + suffix: v for k, v in metrics.items()}, items


def measure_audio_llm(model, tokenizer, rows: list[dict[str, Any]], *, dataset: Callable[[list[dict]], Any],
                      decoding: DecodingConfig, precision: str, normalizer, seconds: dict[str, float], encoder=None,
                      load: Callable[[str], Any] | None = None, shuffle: bool = False,
                      seed: int = 0) -> tuple[dict[str, float], list[dict]]:
    """Generate for the test rows and score them; with ``shuffle`` also on the audio-shuffled rows (``*_shuffled``
    keys; the items gain a ``shuffled`` answer).

    Args:
        dataset: rows -> a :class:`~modaltune.shared.compose_data.ComposedDataset`.
        decoding: how answers are decoded (:func:`~modaltune.shared.generation.generate`, under ``precision``).
        encoder, load: run the encoder on loaded clips (no feature cache).
    """
    def answers(data, label: str) -> list[str]:
        return generate(model, tokenizer, ComposedPrompts(data, tokenizer, encoder=encoder, load=load), decoding,
                        precision=precision, desc=label)

    metrics, items = score_rows(rows, answers(dataset(rows), "test"), normalizer=normalizer, seconds=seconds)
    if shuffle:
        mixed = shuffled(rows, seed)
        more, other = score_rows(mixed, answers(dataset(mixed), "test, audio shuffled"), normalizer=normalizer,
                                 seconds=seconds, suffix="_shuffled")
        metrics.update(more)
        for item, o in zip(items, other):
            item["shuffled"] = o["prediction"]
    return metrics, items


def task_line(metrics: dict) -> str:
    """The headline figures of one evaluation, for the log."""
    return metric_line(metrics, keys=lambda k: k in {"test/wer", "test/words_wer", "test/wer_shuffled",
                                                     "orders/drug_accuracy", "orders/drug_accuracy_shuffled",
                                                     "orders/valid_json"})


def pair_task_items(items: dict[str, list[dict]]) -> list[dict]:
    """One row per test item (``id``, ``task``, ``reference``) with every column's answer, its error in the last
    column (WER, share of order slots wrong, 1 for a wrong answer) and the shuffled-audio answer; worst first."""
    def extra(found: dict[str, dict]) -> dict:
        last = found[list(found)[-1]]
        return {"error": last.get("error"), "shuffled": last.get("shuffled")}
    return pair_items(items, key=("id",), keep=("task", "reference"), value="prediction", extra=extra,
                      sort=lambda r: -(r["error"] or 0.0))


def task_plots(run_dir: Path, columns: dict) -> list[dict]:
    """A grouped bar chart of WER and order scores per column (cascade, untrained, trained, trained with the audio
    shuffled)."""
    shown = {**columns}
    if "after" in columns:
        shown["after_shuffled"] = {k.removesuffix("_shuffled"): v for k, v in columns["after"].items()
                                   if k.endswith("_shuffled")}
    keys = [k for k in ("test/wer", "orders/drug_accuracy", "orders/all_slots", "orders/valid_json")
            if any(k in c for c in shown.values())]
    legend = {"cascade": "cascade (Whisper -> LLM)", "before": "untrained", "after": "trained",
              "after_shuffled": "trained, audio shuffled"}
    legend.update({k: k.replace("_", " ") for k in shown if k not in legend})
    path = grouped_bars(run_dir / "audio_llm.png", shown, keys, labels=keys, title="audio-llm on held-out clips",
                        legend=legend, ylabel="score")
    return [{"title": "Scores by condition (WER: lower is better)", "path": str(path)}]
