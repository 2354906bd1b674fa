"""Speech through an LLM: tasks on clips, their prompts, evaluation with shuffled audio, and the cascade baseline.

The audio-LLM recipe composes Whisper's encoder, a projector and a causal LLM (:mod:`modaltune.shared.compose`);
this module holds what is about speech tasks:

* :func:`task_rows` turns clips into ``(input, prompt, target)`` rows: **transcription** (the clip's text), built-in
  **medication orders** (``{"drug", "dose", "frequency", "condition"}`` as JSON, for the slots the sentence has;
  the dictation templates' fill-ins are the gold) and any task a manifest gives (``task``/``prompt``/``answer``).
  Each task has several phrasings; training draws one per row, evaluation uses the first.
* :func:`measure_audio_llm` generates for the test clips and scores WER/CER, per-slot exact match, all-slots and
  valid-JSON rates, custom tasks' exact match and, with ``shuffled``, all of it again with every clip's audio
  swapped for another's: a model that reads the audio collapses there, one that writes a language prior does not.
* :func:`cascade` is the baseline: the zero-shot Whisper transcript read by the same LLM tuned (LoRA) on gold
  transcripts for the same extraction.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modaltune.audio.data import Clip
from modaltune.shared.config import ConfigError, doc

AUDIO_PLACEHOLDER = "<AudioHere>"
AUDIO_TEMPLATE = "[INST] <audio><AudioHere></audio> {instruction} [/INST]"
ORDER_KEYS = ("drug", "dose", "frequency", "condition")
REPORT_NOTES = (
    "before = untrained projector and fresh LoRA; after_<stage> = after that stage; *_shuffled = the same test rows "
    "with every clip's audio swapped for another clip's.",
    "cascade = zero-shot Whisper transcript (its WER is test/wer) read by the same LLM tuned with LoRA on gold "
    "transcripts for the same tasks.",
    "WER/CER use Whisper's English normaliser, as domain-asr does; orders/*_accuracy is exact match per slot over "
    "the test orders that have it.",
)



TRANSCRIBE_PROMPTS = (
    "Transcribe the audio exactly.",
    "Write down what the speaker says, word for word.",
    "What is said in this recording? Give the exact words.",
    "Type out this clinical dictation.",
    "Produce a verbatim transcript of the clip.",
)
ORDER_PROMPTS = (
    "Extract the medication order as JSON with the keys drug, dose, frequency and condition that are mentioned.",
    "Which drug, dose, frequency and condition does the speaker mention? Answer in JSON.",
    "Fill in the medication order from the dictation as a JSON object.",
    "Return the drug, dose, frequency and condition spoken in the clip as JSON; leave out what is not said.",
)


@dataclasses.dataclass
class AudioTasksConfig:
    """Which tasks the clips give, and how they are prompted."""

    transcribe: bool = doc(True, "transcription through the LLM (clips with a transcript)")
    orders: bool = doc(True, "medication orders as JSON, from the clips' slots (the built-in dictation has them)")
    custom: bool = doc(True, "rows with task/prompt/answer columns (spoken QA, instructions)")
    phrasings: int = doc(5, "prompt phrasings per built-in task drawn in training (1: always the first)")
    seed: int = doc(0, "seed of the phrasing draws")

    def validate(self, where: str) -> None:
        if self.phrasings < 1:
            raise ConfigError(f"{where}.phrasings must be at least 1")
        if not (self.transcribe or self.orders or self.custom):
            raise ConfigError(f"{where}: every task is off; turn on transcribe, orders or custom")


def order_answer(slots: dict[str, str]) -> dict[str, str] | None:
    """The gold order of a clip's slots: the keys of :data:`ORDER_KEYS` it has (``drug`` is the first drug
    named); None when it names no drug.

    Example:
        >>> order_answer({"drug": "metformin", "drug2": "insulin", "dose": "ten milligrams"})
        {'drug': 'metformin', 'dose': 'ten milligrams'}
    """
    if not isinstance(slots, dict) or not slots.get("drug"):
        return None
    return {k: str(slots[k]) for k in ORDER_KEYS if slots.get(k)}


def task_rows(clips: list[Clip], cfg: AudioTasksConfig, *, train: bool, tasks: tuple[str, ...] | None = None
              ) -> list[dict[str, Any]]:
    """Rows ``{"id", "input", "task", "prompt", "target"}`` for the tasks of ``clips``.

    Args:
        clips: validated clips; ``input`` is the clip id (a loader maps it to the wave).
        cfg: which tasks and phrasings.
        train: draw a phrasing per row (seeded); else the first phrasing of each task.
        tasks: keep only these tasks (``transcribe``, ``orders``, a manifest's task names); None: all.
    """
    rng = random.Random(cfg.seed)

    def prompt(options: tuple[str, ...]) -> str:
        text = options[rng.randrange(min(cfg.phrasings, len(options)))] if train else options[0]
        return AUDIO_TEMPLATE.format(instruction=text)

    rows = []
    for clip in clips:
        made = []
        if cfg.transcribe and clip.text:
            made.append(("transcribe", prompt(TRANSCRIBE_PROMPTS), clip.text))
        order = order_answer(clip.meta.get("slots")) if cfg.orders else None
        if order is not None:
            made.append(("orders", prompt(ORDER_PROMPTS), json.dumps(order)))
        if cfg.custom and "answer" in clip.meta:
            instruction = str(clip.meta.get("prompt") or "Answer the question in the audio.")
            made.append((str(clip.meta.get("task") or "custom"), AUDIO_TEMPLATE.format(instruction=instruction),
                         str(clip.meta["answer"])))
        for task, text, target in made:
            if tasks is None or task in tasks:  # a transcript describes its clip: projector.word_grounding uses it
                rows.append({"id": f"{clip.id}:{task}", "clip": clip.id, "input": clip.id, "task": task,
                             "prompt": text, "target": target, "type": "caption" if task == "transcribe" else task})
    return rows


def shuffled(rows: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """The same rows with every row's audio taken from another clip (a seeded derangement of the inputs)."""
    inputs = list(dict.fromkeys(r["input"] for r in rows))
    if len(inputs) < 2:
        return [dict(r) for r in rows]
    order = inputs[:]
    random.Random(seed).shuffle(order)
    shift = {a: b for a, b in zip(order, order[1:] + order[:1])}  # a cycle: no clip keeps its own audio
    return [{**r, "input": shift[r["input"]]} for r in rows]


def parse_order(text: str) -> dict[str, str] | None:
    """The JSON object in a generated answer (the first ``{...}``), values as strings; None if there is none.

    Example:
        >>> parse_order('{"drug": "aspirin", "dose": "five milligrams"} done')
        {'drug': 'aspirin', 'dose': 'five milligrams'}
        >>> parse_order('aspirin') is None
        True
    """
    match = re.search(r"\{.*?\}", text, flags=re.S)
    if not match:
        return None
    try:
        value = json.loads(match.group(0))
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict):
        return None
    return {str(k): str(v) for k, v in value.items()}


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", str(text).lower()).split())


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
        got = {_norm(k): _norm(v) for k, v in (parsed or {}).items()}
        right = {k: got.get(k) == _norm(v) for k, v in gold.items()}
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
    from modaltune.audio.eval import score

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
            right = [_norm(p) == _norm(t) for p, t in zip(preds, refs)]
            metrics[f"{task}/accuracy"] = sum(right) / len(right)
            for i, ok in zip(idx, right):
                items[i]["error"] = 0.0 if ok else 1.0
    return {k + suffix: v for k, v in metrics.items()}, items


