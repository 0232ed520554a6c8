"""Metrics of a token-classification (NER) task, own code (no `seqeval` import): entity-level precision, recall and F1
as `seqeval` computes them by default, and token accuracy; and [`EntityF1Points`], the `metric_fn` that lets a
`max_accuracy_drop` budget be spent on entity F1.

Entities are decoded from IOB tags (`B-PER`, `I-PER`, `O`; IOB1 and IOB2 both decode) the way `seqeval`'s default
(CoNLL `conlleval`) mode does: an entity starts at `B-X`, or at `I-X` when the tag before is `O` or of another type,
and runs over the following `I-X`. An entity counts as right only when its type and both boundaries match a gold
entity; precision, recall and F1 are micro-averaged over all entities of all sentences. With no predicted (or no
gold) entity the undefined ratio is 0, as `seqeval` returns it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


IGNORE_INDEX = -100
ENTITY_METRICS = ("seqeval_f1", "seqeval_precision", "seqeval_recall")
TOKEN_METRICS = (*ENTITY_METRICS, "accuracy")
TOKEN_METRIC_ALIASES = {
    "seqeval_f1": "seqeval_f1",
    "entity_f1": "seqeval_f1",
    "seqeval_precision": "seqeval_precision",
    "entity_precision": "seqeval_precision",
    "seqeval_recall": "seqeval_recall",
    "entity_recall": "seqeval_recall",
    "accuracy": "accuracy",
    "acc": "accuracy",
    "token_accuracy": "accuracy",
}


def token_metric_name(name: str) -> str:
    """The canonical name of a token-classification metric (`"seqeval-f1"` -> `"seqeval_f1"`, `"acc"` ->
    `"accuracy"`).

    Raises:
        `ValueError`: for a metric that does not apply to token classification, listing those that do.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in TOKEN_METRIC_ALIASES:
        raise ValueError(
            f"`--metric` {name!r} does not apply to token classification; use some of {list(TOKEN_METRICS)} "
            "(seqeval_f1: entity-level F1 over IOB tags; accuracy: token accuracy on the first sub-token of each "
            "word)."
        )
    return TOKEN_METRIC_ALIASES[key]


def _split_tag(tag: str) -> tuple[str, str]:
    """`("B", "PER")` of `"B-PER"`, `("O", "")` of `"O"`."""
    if tag == "O":
        return "O", ""
    prefix, _, kind = tag.partition("-")
    if prefix not in ("B", "I") or not kind:
        raise ValueError(
            f"Tag {tag!r} is not an IOB tag (`O`, `B-TYPE` or `I-TYPE`): entity-level F1 (`seqeval_f1`) needs IOB "
            "label names; use `--metric accuracy` (token accuracy) for other tag sets."
        )
    return prefix, kind


def check_iob_tags(names: Sequence[str]) -> None:
    """Raises `ValueError` unless every name is `O`, `B-TYPE` or `I-TYPE`."""
    for name in names:
        _split_tag(str(name))


def iob_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The entities `(type, first, last)` (inclusive word positions) of one sentence's IOB tags.

    Example:
        >>> iob_entities(["B-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"])
        [('PER', 0, 1), ('LOC', 3, 3), ('LOC', 4, 4), ('ORG', 5, 5)]
    """
    entities = []
    current: list | None = None  # [type, first, last]
    for position, tag in enumerate(tags):
        prefix, kind = _split_tag(str(tag))
        continues = current is not None and prefix == "I" and kind == current[0]
        if continues:
            current[2] = position
            continue
        if current is not None:
            entities.append(tuple(current))
            current = None
        if prefix != "O":
            current = [kind, position, position]
    if current is not None:
        entities.append(tuple(current))
    return entities


def entity_counts(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> np.ndarray:
    """Per sentence `(correct, predicted, gold)` entity counts, shape `(n_sentences, 3)`."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sentences but {len(predicted)} predicted ones; they must match.")
    counts = np.zeros((len(gold), 3), dtype=np.int64)
    for index, (gold_tags, predicted_tags) in enumerate(zip(gold, predicted)):
        if len(gold_tags) != len(predicted_tags):
            raise ValueError(
                f"Sentence {index} has {len(gold_tags)} gold tags but {len(predicted_tags)} predicted ones."
            )
        gold_set, predicted_set = set(iob_entities(gold_tags)), set(iob_entities(predicted_tags))
        counts[index] = (len(gold_set & predicted_set), len(predicted_set), len(gold_set))
    return counts


def _ratios(counts: np.ndarray) -> dict[str, float]:
    correct, predicted, gold = (int(value) for value in np.asarray(counts).reshape(-1, 3).sum(0))
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"seqeval_precision": precision, "seqeval_recall": recall, "seqeval_f1": f1}


def entity_scores(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, float]:
    r"""
    Entity-level precision, recall and F1 (fractions), micro-averaged over all entities, as `seqeval`'s default mode.

    Args:
        gold (`Sequence[Sequence[str]]`): Gold IOB tags, one list per sentence.
        predicted (`Sequence[Sequence[str]]`): Predicted IOB tags, same shape.

    Returns:
        `dict[str, float]` with `seqeval_precision`, `seqeval_recall`, `seqeval_f1`.

    Example:
        >>> entity_scores([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "O"]])["seqeval_f1"]
        0.6666666666666666
    """
    return _ratios(entity_counts(gold, predicted))


