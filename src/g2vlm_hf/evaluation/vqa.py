"""Spatial VQA scoring: multiple-choice accuracy and mean relative accuracy (MRA) for numeric answers.

MRA (VSI-Bench, also used by SPAR-Bench for its numeric tasks): with relative error `e = |pred - gt| / |gt|`,
`MRA = mean over theta in {0.50, 0.55, ..., 0.95} of [e <= 1 - theta]`. An answer with no number scores 0.
Multiple-choice answers are matched by option letter ("B", "(B)", "B.", "Answer: B") or by the option's text.
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

MRA_THRESHOLDS = np.linspace(0.5, 0.95, 10)
_NUMBER = re.compile(r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def parse_number(text: str) -> float | None:
    """The first number in `text` (thousands separators allowed), or None."""
    match = _NUMBER.search(str(text))
    return float(match.group(0).replace(",", "")) if match else None


def mean_relative_accuracy(pred: float | None, target: float) -> float:
    """MRA of one numeric answer (0 when `pred` is None; `target` must be non-zero)."""
    if target == 0:
        raise ValueError("Mean relative accuracy is undefined for a ground-truth answer of 0.")
    if pred is None or not np.isfinite(pred):
        return 0.0
    error = abs(pred - target) / abs(target)
    return float((error <= 1 - MRA_THRESHOLDS).mean())


def extract_choice(text: str, choices: list[str]) -> str | None:
    """Option letter (A, B, ...) that `text` picks among `choices`, or None.

    A leading letter (or "answer: X") wins; then the option whose text appears in the answer, if exactly one; then a
    lone capital option letter standing as a word ("I think B"), if exactly one distinct letter does.
    """
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    stripped = str(text).strip()
    head = re.match(r"^\(?([A-Za-z])(?:[).:,\s]|$)", stripped)
    if head and head.group(1).upper() in letters:
        return head.group(1).upper()
    stated = re.search(r"answer\s*(?:is)?\s*[:：]?\s*\(?([A-Za-z])(?:[).:,\s]|$)", stripped, re.IGNORECASE)
    if stated and stated.group(1).upper() in letters:
        return stated.group(1).upper()
    options = [re.sub(r"^\(?[A-Za-z][).:]\s*", "", choice).strip().lower() for choice in choices]
    found = [letters[i] for i, option in enumerate(options) if option and option in stripped.lower()]
    if len(found) == 1:
        return found[0]
    standalone = set(re.findall(r"\b([A-Z])\b", stripped)) & set(letters)
    return standalone.pop() if len(standalone) == 1 else None


def score_answer(record: dict, prediction: str) -> float:
    """Score of one answer in [0, 1]: exact option for multiple choice, MRA for numeric, exact text otherwise."""
    kind = record.get("type", "multiple_choice" if record.get("choices") else "numeric")
    answer = str(record["answer"]).strip()
    if kind == "multiple_choice":
        if not record.get("choices"):
            raise ValueError(f"Multiple-choice question {record.get('id')!r} has no `choices`.")
        return float(extract_choice(prediction, record["choices"]) == answer.upper())
    if kind == "numeric":
        target = parse_number(answer)
        if target is None:
            raise ValueError(f"Numeric question {record.get('id')!r} has a non-numeric answer {answer!r}.")
        return mean_relative_accuracy(parse_number(prediction), target)
    if kind == "exact":
        return float(prediction.strip().lower().rstrip(".") == answer.lower())
    raise ValueError(f"Unknown question type {kind!r}; use multiple_choice, numeric or exact.")


def summarize_vqa(scores: list[tuple[str, float]]) -> dict[str, float]:
    """Overall mean, mean per category, and the mean of the category means (benchmarks report the latter)."""
    if not scores:
        raise ValueError("No answers to score.")
    by_category: dict[str, list[float]] = defaultdict(list)
    for category, score in scores:
        by_category[category].append(score)
    per_category = {category: float(np.mean(values)) for category, values in sorted(by_category.items())}
    return {
        "overall": float(np.mean([score for _, score in scores])),
        "category_mean": float(np.mean(list(per_category.values()))),
        "questions": len(scores),
        **{f"category/{category}": value for category, value in per_category.items()},
    }
