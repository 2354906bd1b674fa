"""VQA and caption data sets for composed vision-language models, and their evaluation.

:func:`load_vqa_sets` reads a layout (easy-vqa, VQA-RAD, SLAKE, PathVQA, JSONL) and draws the seeded samples a
config asks for; :func:`vqa_datasets` turns them into :class:`~modaltune.shared.compose_data.ComposedDataset` rows
with the MiniGPT-Med templates; :func:`measure_vqa` generates answers and captions and scores them (accuracy per
answer type, balanced closed accuracy, the closed image margin, caption BLEU/ROUGE-L).
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from pathlib import Path
from typing import Any, Literal

import torch

from modaltune.shared.compose_data import ComposedCollator, ComposedDataset, ComposedPrompts, to_device
from modaltune.shared.config import doc
from modaltune.shared.errors import DataError
from modaltune.shared.features import FeatureCache
from modaltune.shared.generation import DecodingConfig, generate
from modaltune.shared.preference import PairedDataset
from modaltune.shared.metrics import bleu, normalize_answer, rouge_l, token_recall
from modaltune.shared.plots import pyplot, save_figure
from modaltune.shared.skips import Skips, add_to_summary
from modaltune.vision import data as vdata
from modaltune.vision.data import CAPTION_INSTRUCTIONS, CAPTION_TEMPLATE, PLACEHOLDER, VQA_TEMPLATE
from modaltune.vision.images import load_image


@dataclasses.dataclass
class VQADataConfig:
    """Caption and VQA data."""

    layout: Literal["easy-vqa", "vqa-rad", "slake", "pathvqa", "jsonl"] = doc("easy-vqa", "easy-vqa | vqa-rad | slake | pathvqa | jsonl")
    train: str | None = doc(None, "training questions file (JSON/JSONL in the layout's format)")
    test: str | None = doc(None, "test questions file")
    image_dir: str | None = doc(None, "folder the question files name images in")
    captions: str | None = doc(None, "stage-1 captions: ROCO-style caption file (null: derive from the VQA data)")
    caption_images: str | None = doc(None, "folder of the caption images")
    max_train_images: int | None = doc(None, "draw questions and captions from at most this many training images")
    max_test_images: int | None = doc(None, "draw test questions and captions from at most this many test images")
    max_train_questions: int | None = doc(None, "use at most this many training questions (seeded sample)")
    max_test_questions: int | None = doc(None, "evaluate on at most this many test questions (seeded sample)")
    max_train_captions: int | None = doc(None, "use at most this many training captions")
    max_test_captions: int | None = doc(None, "evaluate at most this many captions")
    seed: int = doc(0, "seed of the samples")
    max_length: int = doc(128, "examples longer than this many tokens (visual tokens excluded) are dropped")
    root_only: bool = doc(False, "skip images whose paths lead outside their image folder (absolute, .., links); "
                                 "turn on for question files from others")
    balance_closed: Literal["none", "answer", "presence"] = doc(
        "none", "balance the closed training questions (seeded downsampling of the larger class): none | answer "
               "(as many yes as no) | presence (as many 'the asked thing is there' as 'it is not', reading "
               "negations: 'is there not a ...? no' means present)")

    closed_rationale: Literal["none", "caption"] = doc(
        "none", "closed questions are answered after saying what the image shows: none | caption (the image's "
                "caption, then the answer: 'A red circle. Answer: no'); needs captions of the VQA images (easy-vqa "
                "derives them; a caption file naming the same images works); questions whose image has none keep "
                "the plain answer, counted in the report")


@dataclasses.dataclass
class VQAEvalConfig(DecodingConfig):
    """Generation for evaluation: the decoding settings (``max_new_tokens``: the longest answer, a rationale
    included) and the longest caption."""

    max_caption_tokens: int = doc(16, "longest caption, in tokens")


SETS = ("vqa_train", "vqa_test", "caption_train", "caption_test")


def load_vqa_sets(d: VQADataConfig) -> tuple[dict[str, list], dict[str, dict]]:
    """Questions and captions per set (``vqa_train``, ``vqa_test``, ``caption_train``, ``caption_test``), seeded
    samples drawn and every image decoded once; returns ``(sets, data counts for the report)``.

    Raises:
        DataError: a question file is missing or not set, or no training question is usable.
    """
    skipped = {s: Skips() for s in SETS}
    if d.layout == "easy-vqa":
        train, s1 = vdata.read_easy_vqa("train")
        test, s2 = vdata.read_easy_vqa("test")
    else:
        if not d.train or not d.test:
            raise DataError(f"data.layout={d.layout}: set data.train and data.test (question files)")
        reader = {"vqa-rad": vdata.read_vqa_rad, "slake": vdata.read_slake, "pathvqa": vdata.read_pathvqa,
                  "jsonl": vdata.read_vqa_jsonl}[d.layout]
        image_dir = d.image_dir or str(Path(d.train).parent)
        train, s1 = reader(d.train, image_dir)
        test, s2 = reader(d.test, image_dir)
        if d.root_only:
            train = vdata.keep_within(train, image_dir, s1)
            test = vdata.keep_within(test, image_dir, s2)
    skipped["vqa_train"].update(s1)
    skipped["vqa_test"].update(s2)
    rng = random.Random(d.seed)
    train = sample_images(train, d.max_train_images, rng, skipped["vqa_train"], "max_train_images")
    test = sample_images(test, d.max_test_images, rng, skipped["vqa_test"], "max_test_images")
    if d.captions:
        caption_images = d.caption_images or str(Path(d.captions).parent)
        caps, s3 = vdata.read_roco_captions(caption_images, d.captions)
        if d.root_only:
            caps = vdata.keep_within(caps, caption_images, s3)
        skipped["caption_train"].update(s3)
        rng.shuffle(caps)
        n_test = min(len(caps) // 10, d.max_test_captions or len(caps))
        cap_test, cap_train = caps[:n_test], caps[n_test:]
    else:  # derived from the VQA data (every image's facts), so stage 1 needs no extra files
        cap_train, s4 = vdata.easy_vqa_captions(train) if d.layout == "easy-vqa" else ([], Skips())
        cap_test, s5 = vdata.easy_vqa_captions(test) if d.layout == "easy-vqa" else ([], Skips())
        skipped["caption_train"].update(s4)
        skipped["caption_test"].update(s5)
    # questions are sampled after captions were derived, so each image keeps all its facts
    if d.closed_rationale == "caption":
        said = {os.path.abspath(c.image): c.caption for c in cap_train + cap_test}  # a string op: no file access
        for item in train + test:
            if item.answer_type == "closed":
                item.rationale = said.get(os.path.abspath(item.image))
    train = balance_closed(train, d.balance_closed, rng, skipped["vqa_train"])
    train = sample(train, d.max_train_questions, rng, skipped["vqa_train"], "max_train_questions")
    test = sample(test, d.max_test_questions, rng, skipped["vqa_test"], "max_test_questions")
    cap_train = sample(cap_train, d.max_train_captions, rng, skipped["caption_train"], "max_train_captions")
    cap_test = sample(cap_test, d.max_test_captions, rng, skipped["caption_test"], "max_test_captions")
    sets = {"vqa_train": train, "vqa_test": test, "caption_train": cap_train, "caption_test": cap_test}
    for name in sets:
        sets[name] = vdata.validate_images(sets[name], skipped[name])
    if not sets["vqa_train"]:
        raise DataError(f"no usable training questions: {dict(skipped['vqa_train'])}")
    counts = {n: skipped[n].summary(len(v)) for n, v in sets.items()}
    if d.closed_rationale != "none":  # how many closed questions are answered with a rationale
        for name in ("vqa_train", "vqa_test"):
            closed = [it for it in sets[name] if it.answer_type == "closed"]
            counts[name]["closed_rationale"] = {"with": sum(it.rationale is not None for it in closed),
                                                "without (no caption of the image)":
                                                    sum(it.rationale is None for it in closed)}
    return sets, counts


def sample(items: list, cap: int | None, rng: random.Random, skipped: Skips, name: str) -> list:
    """A seeded sample of at most ``cap`` items; what the cap leaves out is counted as capped."""
    if cap is None or len(items) <= cap:
        return list(items)
    skipped.cap(f"{name}={cap}", len(items) - cap)
    return rng.sample(list(items), cap)


def sample_images(items: list, cap: int | None, rng: random.Random, skipped: Skips, name: str) -> list:
    """Keep the items of at most ``cap`` distinct images (seeded); fewer images means fewer encoder passes."""
    images = sorted({it.image for it in items})
    if cap is None or len(images) <= cap:
        return list(items)
    keep = set(rng.sample(images, cap))
    kept = [it for it in items if it.image in keep]
    skipped.cap(f"{name}={cap}", len(items) - len(kept))
    return kept


def balance_closed(items: list, mode: str, rng: random.Random, skipped: Skips) -> list:
    """Downsample the larger classes of closed questions (see :func:`closed_class`) to the smallest one's size.

    Closed questions are often lopsided (most "is there a red shape?" questions are about shapes that are not
    red), and a model can then score well by never looking: balancing takes that shortcut away.
    """
    if mode == "none":
        return list(items)
    by_class: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        label = closed_class(item.question, item.answer, item.answer_type, mode)
        if label is not None:
            by_class.setdefault(label, []).append(i)
    if len(by_class) < 2:
        return list(items)
    size = min(len(v) for v in by_class.values())
    drop = set()
    for label, idx in sorted(by_class.items()):
        drop.update(rng.sample(idx, len(idx) - size))
    skipped.cap(f"balance_closed={mode}", len(drop))
    return [it for i, it in enumerate(items) if i not in drop]


def image_cache(encoder, *, depth: int | None, precision: str, directory: str | None = None) -> FeatureCache:
    """The feature cache of an image encoder (images loaded from their paths)."""
    from modaltune.shared.training import autocast_dtype

    return FeatureCache(encoder, depth=depth, batch_size=64, autocast_dtype=autocast_dtype(precision),
                        directory=directory, load=load_image)


def fill_image_cache(cache: FeatureCache, sets: dict[str, list], names=SETS, desc: str = "encoding images (once)") -> None:
    """Encode every image of ``sets[names]`` not cached yet (in path order)."""
    cache.fill(sorted({it.image for name in names for it in sets[name]}), desc=desc)


def vqa_datasets(sets: dict[str, list], tokenizer, cache: FeatureCache | None, *, max_length: int, seed: int,
                 counts: dict[str, dict]) -> dict[str, ComposedDataset]:
    """Tokenised datasets of every set (VQA template for questions, a seeded caption instruction for captions);
    rows over ``max_length`` are skipped and added to ``counts``."""
    rows = {"vqa_train": vqa_rows(sets["vqa_train"]), "vqa_test": vqa_rows(sets["vqa_test"]),
            "caption_train": caption_rows(sets["caption_train"], seed),
            "caption_test": caption_rows(sets["caption_test"], seed + 1)}
    out = {}
    for name, r in rows.items():
        skipped = Skips()
        out[name] = ComposedDataset(r, tokenizer, cache, placeholder=PLACEHOLDER, max_length=max_length,
                                    skipped=skipped)
        add_to_summary(counts[name], skipped, len(out[name]))
    return out


def vqa_pairs_dataset(items: list, tokenizer, cache: FeatureCache | None, *, max_length: int, seed: int,
                      counts: dict[str, dict]) -> PairedDataset:
    """Preference pairs of the training questions (:func:`vqa_pair_rows`) as a :class:`PairedDataset`; pairs with
    no wrong answer of their kind, or over ``max_length``, are skipped and counted in ``counts["vqa_pairs_train"]``."""
    skipped = Skips()
    good, bad = vqa_pair_rows(items, seed, skipped)

    def tokenised(rows: list[dict]) -> ComposedDataset:
        return ComposedDataset(rows, tokenizer, cache, placeholder=PLACEHOLDER, max_length=max_length,
                               skipped=Skips())
    chosen, rejected = tokenised(good), tokenised(bad)
    keep = {r["id"] for r in chosen.rows} & {r["id"] for r in rejected.rows}
    if len(keep) < len(good):  # either answer too long: the pair goes
        skipped.add(f"longer than max_length={max_length} tokens", count=len(good) - len(keep))
        chosen = tokenised([r for r in good if r["id"] in keep])
        rejected = tokenised([r for r in bad if r["id"] in keep])
    counts["vqa_pairs_train"] = skipped.summary(len(chosen))
    return PairedDataset(chosen, rejected)


def image_collator(tokenizer, encoder=None, **kwargs) -> ComposedCollator:
    """A collator for image rows: cached features, or the encoder's preprocessing of the loaded images."""
    return ComposedCollator(tokenizer.pad_token_id, encoder, load=load_image, **kwargs)


