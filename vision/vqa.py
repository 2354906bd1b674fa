"""Vision-language training data, the frozen-encoder feature cache, and VQA/caption evaluation.

Prompts carry one placeholder (``<ImageHere>``); it is tokenised as a single pad token whose position each example
records, so the composed model can splice visual tokens there with no change to the LM's vocabulary.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Any

import torch
from tqdm.auto import tqdm

from modaltune.shared.loss import IGNORE_INDEX
from modaltune.shared.metrics import bleu, normalize_answer, rouge_l, token_recall
from modaltune.shared.skips import Skips
from modaltune.vision.data import CAPTION_INSTRUCTIONS, CAPTION_TEMPLATE, PLACEHOLDER, VQA_TEMPLATE
from modaltune.vision.images import load_image


def encode_prompt(tokenizer, text: str) -> tuple[list[int], int]:
    """Token ids of a prompt with its placeholder as one pad token, and that token's position."""
    if text.count(PLACEHOLDER) != 1:
        raise ValueError(f"prompt needs exactly one {PLACEHOLDER}: {text[:80]!r}")
    before, after = text.split(PLACEHOLDER)
    head = tokenizer(before, add_special_tokens=True)["input_ids"]
    tail = tokenizer(after, add_special_tokens=False)["input_ids"]
    return head + [tokenizer.pad_token_id] + tail, len(head)


def vqa_prompt(question: str) -> str:
    return VQA_TEMPLATE.format(question=question.strip())


def caption_prompt(instruction: str) -> str:
    return CAPTION_TEMPLATE.format(instruction=instruction)


class VLDataset(torch.utils.data.Dataset):
    """(image, prompt, target) examples tokenised with the loss on the target only."""

    def __init__(self, rows: list[dict[str, Any]], tokenizer, features: FeatureCache | None, *,
                 max_length: int, skipped: Skips) -> None:
        self.rows, self.items = [], []
        for row in rows:
            ids, pos = encode_prompt(tokenizer, row["prompt"])
            target = tokenizer(" " + row["target"].strip(), add_special_tokens=False)["input_ids"] + [
                tokenizer.eos_token_id]
            if len(ids) + len(target) > max_length:
                skipped.add(f"longer than max_length={max_length} tokens", row["id"])
                continue
            self.items.append({"input_ids": ids + target, "labels": [IGNORE_INDEX] * len(ids) + target,
                               "prompt_ids": ids, "image_position": pos, "image": row["image"],
                               "caption": row.get("type") == "caption"})
            self.rows.append(row)
        self.features = features

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.items[i])
        if self.features is not None:
            item["features"] = self.features.get(item["image"])
            if not self.features.complete:
                item["features_depth"] = self.features.depth
        return item


class VLCollator:
    """Pads a batch (right for training, left for generation) and shifts placeholder positions accordingly."""

    def __init__(self, pad_id: int, encoder=None, *, left: bool = False, prompt_only: bool = False) -> None:
        self.pad = pad_id
        self.encoder = encoder
        self.left = left
        self.prompt_only = prompt_only

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        key = "prompt_ids" if self.prompt_only else "input_ids"
        width = max(len(b[key]) for b in batch)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE_INDEX)
        pos = torch.zeros(len(batch), dtype=torch.long)  # (B,)
        for i, b in enumerate(batch):
            n = len(b[key])
            off = width - n if self.left else 0
            ids[i, off : off + n] = torch.tensor(b[key])
            mask[i, off : off + n] = 1
            if not self.prompt_only:
                labels[i, off : off + n] = torch.tensor(b["labels"])
            pos[i] = b["image_position"] + off
        out = {"input_ids": ids, "attention_mask": mask, "image_positions": pos}
        if not self.prompt_only:
            out["labels"] = labels
            if any(b.get("caption") for b in batch):  # targets that describe the image (projector.word_grounding)
                out["ground_words"] = torch.tensor([bool(b.get("caption")) for b in batch])
        if "features" in batch[0]:
            out["features"] = torch.stack([b["features"] for b in batch])
            if "features_depth" in batch[0]:
                out["features_depth"] = batch[0]["features_depth"]
        else:
            out["pixel_values"] = self.encoder.preprocess([load_image(b["image"]) for b in batch])
        return out