def measure_audio_llm(model, tokenizer, rows: list[dict[str, Any]], *, dataset: Callable[[list[dict]], Any],
                      generate: Callable[[Any, str], list[str]], normalizer, seconds: dict[str, float],
                      shuffle: bool = False, seed: int = 0) -> tuple[dict[str, float], list[dict]]:
    """Generate for the test rows and score them; with ``shuffle`` also on the audio-shuffled rows (``*_shuffled``
    keys; the items gain a ``shuffled`` answer).

    Args:
        dataset: rows -> a :class:`~modaltune.shared.compose_data.ComposedDataset`.
        generate: ``(dataset, label) -> texts``.
    """
    metrics, items = score_rows(rows, generate(dataset(rows), "test"), normalizer=normalizer, seconds=seconds)
    if shuffle:
        mixed = shuffled(rows, seed)
        more, other = score_rows(mixed, generate(dataset(mixed), "test, audio shuffled"), normalizer=normalizer,
                                 seconds=seconds, suffix="_shuffled")
        metrics.update(more)
        for item, o in zip(items, other):
            item["shuffled"] = o["prediction"]
    return metrics, items


@dataclasses.dataclass
class AudioLLMEvalConfig:
    """Generation for evaluation."""

    max_new_tokens: int = doc(64, "longest answer in tokens (transcripts, JSON)")
    batch_size: int = doc(64, "prompts per generation batch")
    shuffle_seed: int = doc(0, "seed of the audio shuffle of the last evaluation")
    no_repeat_ngram: int = doc(6, "above 0: no n-gram of this size twice in an answer (stops greedy loops; 0: off)")
    num_beams: int = doc(1, "1: greedy decoding; more: beam search (each beam costs about one more greedy pass)")

    def validate(self, where: str) -> None:
        if self.num_beams < 1:
            raise ConfigError(f"{where}.num_beams must be 1 (greedy) or more (beam search)")
        if self.no_repeat_ngram < 0:
            raise ConfigError(f"{where}.no_repeat_ngram must be 0 (off) or a positive n-gram size")

    def decoding(self) -> dict[str, int]:
        """The generation arguments every evaluation (and ``modaltune generate``) decodes with."""
        return {"max_new_tokens": self.max_new_tokens, "no_repeat_ngram": self.no_repeat_ngram,
                "num_beams": self.num_beams}