def measure_vqa(model, tokenizer, datasets: dict[str, ComposedDataset], cfg: VQAEvalConfig, *, encoder=None,
                label: str, precision: str) -> tuple[dict[str, float], list[dict]]:
    """Answers and captions generated for the test sets, scored: ``test/*`` VQA metrics (with the closed image
    margin) and ``caption/*`` metrics; returns ``(metrics, per-question rows)``. ``encoder``: run it on the images
    (no feature cache)."""
    metrics, items = {}, []
    if len(datasets["vqa_test"]):
        answers = generate(model, tokenizer, ComposedPrompts(datasets["vqa_test"], tokenizer, encoder=encoder,
                                                             load=load_image), cfg, precision=precision,
                           desc=f"VQA ({label})")
        m, items = vqa_metrics(datasets["vqa_test"].rows, answers)
        m.update(closed_image_margin(model, tokenizer, datasets["vqa_test"], batch_size=cfg.batch_size,
                                     encoder=encoder, precision=precision))
        metrics.update({f"test/{k}": v for k, v in m.items()})
    if len(datasets["caption_test"]):
        caps = generate(model, tokenizer, ComposedPrompts(datasets["caption_test"], tokenizer, encoder=encoder,
                                                          load=load_image),
                        dataclasses.replace(cfg, max_new_tokens=cfg.max_caption_tokens), precision=precision,
                        desc=f"captions ({label})")
        metrics.update({f"caption/{k}": v for k, v in caption_metrics(datasets["caption_test"].rows, caps).items()})
    return metrics, items