class FeatureCache:
    """Frozen-encoder outputs per image and preprocessing, computed once and reused across epochs and stages.

    ``depth`` (:meth:`ImageEncoder.cache_depth`; None: the output) is where the cached states are taken: below the
    lowest trained block when the encoder's top blocks train, so only those run on every step.
    """

    def __init__(self, encoder, *, batch_size: int = 32, autocast_dtype: torch.dtype | None = None,
                 depth: int | None = None) -> None:
        from modaltune.shared.loss import unwrap_peft

        self.encoder = encoder
        self.base = unwrap_peft(encoder)
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype
        self.depth = self.base.output_depth if depth is None else depth
        self.complete = self.depth == self.base.output_depth  # the states are the encoder output
        h = hashlib.sha256(f"{encoder.preprocessing_key}|depth={self.depth}".encode())
        for name, p in encoder.named_parameters():
            if not p.requires_grad:  # trained weights sit above the cached depth and change; frozen ones never do
                h.update(name.encode() + p.detach().float().sum().item().hex().encode())
        self.fingerprint = h.hexdigest()[:16]
        self.store: dict[str, torch.Tensor] = {}
        self.computed = 0

    def get(self, image: str) -> torch.Tensor:
        return self.store[image]

    @torch.no_grad()
    def fill(self, images: list[str], desc: str = "encoding images") -> None:
        """Encode every image not cached yet."""
        todo = sorted({i for i in images if i not in self.store})
        was = self.encoder.training
        self.encoder.eval()
        try:
            for start in tqdm(range(0, len(todo), self.batch_size), desc=desc, leave=False,
                              disable=len(todo) <= self.batch_size):
                chunk = todo[start : start + self.batch_size]
                pixels = self.encoder.preprocess([load_image(p) for p in chunk])
                with torch.autocast("cpu" if not torch.cuda.is_available() else "cuda",
                                    dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
                    feats = self.base.encode_prefix(pixels.to(next(self.encoder.parameters()).device),
                                                    self.depth).float().cpu()
                for path, f in zip(chunk, feats):
                    self.store[path] = f.contiguous()  # (N, D)
                    self.computed += 1
        finally:
            self.encoder.train(was)


def caption_rows(items, seed: int) -> list[dict[str, Any]]:
    """Stage-1 rows: one of the caption instructions (picked at random, seeded) -> caption."""
    rng = random.Random(seed)
    return [{"id": it.id, "image": it.image, "prompt": caption_prompt(rng.choice(CAPTION_INSTRUCTIONS)),
             "target": it.caption, "type": "caption"} for it in items]


def vqa_rows(items) -> list[dict[str, Any]]:
    """Stage-2 rows from VQA items."""
    return [{"id": it.id, "image": it.image, "prompt": vqa_prompt(it.question), "target": it.answer,
             "type": it.answer_type, "question": it.question} for it in items]


@torch.no_grad()
def generate_answers(model, tokenizer, dataset: VLDataset, *, batch_size: int, max_new_tokens: int, num_beams: int,
                     encoder=None, desc: str = "answering", precision: str = "fp32") -> list[str]:
    """Generated answers for every example of ``dataset`` (left-padded batches, greedy or beam).

    Short answers after long prompts make this prefill-bound, so it runs under the training precision's autocast.
    """
    from modaltune.text.eval import autocast

    model.eval()
    collate = VLCollator(tokenizer.pad_token_id, encoder, left=True, prompt_only=True)
    out: list[str] = []
    for start in tqdm(range(0, len(dataset), batch_size), desc=desc, leave=False):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with autocast(precision, model.device):
            gen = model.generate(**batch, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out += [t.strip() for t in tokenizer.batch_decode(gen, skip_special_tokens=True)]
    return out


@torch.no_grad()
def closed_image_margin(model, tokenizer, dataset: VLDataset, *, batch_size: int, encoder=None,
                        precision: str = "fp32") -> dict[str, float]:
    """How much the image moves the yes-versus-no decision when the question is held fixed.

    For every yes/no question of ``dataset`` this takes the first answer token's logit margin, ``yes`` minus
    ``no``. Questions are grouped by their normalised text; within each group that has both answers, the gap is the
    mean margin where the truth is yes minus the mean where it is no. ``closed_image_margin`` averages the gaps
    (in logits): about 0 when the model answers from the question alone and never looks, large and positive when
    the image decides. ``closed_image_margin_questions`` counts the groups. One prefill per question; no sampling.
    """
    from modaltune.text.eval import autocast

    yes = tokenizer(" yes", add_special_tokens=False)["input_ids"][0]
    no = tokenizer(" no", add_special_tokens=False)["input_ids"][0]
    idx = [i for i, row in enumerate(dataset.rows)
           if row.get("type") == "closed" and normalize_answer(row["target"]) in {"yes", "no"}]
    if not idx:
        return {}
    model.eval()
    collate = VLCollator(tokenizer.pad_token_id, encoder, left=True, prompt_only=True)
    margins: list[float] = []
    for start in range(0, len(idx), batch_size):
        batch = collate([dataset[i] for i in idx[start : start + batch_size]])
        batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with autocast(precision, model.device):
            embeds, mask, _ = model.embed(batch["input_ids"], batch["attention_mask"], batch["image_positions"],
                                          None, batch.get("pixel_values"), batch.get("features"),
                                          batch.get("features_depth"))
            logits = model.llm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=1).logits[:, -1].float()
        margins += (logits[:, yes] - logits[:, no]).tolist()  # left padding: the last position is the prompt's end
    groups: dict[str, dict[str, list[float]]] = {}
    for i, m in zip(idx, margins):
        row = dataset.rows[i]
        g = groups.setdefault(normalize_answer(row.get("question", "")), {"yes": [], "no": []})
        g[normalize_answer(row["target"])].append(m)
    gaps = [sum(g["yes"]) / len(g["yes"]) - sum(g["no"]) / len(g["no"]) for g in groups.values() if g["yes"] and g["no"]]
    if not gaps:
        return {}
    return {"closed_image_margin": sum(gaps) / len(gaps), "closed_image_margin_questions": float(len(gaps))}


_NEGATED = re.compile(r"\b(?:not|no|never|without)\b|n't\b")


def closed_class(question: str, answer: str, answer_type: str, mode: str = "presence") -> str | None:
    """The class of a closed question: its answer (``mode="answer"``), or whether the thing it asks about is
    there (``"presence"``: a yes to a plain question or a no to a negated one means present); None for open
    questions and, under ``presence``, for answers other than yes/no."""
    if answer_type != "closed":
        return None
    answer = answer.strip().lower()
    if mode == "answer":
        return answer
    if answer not in {"yes", "no"}:
        return None
    negated = bool(_NEGATED.search(question.lower()))
    return "present" if (answer == "yes") != negated else "absent"


def vqa_metrics(rows: list[dict], answers: list[str]) -> tuple[dict[str, float], list[dict]]:
    """Accuracy overall and per answer type (closed, open), open-ended token recall; per-question rows.

    ``closed_balanced_accuracy`` is the mean of the closed accuracies on questions about something present and
    about something absent (see :func:`closed_class`): a model that never looks and always answers "absent" scores
    0.5 there whatever the share of absent questions, so it exposes the shortcut plain closed accuracy hides.
    """
    per_item = []
    for row, ans in zip(rows, answers):
        correct = normalize_answer(ans) == normalize_answer(row["target"])
        per_item.append({"id": row["id"], "image": row["image"], "type": row["type"], "question": row["question"],
                         "reference": row["target"], "prediction": ans, "correct": correct,
                         "token_recall": round(token_recall(ans, row["target"]), 4)})
    metrics: dict[str, float] = {}
    if per_item:
        metrics["accuracy"] = sum(r["correct"] for r in per_item) / len(per_item)
    for kind in ("closed", "open"):
        sub = [r for r in per_item if r["type"] == kind]
        if sub:
            metrics[f"{kind}_accuracy"] = sum(r["correct"] for r in sub) / len(sub)
            if kind == "open":
                metrics["open_token_recall"] = sum(r["token_recall"] for r in sub) / len(sub)
    by_class: dict[str, list[bool]] = {}
    for row, item in zip(rows, per_item):
        label = closed_class(row["question"], row["target"], row["type"])
        if label is not None:
            by_class.setdefault(label, []).append(item["correct"])
    if len(by_class) == 2:
        metrics["closed_balanced_accuracy"] = sum(sum(v) / len(v) for v in by_class.values()) / 2
    return metrics, per_item


def caption_metrics(rows: list[dict], captions: list[str]) -> dict[str, float]:
    """BLEU-4 and ROUGE-L of generated captions."""
    refs = [r["target"] for r in rows]
    if not refs:
        return {}
    return {"bleu": bleu(captions, refs), "rougeL": sum(rouge_l(captions, refs)) / len(refs)}


def closed_confusion(per_item: list[dict]) -> dict[str, dict[str, int]]:
    """Reference answer -> predicted answer counts for closed questions (unexpected predictions: 'other')."""
    closed = [r for r in per_item if r["type"] == "closed"]
    labels = sorted({normalize_answer(r["reference"]) for r in closed})
    table: dict[str, dict[str, int]] = {ref: {lab: 0 for lab in labels + ["other"]} for ref in labels}
    for r in closed:
        pred = normalize_answer(r["prediction"])
        table[normalize_answer(r["reference"])][pred if pred in labels else "other"] += 1
    return table