@dataclasses.dataclass
class CascadeConfig:
    """The cascade baseline: Whisper's zero-shot transcript -> the same LLM tuned on gold transcripts."""

    enabled: bool = doc(True, "measure it (zero-shot Whisper WER and the cascade's extraction scores)")
    max_steps: int = doc(80, "LoRA steps of the text-only LLM on gold transcripts")
    lr: float = doc(5.0e-4, "its learning rate")
    num_beams: int = doc(4, "Whisper's beams for the zero-shot transcripts")
    language: str = doc("en", "multilingual Whisper models: the spoken language")

    def validate(self, where: str) -> None:
        if self.max_steps < 1:
            raise ConfigError(f"{where}.max_steps must be at least 1")


def cascade_rows(rows: list[dict[str, Any]], transcripts: dict[str, str]) -> list[dict[str, Any]]:
    """Text-only versions of non-transcription rows: the clip's transcript (gold, or Whisper's) in the prompt."""
    out = []
    for r in rows:
        if r["task"] == "transcribe" or r["input"] not in transcripts:
            continue
        instruction = r["prompt"].split("</audio>", 1)[1].replace(" [/INST]", "").strip()
        out.append({**r, "prompt": f"[INST] Transcript: {transcripts[r['input']]}\n{instruction} [/INST]"})
    return out


