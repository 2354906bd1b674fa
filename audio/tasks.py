"""Speech tasks on clips for a speech LLM: the prompts, the rows the clips give, and reading an order back.

* :func:`task_rows` turns clips into ``(input, prompt, target)`` rows: **transcription** (the clip's text), built-in
  **medication orders** (``{"drug", "dose", "frequency", "condition"}`` as JSON, for the slots the sentence has;
  the dictation templates' fill-ins are the gold) and any task a manifest gives (``task``/``prompt``/``answer``).
  Each task has several phrasings; training draws one per row, evaluation uses the first.
* :func:`shuffled` swaps every row's audio for another clip's (the shuffled-audio guard of the evaluation).
* :func:`parse_order` reads the JSON order out of a generated answer.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from typing import Any

from modaltune.audio.data import Clip
from modaltune.shared.config import ConfigError, doc

AUDIO_PLACEHOLDER = "<AudioHere>"
AUDIO_TEMPLATE = "[INST] <audio><AudioHere></audio> {instruction} [/INST]"
ORDER_KEYS = ("drug", "dose", "frequency", "condition")

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
