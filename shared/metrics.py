"""Metrics computed offline with the underlying libraries (no ``evaluate.load`` hub fetches).

Each function takes lists of predictions and references and returns plain floats.
"""

from __future__ import annotations

import math
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and English articles, collapse white space.

    Example:
        >>> normalize_answer("  The Blood-Pressure. ")
        'bloodpressure'
    """
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference after :func:`normalize_answer`.

    Example:
        >>> exact_match(["Twice a day.", "nothing"], ["twice a day", "nothing by mouth"])
        0.5
    """
    _check(predictions, references)
    if not predictions:
        return 0.0
    return sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)) / len(predictions)


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """Per-item ROUGE-L F1 (``rouge_score``, with stemming).

    Example:
        >>> [round(x, 2) for x in rouge_l(["take it with food"], ["take it with a meal"])]
        [0.67]
    """
    from rouge_score import rouge_scorer

    _check(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]


def perplexity(mean_loss: float) -> float:
    """``exp(loss)``, capped to stay finite in reports.

    Example:
        >>> round(perplexity(1.0), 3)
        2.718
    """
    return math.exp(min(mean_loss, 50.0))


def _check(predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
