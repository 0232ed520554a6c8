"""Offline GLUE metrics (scikit-learn/scipy): [`glue_metrics`] and the `Trainer` hook [`glue_compute_metrics`]."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from transformers.utils import logging

from .glue_tasks import get_glue_task


if TYPE_CHECKING:
    from transformers import EvalPrediction

# Messages keep the logger name they had before the GLUE code was split into modules.
logger = logging.get_logger("drone_hf.glue")


def _as_array(name: str, values: Any) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"`{name}` must be numeric, got dtype {array.dtype}.")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise ValueError(f"`{name}` contains {bad} NaN/inf value(s); expected finite values.")
    return array


def glue_metrics(task: str, predictions: Any, labels: Any) -> dict[str, float]:
    """Compute the official GLUE metrics of a task offline (scikit-learn/scipy), as floats on a 0-1 scale.

    Accuracy for all classification tasks, plus binary F1 (positive class 1) for MRPC/QQP, Matthews correlation
    for CoLA, Pearson and Spearman correlations for STS-B; `combined_score` is the mean of the task's metrics.

    Args:
        task: GLUE task name.
        predictions: Logits of shape `(n, num_labels)` or class ids of shape `(n,)`; for STS-B scores `(n,)`/`(n, 1)`.
        labels: Gold labels, shape `(n,)`.

    Returns:
        `dict` mapping each of the task's `metric_names` to a `float` (STS-B correlations are NaN for constant
        predictions).

    Raises:
        ValueError: Unknown task, labels of an unlabelled (test) set (`-1`), shape/length mismatch, non-finite values,
            class ids out of range.

    Example:
        >>> glue_metrics("mrpc", [[0.1, 0.9], [2.0, -1.0]], [1, 1])
        {'accuracy': 0.5, 'f1': 0.6666666666666666, 'combined_score': 0.5833333333333333}
    """
    info = get_glue_task(task)
    preds, golds = _as_array("predictions", predictions), _as_array("labels", labels)
    if golds.ndim == 2 and golds.shape[1] == 1:
        golds = golds[:, 0]
    if golds.ndim != 1 or len(golds) == 0:
        raise ValueError(f"`labels` must be a non-empty 1-D array, got shape {golds.shape}.")
    if (golds == -1).any():
        raise ValueError(
            f"Cannot compute GLUE {info.name} metrics on an eval set without labels: `labels` has "
            f"{int((golds == -1).sum())} value(s) of -1 (the Hub's placeholder for unlabelled test rows)."
        )
    if len(preds) != len(golds):
        raise ValueError(f"`predictions` has {len(preds)} rows but `labels` has {len(golds)}; they must match.")
    if info.is_regression:
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
        if preds.ndim != 1 or len(preds) < 2:
            raise ValueError(f"STS-B `predictions` must have shape (n,) or (n, 1) with n >= 2, got {preds.shape}.")
        from scipy.stats import pearsonr, spearmanr

        with warnings.catch_warnings():  # constant input: scipy warns and returns NaN
            warnings.simplefilter("ignore")
            result = {"pearson": float(pearsonr(preds, golds)[0]), "spearmanr": float(spearmanr(preds, golds)[0])}
        if np.isnan(result["pearson"]):
            logger.warning("STS-B correlations are undefined (NaN) for constant predictions or labels.")
    else:
        if preds.ndim == 2 and preds.shape[1] == info.num_labels:
            preds = preds.argmax(axis=-1)
        elif preds.ndim != 1:
            raise ValueError(
                f"GLUE {info.name} `predictions` must be logits of shape (n, {info.num_labels}) or class ids of "
                f"shape (n,), got shape {preds.shape}."
            )
        for name, values in (("predictions", preds), ("labels", golds)):
            if (values != np.round(values)).any() or values.min() < 0 or values.max() >= info.num_labels:
                raise ValueError(f"GLUE {info.name} `{name}` class ids must be integers in [0, {info.num_labels}).")
        from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

        preds, golds = preds.astype(np.int64), golds.astype(np.int64)
        scorers = {
            "accuracy": lambda: accuracy_score(golds, preds),
            "f1": lambda: f1_score(golds, preds, pos_label=1, average="binary", zero_division=0.0),
            "matthews_correlation": lambda: matthews_corrcoef(golds, preds),
        }
        result = {name: float(scorers[name]()) for name in info.metric_names if name in scorers}
    if "combined_score" in info.metric_names:
        result["combined_score"] = float(np.mean(list(result.values())))
    return result


def glue_compute_metrics(task: str) -> Callable[[EvalPrediction], dict[str, float]]:
    """Build a `compute_metrics` function for `Trainer` that returns [`glue_metrics`] of the task.

    Args:
        task: GLUE task name (validated immediately).

    Returns:
        A function taking an `EvalPrediction` (or a `(predictions, label_ids)` tuple). If the model returns several
        outputs (tuple predictions), the first one (the logits) is used.

    Raises:
        ValueError: Unknown task; when called, an eval set without labels or invalid predictions.

    Example:
        >>> trainer = Trainer(model, args, eval_dataset=dev, compute_metrics=glue_compute_metrics("cola"))
    """
    info = get_glue_task(task)

    def compute_metrics(eval_pred: EvalPrediction | tuple) -> dict[str, float]:
        if hasattr(eval_pred, "predictions"):
            predictions, label_ids = eval_pred.predictions, eval_pred.label_ids
        else:
            predictions, label_ids = eval_pred
        if isinstance(predictions, tuple) and predictions and np.ndim(predictions[0]) >= 1:
            predictions = predictions[0]  # (logits, hidden_states, ...)
        if label_ids is None:
            raise ValueError(f"Cannot compute GLUE {info.name} metrics on an eval set without labels (no label_ids).")
        return glue_metrics(info, predictions, label_ids)

    return compute_metrics


def glue_metric_points(task: str) -> Callable[[Any, Any], float]:
    """The task's main GLUE metric in points, as the `metric_fn` of [`allocate_ranks`] (`max_accuracy_drop`).

    Budgets are then spent on the number the task is judged by (F1 for MRPC/QQP, Matthews correlation for CoLA,
    Pearson for STS-B) instead of plain accuracy.

    Args:
        task: GLUE task name (validated immediately).

    Returns:
        `(logits, labels) -> float`: `100 * glue_metrics(task, logits, labels)[main_metric]`.

    Example:
        >>> glue_metric_points("mrpc")([[0.1, 0.9], [2.0, -1.0]], [1, 1])
        66.66666666666666
    """
    info = get_glue_task(task)

    def metric_points(logits: Any, labels: Any) -> float:
        return 100.0 * glue_metrics(info, logits, labels)[info.main_metric]

    # Accuracy, F1 and Matthews correlation move in steps of about 100 / n points per held-out row, so an accuracy
    # budget needs enough rows to resolve it (drone_hf.budget_search.min_heldout_rows); correlations are continuous.
    metric_points.row_quantised = info.main_metric not in ("pearson", "spearmanr", "spearman")
    return metric_points


__all__ = ["glue_compute_metrics", "glue_metric_points", "glue_metrics"]