def cascade(*, model_cfg, llm_cfg, train_cfg, cfg: CascadeConfig, train_rows: list[dict], test_rows: list[dict],
            clips: dict[str, Clip], whisper_name: str, normalizer, run_dir: Path, precision: str,
            log: Callable[[str], None] = print) -> tuple[dict[str, float], list[dict]]:
    """Zero-shot Whisper transcripts of the test clips (``test/wer``), then the LLM with a fresh LoRA tuned on the
    gold transcripts of ``train_rows`` for their tasks, reading those transcripts (``orders/*``, ...).

    Under a launcher every rank calls this: the tuning is data-parallel, the transcription and generation run on
    rank 0 (:func:`modaltune.shared.dist.on_main`)."""
    import dataclasses as dc

    import torch

    from modaltune.shared import dist

    from modaltune.audio.eval import ASREvalConfig, score, transcribe
    from modaltune.audio.whisper import WhisperASR, WhisperModelConfig, load_whisper
    from modaltune.shared.lm import build_text_model
    from modaltune.shared.peft import ComponentConfig
    from modaltune.shared.sequences import encode_prompt_target
    from modaltune.shared.training import StagePlan, compute_dtype, run_stages
    from modaltune.text.data import PadCollator
    from modaltune.text.eval import GenerationEvalConfig, generate

    frozen = ComponentConfig(method="frozen")
    hf, processor, source = load_whisper(WhisperModelConfig(name=whisper_name, language=cfg.language),
                                         encoder=frozen, decoder=frozen, log_fn=log)
    whisper = WhisperASR(hf, pad_token_id=processor.tokenizer.pad_token_id,
                         decoder_start_token_id=hf.config.decoder_start_token_id)
    test_ids = list(dict.fromkeys(r["input"] for r in test_rows))
    spoken = cfg.language if source["multilingual"] else None
    decode = ASREvalConfig(num_beams=cfg.num_beams, batch_size=16,
                           max_new_tokens=min(128, hf.config.max_target_positions - 8))
    texts, _ = dist.on_main(lambda: transcribe(
        whisper, processor, [clips[i].wave for i in test_ids], decode, language=spoken,
        task="transcribe" if spoken else None, cache=None, prompt=None, desc="cascade: zero-shot Whisper"))
    heard = dict(zip(test_ids, texts))
    whisper = hf = None  # freed before the LLM loads
    refs = [r for r in test_rows if r["task"] == "transcribe"]
    metrics: dict[str, float] = {}
    if refs:
        got = score([heard[r["input"]] for r in refs], [r["target"] for r in refs], 0.0, 1.0, normalizer=normalizer,
                    terms=[])
        metrics.update({"test/wer": got["wer"], "test/cer": got["cer"], "test/wer_raw": got["wer_raw"]})
    gold = cascade_rows(train_rows, {c.id: c.text for c in clips.values()})
    tests = cascade_rows(test_rows, heard)
    items = [{"id": r["id"], "task": "transcribe", "reference": r["target"], "prediction": heard[r["input"]]}
             for r in refs]
    if not gold or not tests:
        return metrics, items
    model, tok, _ = build_text_model(model_cfg, llm_cfg, compute_dtype=compute_dtype(precision), log_fn=log)

    train = [{"input_ids": e.input_ids, "labels": e.labels}
             for e in (encode_prompt_target(tok, r["prompt"], " " + r["target"]) for r in gold)]
    plan = StagePlan("cascade", train, None, max_steps=cfg.max_steps, lr=cfg.lr)
    run_stages(model, [plan], dc.replace(train_cfg, resume=False, save_steps=10**9, eval_steps=0),
               run_dir=run_dir / "cascade", collator=PadCollator(tok.pad_token_id), component_lrs={},
               checkpoint_meta={"recipe": "audio-llm cascade baseline"}, log=log)
    prompts = [tok(r["prompt"], add_special_tokens=True)["input_ids"] for r in tests]
    answers = dist.on_main(lambda: generate(model, tok, prompts, GenerationEvalConfig(max_new_tokens=48, batch_size=16),
                                            precision=precision, desc="cascade: extraction"))
    more, rows = score_rows(tests, answers, normalizer=normalizer, seconds={})
    metrics.update({k: v for k, v in more.items() if not k.startswith("test/")})
    model = None
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return metrics, items + rows