def vqa_prompt(question: str) -> str:
    return VQA_TEMPLATE.format(question=question.strip())


def caption_prompt(instruction: str) -> str:
    return CAPTION_TEMPLATE.format(instruction=instruction)


def caption_rows(items, seed: int) -> list[dict[str, Any]]:
    """Stage-1 rows: one of the caption instructions (picked at random, seeded) -> caption."""
    rng = random.Random(seed)
    return [{"id": it.id, "image": it.image, "input": it.image,
             "prompt": caption_prompt(rng.choice(CAPTION_INSTRUCTIONS)), "target": it.caption, "type": "caption"}
            for it in items]


ANSWER_CUE = "Answer:"


def with_rationale(rationale: str | None, answer: str) -> str:
    """The text a model is trained to say: the answer, after the rationale when there is one."""
    return f"{rationale.strip()} {ANSWER_CUE} {answer}" if rationale else answer


def split_answer(said: str) -> tuple[str, str]:
    """``(rationale, answer)`` of a generated text: around the last ``Answer:`` cue, else ``("", the whole text)``."""
    at = said.lower().rfind(ANSWER_CUE.lower())
    return (said[:at].strip(), said[at + len(ANSWER_CUE):].strip()) if at >= 0 else ("", said)


def vqa_rows(items) -> list[dict[str, Any]]:
    """Stage-2 rows from VQA items: ``target`` is what the model says (a rationale, then the answer, when the
    item has one), ``answer`` what is scored."""
    return [{"id": it.id, "image": it.image, "input": it.image, "prompt": vqa_prompt(it.question),
             "target": with_rationale(it.rationale, it.answer), "answer": it.answer, "rationale": it.rationale,
             "type": it.answer_type, "question": it.question} for it in items]


