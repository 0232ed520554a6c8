"""Metrics of extractive question answering, own code: the best answer span of start/end logits inside the context,
and SQuAD's exact match and token-overlap F1 of its text against the gold answers (the best over them); and
[`SquadF1Points`], the `metric_fn` that lets a `max_accuracy_drop` budget be spent on that F1.

Answers are normalised as the SQuAD v1.1 evaluation script does: lower case, punctuation and the articles a/an/the
removed, whitespace collapsed.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np


QA_METRICS = ("squad_f1", "exact_match")
QA_METRIC_ALIASES = {
    "squad_f1": "squad_f1",
    "f1": "squad_f1",
    "span_f1": "squad_f1",
    "exact_match": "exact_match",
    "exact": "exact_match",
    "em": "exact_match",
}
MAX_ANSWER_TOKENS = 30
_PUNCTUATION = set(string.punctuation)


def qa_metric_name(name: str) -> str:
    """The canonical name of a question-answering metric (`"f1"` -> `"squad_f1"`, `"em"` -> `"exact_match"`).

    Raises:
        `ValueError`: for a metric that does not apply to question answering, listing those that do.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in QA_METRIC_ALIASES:
        raise ValueError(
            f"`--metric` {name!r} does not apply to question answering; use some of {list(QA_METRICS)} (squad_f1: "
            "token-overlap F1 of the answer text; exact_match: the normalised answer text equal to a gold one)."
        )
    return QA_METRIC_ALIASES[key]


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(character for character in str(text).lower() if character not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answer_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of two answer texts after [`normalize_answer`] (1.0 when both are empty)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def answer_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> np.ndarray:
    """Per example `(exact match, F1)`, each the best over that example's gold answers; shape `(n, 2)`."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predicted answers but {len(golds)} gold answer lists; they must match.")
    scores = np.zeros((len(predictions), 2))
    for index, (prediction, answers) in enumerate(zip(predictions, golds)):
        if answers:
            exact = max(float(normalize_answer(prediction) == normalize_answer(gold)) for gold in answers)
            scores[index] = (exact, max(answer_f1(prediction, gold) for gold in answers))
    return scores


def best_span(start: np.ndarray, end: np.ndarray, context: np.ndarray, max_tokens: int = MAX_ANSWER_TOKENS):
    """`(first, last)` token positions maximising `start[first] + end[last]` over context tokens with
    `first <= last < first + max_tokens`, or `None` when no token is context."""
    positions = np.flatnonzero(context[: len(start)])
    if positions.size == 0:
        return None
    scores = start[positions][:, None] + end[positions][None, :]
    gap = positions[None, :] - positions[:, None]
    scores = np.where((gap >= 0) & (gap < max_tokens), scores, -np.inf)
    first, last = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return int(positions[first]), int(positions[last])


class SquadExamples:
    r"""
    What turns span logits of tokenised examples back into answer texts: each example's context, the character
    offsets of its tokens (`(-1, -1)` for tokens that are not context) and its gold answer texts.
    """

    def __init__(self, contexts: Sequence[str], offsets: Sequence[Sequence], answers: Sequence[Sequence[str]]):
        if not len(contexts) == len(offsets) == len(answers):
            raise ValueError("`contexts`, `offsets` and `answers` must have one entry per example.")
        self.contexts, self.answers = list(contexts), [list(a) for a in answers]
        self.offsets = [np.asarray(o, dtype=np.int64).reshape(-1, 2) for o in offsets]

    def __len__(self) -> int:
        return len(self.contexts)

    def subset(self, rows: Sequence[int]) -> SquadExamples:
        rows = [int(row) for row in rows]
        return SquadExamples(
            [self.contexts[i] for i in rows], [self.offsets[i] for i in rows], [self.answers[i] for i in rows]
        )

    def texts(self, logits: np.ndarray) -> list[str]:
        """The predicted answer text of each example from span logits `(n, 2, length)`."""
        logits = np.asarray(logits)
        if logits.ndim != 3 or logits.shape[1] != 2 or len(logits) != len(self):
            raise ValueError(f"Expected span logits of shape ({len(self)}, 2, length), got {logits.shape}.")
        texts = []
        for row, context, offsets in zip(logits, self.contexts, self.offsets):
            span = best_span(row[0], row[1], offsets[:, 0] >= 0)
            texts.append("" if span is None else context[offsets[span[0], 0] : offsets[span[1], 1]])
        return texts

    def scores(self, logits: np.ndarray) -> np.ndarray:
        return answer_scores(self.texts(logits), self.answers)


def qa_task_metrics(names: Sequence[str], predictions: Any, examples: SquadExamples) -> dict[str, float]:
    """`squad_f1` / `exact_match` (fractions, means over the examples) of span logits `(n, 2, length)`."""
    canonical = [qa_metric_name(name) for name in names]
    exact, f1 = examples.scores(predictions).mean(0)
    values = {"exact_match": float(exact), "squad_f1": float(f1)}
    return {name: values[name] for name in canonical}


class SquadF1Points:
    r"""
    SQuAD F1 of the answer text in points as the `metric_fn` of `allocate_ranks` (a `max_accuracy_drop` budget).

    The allocation scores one row per example (`drone_hf.heads.head_rows`, span logits) in the held-out batches'
    order; `examples` are those examples in that order. Its `bootstrap_sample` resamples examples together with what
    turns their rows into text.

    Args:
        examples ([`SquadExamples`]): The held-out examples, in the order of the held-out batches' rows.
    """

    row_quantised = False

    def __init__(self, examples: SquadExamples):
        self.examples = examples

    def __call__(self, logits: np.ndarray, labels: np.ndarray) -> float:
        if len(labels) != len(self.examples):
            raise ValueError(
                f"SQuAD F1 expects {len(self.examples)} rows, got {len(labels)}: it must score the held-out batches "
                "it was built from."
            )
        return 100.0 * float(self.examples.scores(logits)[:, 1].mean())

    def bootstrap_sample(self, rng: np.random.Generator) -> tuple[np.ndarray, SquadF1Points]:
        """`(rows, metric)`: examples drawn with replacement and the metric that scores them."""
        rows = rng.integers(0, len(self.examples), len(self.examples))
        return rows, SquadF1Points(self.examples.subset(rows))


__all__ = [
    "QA_METRICS",
    "SquadExamples",
    "SquadF1Points",
    "answer_f1",
    "answer_scores",
    "best_span",
    "normalize_answer",
    "qa_metric_name",
    "qa_task_metrics",
]
