"""Metrics computed offline with the underlying libraries (no ``evaluate.load`` hub fetches).

Each function takes lists of predictions and references and returns plain floats.
"""

from __future__ import annotations

import math
import re
import string

from modaltune.shared.errors import DataError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_NOT_A_WORD = re.compile(r"[^\w\s]|_")  # punctuation and symbols, in any script


def normalize_answer(text: str) -> str:
    """The one answer normaliser: lower case, punctuation and symbols become spaces, English articles go, white
    space collapses. Exact match, term recall, token recall, VQA accuracy and the audio tasks' slot scores all
    compare answers through it.

    Punctuation separates words rather than vanishing (the SQuAD rule deletes it): "blood-pressure" then matches
    "blood pressure", the spelling variation generated text shows most, and "2.5 mg" never matches "25 mg" nor
    "1-2" "12", which deleting would make equal, a wrong dose counted right. Letters and digits of any script
    are kept. The cost: "it's" no longer matches "its" (both sides still match their own spelling).

    Example:
        >>> normalize_answer("  The Blood-Pressure. ")
        'blood pressure'
        >>> normalize_answer("2.5 mg") == normalize_answer("25 mg")
        False
    """
    text = _NOT_A_WORD.sub(" ", text.lower())
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
        raise DataError(f"{len(predictions)} predictions for {len(references)} references: score one output per "
                        "reference")


def word_error_rate(predictions: list[str], references: list[str]) -> float:
    """Corpus WER (jiwer): total substitutions + deletions + insertions over reference words.

    Example:
        >>> round(word_error_rate(["the patient has a fever"], ["the patient has fever"]), 2)
        0.25
    """
    import jiwer

    _check(predictions, references)
    pairs = [(r, p) for p, r in zip(predictions, references) if r.strip()]
    if not pairs:
        return 0.0
    return float(jiwer.wer([r for r, _ in pairs], [p for _, p in pairs]))


def char_error_rate(predictions: list[str], references: list[str]) -> float:
    """Corpus CER (jiwer) over characters.

    Example:
        >>> round(char_error_rate(["amoxicilin"], ["amoxicillin"]), 3)
        0.091
    """
    import jiwer

    _check(predictions, references)
    pairs = [(r, p) for p, r in zip(predictions, references) if r.strip()]
    if not pairs:
        return 0.0
    return float(jiwer.cer([r for r, _ in pairs], [p for _, p in pairs]))


def alignment(prediction: str, reference: str) -> dict[str, object]:
    """Word-level edit counts and the aligned word pairs of one utterance.

    Example:
        >>> a = alignment("take metformin daily", "take metformin twice daily")
        >>> (a["substitutions"], a["deletions"], a["insertions"], a["wer"])
        (0, 1, 0, 0.25)
    """
    import jiwer

    if not reference.strip():
        n = len(prediction.split())
        return {"substitutions": 0, "deletions": 0, "insertions": n, "hits": 0, "wer": float(n > 0), "ops": []}
    out = jiwer.process_words(reference, prediction if prediction.strip() else "")
    ref_words, hyp_words = out.references[0], out.hypotheses[0]
    ops = []
    for chunk in out.alignments[0]:
        ref = " ".join(ref_words[chunk.ref_start_idx : chunk.ref_end_idx])
        hyp = " ".join(hyp_words[chunk.hyp_start_idx : chunk.hyp_end_idx])
        if chunk.type != "equal":
            ops.append({"op": chunk.type, "ref": ref, "hyp": hyp})
    return {
        "substitutions": out.substitutions,
        "deletions": out.deletions,
        "insertions": out.insertions,
        "hits": out.hits,
        "wer": float(out.wer),
        "ops": ops,
    }


def term_recall(predictions: list[str], references: list[str], terms: list[str]) -> dict[str, object]:
    """How often each domain term present in a reference also appears in its hypothesis.

    Matching is on normalised text (:func:`normalize_answer`) with word boundaries, so multi-word terms count.

    Example:
        >>> r = term_recall(["start metformin now"], ["start metformin and lisinopril"], ["metformin", "lisinopril"])
        >>> r["recall"], r["per_term"]["lisinopril"]
        (0.5, {'present': 1, 'recalled': 0})
    """
    _check(predictions, references)
    norm_terms = {t: normalize_answer(t) for t in terms if normalize_answer(t)}
    per_term: dict[str, dict[str, int]] = {}
    present = recalled = 0
    for pred, ref in zip(predictions, references):
        p, r = f" {normalize_answer(pred)} ", f" {normalize_answer(ref)} "
        for term, nt in norm_terms.items():
            if f" {nt} " in r:
                stats = per_term.setdefault(term, {"present": 0, "recalled": 0})
                stats["present"] += 1
                present += 1
                if f" {nt} " in p:
                    stats["recalled"] += 1
                    recalled += 1
    return {"recall": recalled / present if present else 0.0, "present": present, "per_term": per_term}


def token_recall(prediction: str, reference: str) -> float:
    """Fraction of the reference's (normalised) words that appear in the prediction.

    Example:
        >>> token_recall("a left lung mass", "mass in left lung")
        0.75
    """
    ref = normalize_answer(reference).split()
    if not ref:
        return 0.0
    pred = set(normalize_answer(prediction).split())
    return sum(w in pred for w in ref) / len(ref)


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 (NLTK, method-1 smoothing) on lower-cased words without punctuation.

    Example:
        >>> round(bleu(["a small red circle."], ["A small red circle"]), 2)
        1.0
    """
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    _check(predictions, references)
    hyps = [p.lower().translate(_PUNCT).split() or [""] for p in predictions]
    refs = [[r.lower().translate(_PUNCT).split()] for r in references]
    if not predictions:
        return 0.0
    weights = (0.25, 0.25, 0.25, 0.25)
    return float(corpus_bleu(refs, hyps, weights=weights, smoothing_function=SmoothingFunction().method1))