def reading_scores(model, tokenizer, rows: list[dict[str, Any]], cache, *, normalizer) -> dict[str, float]:
    """WER/CER of what the word tokens spell by themselves (``test/words_wer``, ``test/words_cer``): the greedy
    CTC reading a collapsing projector shows the LLM, on the transcription rows. It tells a misheard clip from
    one the LLM misread. Empty where there is no such reading: no collapse, no complete feature ``cache`` of
    encoder output states, or anchors whose token ids are unknown (a model loaded from a checkpoint)."""
    from modaltune.audio.eval import score
    from modaltune.shared.compose import read_words, word_projector

    words = word_projector(model.projector)
    refs = [r for r in rows if r["task"] == "transcribe"]
    if (not refs or words is None or not words.collapse or cache is None or not cache.complete
            or min(words.word_ids.tolist()) < 0):
        return {}
    read = read_words(model, [cache.get(r["input"]) for r in refs])
    got = score([tokenizer.decode(t).strip() for t in read], [r["target"] for r in refs], 0.0, 1.0,
                normalizer=normalizer, terms=[])
    return {"test/words_wer": got["wer"], "test/words_cer": got["cer"]}


def speech_cache(model, cfg, ids: list[str], load: Callable[[str], Any], *, batch_size: int, dtype=None):
    """The encoder-feature cache of a composed speech model, filled for the clips ``ids`` (``load``: id -> wave), or
    None where ``cfg`` (a :class:`~modaltune.shared.features.CacheConfig`) turns it off or nothing of the encoder
    is frozen. It holds what the frozen part of the encoder gives, trimmed to each clip."""
    from modaltune.shared.features import FeatureCache
    from modaltune.shared.loss import unwrap_peft

    depth = unwrap_peft(model.encoder).cache_depth() if cfg.mode == "auto" else None
    if depth is None:
        return None
    cache = FeatureCache(model.encoder, depth=depth, batch_size=batch_size, autocast_dtype=dtype, directory=cfg.dir,
                         load=load)
    cache.fill(ids, desc="encoding speech (once)")
    return cache


def heldout_for(cfg, model, dataset: Callable[..., Any], rows: dict[str, list[dict]], *, precision: str,
                log: Callable[[str], None], report: dict) -> dict[str, dict[str, Any]]:
    """Stage name -> the cross-fitted readings of every training clip, for the stages ``cfg.heldout`` names (none
    when off): see :func:`~modaltune.shared.compose.heldout.heldout_readings`. Each fold reader trains like the first
    ``loss: grounding`` stage, on the transcription rows of the other folds."""
    from modaltune.shared.compose import check_heldout, heldout_readings
    from modaltune.shared.harness import timed

    used, steps, lr = check_heldout(cfg.heldout, cfg.stages, cfg.projector, cfg.train)
    if not used:
        return {}
    with timed(report, "heldout_seconds"):
        readings = heldout_readings(model, dataset(rows["transcribe"], "transcribe"),
                                    [r["input"] for r in rows["all"]], folds=cfg.heldout.folds, steps=steps, lr=lr,
                                    batch_size=cfg.train.batch_size * cfg.train.grad_accum, seed=cfg.train.seed,
                                    precision=precision, max_grad_norm=cfg.train.max_grad_norm, log=log)
    return dict.fromkeys(used, readings)


def task_line(metrics: dict) -> str:
    """The headline figures of one evaluation, for the log."""
    from modaltune.shared.harness import metric_line

    return metric_line(metrics, keys=lambda k: k in {"test/wer", "test/words_wer", "test/wer_shuffled",
                                                     "orders/drug_accuracy", "orders/drug_accuracy_shuffled",
                                                     "orders/valid_json"})


def pair_task_items(items: dict[str, list[dict]]) -> list[dict]:
    """One row per test item (``id``, ``task``, ``reference``) with every column's answer, its error in the last
    column (WER, share of order slots wrong, 1 for a wrong answer) and the shuffled-audio answer; worst first."""
    from modaltune.shared.harness import pair_items

    def extra(found: dict[str, dict]) -> dict:
        last = found[list(found)[-1]]
        return {"error": last.get("error"), "shuffled": last.get("shuffled")}
    return pair_items(items, key=("id",), keep=("task", "reference"), value="prediction", extra=extra,
                      sort=lambda r: -(r["error"] or 0.0))


def task_plots(run_dir: Path, columns: dict) -> list[dict]:
    """A grouped bar chart of WER and order scores per column (cascade, untrained, trained, trained with the audio
    shuffled)."""
    from modaltune.shared.plots import grouped_bars

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