def sentence_tags(
    predictions: Any, labels: Any, label_names: Sequence[str]
) -> tuple[list[list[str]], list[list[str]]]:
    """`(gold, predicted)` tag lists per sentence from logits `(n, length, classes)` (or ids `(n, length)`) and labels
    `(n, length)`, keeping the positions whose label is not `-100` (the first sub-token of each word)."""
    preds, golds = np.asarray(predictions), np.asarray(labels)
    ids = preds.argmax(-1) if preds.ndim == golds.ndim + 1 else preds
    if ids.shape != golds.shape:
        raise ValueError(f"Predictions of shape {ids.shape} do not match labels of shape {golds.shape}.")
    gold, predicted = [], []
    for row_ids, row_labels in zip(ids, golds):
        keep = row_labels != IGNORE_INDEX
        gold.append([label_names[int(i)] for i in row_labels[keep]])
        predicted.append([label_names[int(i)] for i in row_ids[keep]])
    return gold, predicted


def token_task_metrics(
    names: Sequence[str], predictions: Any, labels: Any, *, label_names: Sequence[str]
) -> dict[str, float]:
    r"""
    The token-classification metrics `names` (fractions) of logits `(n, length, classes)` against labels
    `(n, length)` with `-100` on the positions that are not scored (special tokens, padding, later sub-tokens).

    `accuracy` is the fraction of scored positions whose argmax is the gold label; `seqeval_f1`/`_precision`/`_recall`
    are [`entity_scores`] of the decoded IOB tags, sentence by sentence.

    Raises:
        `ValueError`: for an unknown metric, non-IOB label names with an entity metric, mismatched shapes, or no
            scored position.
    """
    canonical = [token_metric_name(name) for name in names]
    preds, golds = np.asarray(predictions), np.asarray(labels)
    if preds.shape[0] != golds.shape[0] or golds.ndim != 2:
        raise ValueError(
            f"Token predictions {preds.shape} and labels {golds.shape} must be (sentences, length[, classes])."
        )
    keep = golds != IGNORE_INDEX
    if not keep.any():
        raise ValueError("No labelled token (every label is -100): nothing to score.")
    results: dict[str, float] = {}
    if any(name in ENTITY_METRICS for name in canonical):
        check_iob_tags(label_names)
        results.update(entity_scores(*sentence_tags(preds, golds, label_names)))
    if "accuracy" in canonical:
        ids = preds.argmax(-1) if preds.ndim == 3 else preds
        results["accuracy"] = float((ids[keep] == golds[keep]).mean())
    return {name: results[name] for name in canonical}


class EntityF1Points:
    r"""
    Entity-level F1 in points as the `metric_fn` of `allocate_ranks` (a `max_accuracy_drop` budget on entity F1).

    The allocation scores token rows (one per labelled token, sentences concatenated in batch order, see
    `drone_hf.heads.head_rows`); `lengths` (labelled tokens per sentence, in that order) cuts them back into sentences.
    Its `bootstrap_sample` resamples whole sentences, so that the paired standard error of the budget check is the one
    of a sentence-level metric.

    Args:
        lengths (`Sequence[int]`): Labelled tokens of each held-out sentence, in the held-out batches' order.
        label_names (`Sequence[str]`): IOB tag of each label id (`model.config.id2label` in id order).
    """

    row_quantised = False

    def __init__(self, lengths: Sequence[int], label_names: Sequence[str]):
        check_iob_tags(label_names)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.label_names = tuple(label_names)
        self._bounds = np.concatenate([[0], np.cumsum(self.lengths)])

    @classmethod
    def from_batches(cls, batches: Sequence[dict], label_names: Sequence[str]) -> EntityF1Points:
        """For held-out tokenizer batches with token `labels` (`-100` where not scored), in the order given."""
        lengths = [int(n) for batch in batches for n in (np.asarray(batch["labels"]) != IGNORE_INDEX).sum(1)]
        return cls([n for n in lengths if n], label_names)

    def counts(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        if len(labels) != int(self._bounds[-1]):
            raise ValueError(
                f"Entity F1 expects {int(self._bounds[-1])} token rows ({len(self.lengths)} sentences), got "
                f"{len(labels)}: it must score the held-out batches it was built from."
            )
        ids = np.asarray(logits).argmax(-1)
        gold, predicted = [], []
        for start, end in zip(self._bounds[:-1], self._bounds[1:]):
            gold.append([self.label_names[int(i)] for i in labels[start:end]])
            predicted.append([self.label_names[int(i)] for i in ids[start:end]])
        return entity_counts(gold, predicted)

    def __call__(self, logits: np.ndarray, labels: np.ndarray) -> float:
        return 100.0 * _ratios(self.counts(logits, labels))["seqeval_f1"]

    def bootstrap_sample(self, rng: np.random.Generator) -> tuple[np.ndarray, EntityF1Points]:
        """`(rows, metric)`: the token rows of sentences drawn with replacement, and the metric that scores them."""
        picks = rng.integers(0, len(self.lengths), len(self.lengths))
        rows = np.concatenate([np.arange(self._bounds[i], self._bounds[i + 1]) for i in picks])
        return rows, EntityF1Points(self.lengths[picks], self.label_names)


__all__ = [
    "ENTITY_METRICS",
    "TOKEN_METRICS",
    "EntityF1Points",
    "entity_scores",
    "iob_entities",
    "token_metric_name",
    "token_task_metrics",
]