def vqa_pair_rows(items, seed: int, skipped: Skips) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Preference rows of VQA items: the same image and question with the right answer (chosen) and a wrong one
    (rejected). A yes/no answer is flipped; an open answer is replaced by another answer given to a question that
    starts with the same two words ("what shape", "what color"), so the wrong answer is of the right kind. Items
    with no such alternative are counted in ``skipped``. Returns ``(chosen rows, rejected rows)``, aligned."""
    rng = random.Random(seed)
    kinds: dict[str, set[str]] = {}
    for it in items:
        kinds.setdefault(_question_kind(it.question), set()).add(it.answer.strip())
    chosen, rejected = [], []
    for it, row in zip(items, vqa_rows(items)):
        truth = normalize_answer(it.answer)
        if truth in {"yes", "no"}:
            wrong = "no" if truth == "yes" else "yes"
        else:
            pool = sorted(a for a in kinds[_question_kind(it.question)] if normalize_answer(a) != truth)
            if not pool:
                skipped.add("no wrong answer of the same kind for a preference pair", it.id)
                continue
            wrong = rng.choice(pool)
        chosen.append(row)
        rejected.append({**row, "target": with_rationale(it.rationale, wrong)})
    return chosen, rejected


def _question_kind(question: str) -> str:
    return " ".join(normalize_answer(question).split()[:2])


@torch.no_grad()
def closed_image_margin(model, tokenizer, dataset: ComposedDataset, *, batch_size: int, encoder=None,
                        precision: str = "fp32") -> dict[str, float]:
    """How much the image moves the yes-versus-no decision when the question is held fixed.

    For every yes/no question of ``dataset`` this takes the first answer token's logit margin, ``yes`` minus
    ``no``. Questions are grouped by their normalised text; within each group that has both answers, the gap is the
    mean margin where the truth is yes minus the mean where it is no. ``closed_image_margin`` averages the gaps
    (in logits): about 0 when the model answers from the question alone and never looks, large and positive when
    the image decides. ``closed_image_margin_questions`` counts the groups. One prefill per question; no sampling.
    """
    from modaltune.shared.training import autocast

    yes = tokenizer(" yes", add_special_tokens=False)["input_ids"][0]
    no = tokenizer(" no", add_special_tokens=False)["input_ids"][0]
    idx = [i for i, row in enumerate(dataset.rows)  # a rationale comes first: its answer token is not the first
           if row.get("type") == "closed" and not row.get("rationale")
           and normalize_answer(row["target"]) in {"yes", "no"}]
    if not idx:
        return {}
    model.eval()
    collate = image_collator(tokenizer, encoder, left=True, prompt_only=True)
    margins: list[float] = []
    for start in range(0, len(idx), batch_size):
        batch = to_device(collate([dataset[i] for i in idx[start : start + batch_size]]), model.device)
        with autocast(precision, model.device):
            embeds, mask, _ = model.embed(batch["input_ids"], batch["attention_mask"], batch["placeholder_positions"],
                                          encoder_inputs=batch.get("encoder_inputs"), features=batch.get("features"),
                                          features_depth=batch.get("features_depth"))
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

    An answer is what follows the last ``Answer:`` of the generated text (:func:`split_answer`). Rows with a
    rationale also score it: ``closed_rationale_accuracy`` is the share of them whose generated rationale is the
    image's caption (what the model saw), so a wrong closed answer is told apart as misseen or miscompared.

    ``closed_balanced_accuracy`` is the mean of the closed accuracies on questions about something present and
    about something absent (see :func:`closed_class`): a model that never looks and always answers "absent" scores
    0.5 there whatever the share of absent questions, so it exposes the shortcut plain closed accuracy hides.
    """
    per_item = []
    for row, said in zip(rows, answers):
        ref, (seen, ans) = row.get("answer", row["target"]), split_answer(said)
        correct = normalize_answer(ans) == normalize_answer(ref)
        per_item.append({"id": row["id"], "image": row["image"], "type": row["type"], "question": row["question"],
                         "reference": ref, "prediction": said, "answer": ans, "correct": correct,
                         "token_recall": round(token_recall(ans, ref), 4)})
        if row.get("rationale"):  # what the model said it saw, against the image's caption
            per_item[-1]["rationale_correct"] = normalize_answer(seen) == normalize_answer(row["rationale"])
    metrics: dict[str, float] = {}
    if per_item:
        metrics["accuracy"] = sum(r["correct"] for r in per_item) / len(per_item)
    for kind in ("closed", "open"):
        sub = [r for r in per_item if r["type"] == kind]
        if sub:
            metrics[f"{kind}_accuracy"] = sum(r["correct"] for r in sub) / len(sub)
            if kind == "open":
                metrics["open_token_recall"] = sum(r["token_recall"] for r in sub) / len(sub)
    reasoned = [r["rationale_correct"] for r in per_item if "rationale_correct" in r]
    if reasoned:
        metrics["closed_rationale_accuracy"] = sum(reasoned) / len(reasoned)
    by_class: dict[str, list[bool]] = {}
    for row, item in zip(rows, per_item):
        label = closed_class(row["question"], row.get("answer", row["target"]), row["type"])
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
        pred = normalize_answer(r["answer"])
        table[normalize_answer(r["reference"])][pred if pred in labels else "other"] += 1
    return table


def confusion_plot(run_dir: Path, items: list[dict]) -> list[dict]:
    """The closed-question confusion chart of per-question rows (none when there are no closed questions)."""
    table = closed_confusion(items)
    if not table:
        return []
    plt = pyplot()
    refs = list(table)
    preds = list(next(iter(table.values())))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(preds), 1.0 + 0.7 * len(refs)))
    data = [[table[r][p] for p in preds] for r in refs]
    ax.imshow(data, cmap="Blues")
    for i, r in enumerate(refs):
        for j, p in enumerate(preds):
            ax.text(j, i, str(table[r][p]), ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(preds)), preds)
    ax.set_yticks(range(len(refs)), refs)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title("Closed questions")
    path = save_figure(fig, run_dir / "closed_confusion.png")
    return [{"title": "Closed-question confusion (final model)", "path": str(path)}]
