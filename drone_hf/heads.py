"""How a model's task head turns into rows of `(logits, label)` for held-out scoring, per kind of head.

Sequence classification and multiple choice give one row per example (`logits (n, classes)`); token classification
one row per labelled token (`logits (n_tokens, classes)`, labels `-100` dropped); question answering one row per
example with the start and end logits stacked (`logits (n, 2, length)`, labels `(n, 2)`). The allocation's budget
metric for each is, by default: accuracy (Pearson for regression), token accuracy, and span F1. A bare encoder has no
head; [`embedding_rows`] pools its hidden states instead, and the budget is the mean cosine similarity to the dense
embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch


MetricFn = Callable[[np.ndarray, np.ndarray], float]
_PAD_LOGIT = -1e9


def head_rows(outputs, batch: Mapping[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray, str]:
    """`(logits, labels, kind)` rows of one batch; `kind` is `"classification"`, `"token"` or `"span"`.

    Raises:
        `ValueError`: for a model without a task head, or a batch without the head's labels.
    """
    if getattr(outputs, "start_logits", None) is not None:
        if "start_positions" not in batch or "end_positions" not in batch:
            raise ValueError("Held-out batches for a question-answering model need `start_positions`/`end_positions`.")
        logits = torch.stack([outputs.start_logits, outputs.end_logits], dim=1).float().cpu().numpy()
        labels = torch.stack([batch["start_positions"], batch["end_positions"]], dim=1).cpu().numpy()
        return logits, labels, "span"
    logits = getattr(outputs, "logits", None)
    if logits is None:
        raise ValueError(
            "An accuracy budget (`max_accuracy_drop`) needs a model with a task head (classification, token "
            "classification, question answering, multiple choice); a bare encoder has no metric to keep. Use "
            "`target_speedup`/`param_ratio`, or `compress_sentence_transformer(min_cosine_similarity=...)`."
        )
    if "labels" not in batch:
        raise ValueError("Held-out batches must have `labels`: an eval set without labels cannot be scored.")
    labels = batch["labels"].cpu()
    logits = logits.float().cpu()
    if logits.dim() == 3:  # token classification: one row per labelled token
        keep = labels != -100
        return logits[keep].numpy(), labels[keep].numpy(), "token"
    return logits.numpy(), labels.numpy(), "classification"


def embedding_rows(pooling: str = "mean") -> Callable:
    """A `rows_fn` for a bare encoder: one row per text, the pooled last hidden state (`"mean"` over real tokens,
    `"cls"`, or `"max"`), kind `"embedding"`. The labels are the rows themselves: at the first (dense) evaluation they
    become the reference every compressed evaluation is compared with (cosine similarity)."""
    if pooling not in ("mean", "cls", "max"):
        raise ValueError(f"`pooling` must be one of ['mean', 'cls', 'max'], got {pooling!r}.")

    def rows(outputs, batch):
        hidden = outputs[0].float()
        mask = batch["attention_mask"].to(hidden.device).unsqueeze(-1).to(hidden.dtype)
        if pooling == "cls":
            pooled = hidden[:, 0]
        elif pooling == "max":
            pooled = hidden.masked_fill(mask == 0, float("-inf")).amax(1)
        else:
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        pooled = pooled.cpu().numpy()
        return pooled, pooled, "embedding"

    return rows


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(norms, 1e-12)


def concat_rows(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenates row blocks, padding span logits of different lengths with a very negative logit."""
    if parts and parts[0].ndim == 3:
        length = max(part.shape[-1] for part in parts)
        parts = [np.pad(p, ((0, 0), (0, 0), (0, length - p.shape[-1])), constant_values=_PAD_LOGIT) for p in parts]
    return np.concatenate(parts)


def span_f1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Token-overlap F1 (in points) of the predicted span `[argmax start, argmax end]` against the labelled one."""
    start, end = logits[:, 0].argmax(-1), logits[:, 1].argmax(-1)
    gold_start, gold_end = labels[:, 0], labels[:, 1]
    overlap = np.clip(np.minimum(end, gold_end) - np.maximum(start, gold_start) + 1, 0, None)
    predicted = np.clip(end - start + 1, 0, None)
    gold = np.clip(gold_end - gold_start + 1, 1, None)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(overlap > 0, 2 * overlap / (predicted + gold), 0.0)
    return 100.0 * float(f1.mean())


def default_metric_fn(problem_type: str | None, kind: str = "classification") -> MetricFn:
    """Accuracy in points (token accuracy for token rows), Pearson correlation for regression, span F1 for spans."""
    if kind == "span":
        return span_f1
    if kind == "embedding":  # mean cosine similarity to the dense model's embeddings, in points
        return lambda rows, reference: 100.0 * float(_cosines(rows, reference).mean())
    if problem_type == "regression":
        return lambda logits, labels: 100.0 * float(np.corrcoef(logits.reshape(-1), labels.reshape(-1))[0, 1])
    return lambda logits, labels: 100.0 * float((logits.argmax(-1) == labels).mean())


def _true_label_probability(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)
    return np.take_along_axis(probs, labels.astype(int)[..., None], axis=-1)[..., 0]


def soft_change(
    base_logits: np.ndarray,
    logits: np.ndarray,
    labels: np.ndarray,
    problem_type: str | None,
    kind: str = "classification",
) -> float:
    """How much a compression moves the model, in points, used for per-module drops that are far below one held-out
    example: the mean absolute change of the true label's probability (classification, tokens; for spans, of the
    true start's and end's) or of the prediction over the labels' standard deviation (regression).

    Unlike a drop in the mean true-label probability, it is never negative: a module whose compression happens to
    raise that score on these rows is still charged for changing the model, so noise cannot make a harsh rank look
    free.
    """
    if kind == "embedding":
        return 100.0 * float((1.0 - _cosines(logits, base_logits)).mean())
    if problem_type == "regression" and kind == "classification":
        moved = np.abs(logits.reshape(-1) - base_logits.reshape(-1)).mean()
        return 100.0 * float(moved / max(float(labels.std()), 1e-12))
    moved = np.abs(_true_label_probability(logits, labels) - _true_label_probability(base_logits, labels))
    return 100.0 * float(moved.mean())


__all__ = ["concat_rows", "default_metric_fn", "embedding_rows", "head_rows", "soft_change", "span_f1"]
