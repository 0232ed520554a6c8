"""Metrics of a classification or regression task on your own data (scikit-learn/scipy, offline), by name: what the
`drone-hf` command and `examples/run_glue.py` report with `--metric` when the data is not a GLUE task."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .token_metrics import TOKEN_METRIC_ALIASES


CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews_correlation")
REGRESSION_METRICS = ("pearson", "spearmanr")
METRIC_ALIASES = {
    "accuracy": "accuracy",
    "acc": "accuracy",
    "f1": "f1",
    "mcc": "matthews_correlation",
    "matthews": "matthews_correlation",
    "matthews_correlation": "matthews_correlation",
    "pearson": "pearson",
    "pearsonr": "pearson",
    "spearman": "spearmanr",
    "spearmanr": "spearmanr",
    # token classification: `drone_hf.token_metrics`' own names, known here so that a wrong task type gets a clear
    # error (its "accuracy"/"acc" agree with the ones above)
    **TOKEN_METRIC_ALIASES,
    # question answering (`drone_hf.qa_metrics`; its "f1" alias is not taken: here "f1" is the classification F1)
    "squad_f1": "squad_f1",
    "exact_match": "exact_match",
    "exact": "exact_match",
    "em": "exact_match",
}


def metric_name(name: str) -> str:
    """The canonical name of a metric (`"mcc"` -> `"matthews_correlation"`, `"spearman"` -> `"spearmanr"`).

    Raises:
        `ValueError`: for an unknown metric, listing the accepted names.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in METRIC_ALIASES:
        raise ValueError(f"Unknown `--metric` {name!r}; expected one of {sorted(set(METRIC_ALIASES))}.")
    return METRIC_ALIASES[key]


def task_metrics(names: Sequence[str], predictions: Any, labels: Any, *, num_labels: int) -> dict[str, float]:
    r"""
    The metrics `names` of predictions against gold labels, as fractions (`0.912`) like `drone_hf.glue.glue_metrics`.

    Classification (`num_labels >= 2`): `accuracy`; `f1`, the binary F1 of class 1 with two classes and the macro
    F1 otherwise; `matthews_correlation`. Regression (`num_labels == 1`): `pearson`, `spearmanr`.

    Args:
        names (`Sequence[str]`): Metric names (aliases such as `"mcc"` are accepted).
        predictions: Logits `(n, num_labels)` or class ids `(n,)`; for regression scores `(n,)` or `(n, 1)`.
        labels: Gold labels `(n,)`.
        num_labels (`int`): The model's number of labels (1 for regression).

    Returns:
        `dict[str, float]`: canonical metric name -> value.

    Raises:
        `ValueError`: for an unknown metric, a metric of the other kind (Pearson of a classifier), mismatched
            lengths or unlabelled rows (`-1`).

    Example:
        >>> task_metrics(["accuracy", "f1"], [[0.1, 0.9], [2.0, -1.0]], [1, 1], num_labels=2)
        {'accuracy': 0.5, 'f1': 0.6666666666666666}
    """
    canonical = [metric_name(name) for name in names]
    regression = num_labels == 1
    allowed = REGRESSION_METRICS if regression else CLASSIFICATION_METRICS
    wrong = [name for name in canonical if name not in allowed]
    if wrong:
        kind = "a regression (num_labels=1)" if regression else f"a {num_labels}-class classification"
        hint = " (entity F1 is for `--task-type token-classification`)" if any("seqeval" in n for n in wrong) else ""
        raise ValueError(f"`--metric` {wrong} does not apply to {kind}; use some of {list(allowed)}{hint}.")
    preds, golds = np.asarray(predictions, dtype=np.float64), np.asarray(labels, dtype=np.float64).reshape(-1)
    if len(preds) != len(golds) or len(golds) == 0:
        raise ValueError(f"`predictions` has {len(preds)} rows and `labels` {len(golds)}; they must match (n > 0).")
    if not regression and (golds == -1).any():
        raise ValueError(f"{int((golds == -1).sum())} rows have the label -1 (unlabelled): they cannot be scored.")
    if regression:
        from scipy.stats import pearsonr, spearmanr

        scores = preds.reshape(len(golds), -1)[:, 0]
        with warnings.catch_warnings():  # constant input: scipy warns and returns NaN
            warnings.simplefilter("ignore")
            values = {"pearson": pearsonr(scores, golds)[0], "spearmanr": spearmanr(scores, golds)[0]}
        return {name: float(values[name]) for name in canonical}
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    ids = preds.argmax(axis=-1) if preds.ndim == 2 else preds
    ids, golds = ids.astype(np.int64), golds.astype(np.int64)
    scorers: dict[str, Callable[[], float]] = {
        "accuracy": lambda: accuracy_score(golds, ids),
        "f1": lambda: f1_score(
            golds,
            ids,
            average="binary" if num_labels == 2 else "macro",
            labels=None if num_labels == 2 else list(range(num_labels)),
            zero_division=0.0,
        ),
        "matthews_correlation": lambda: matthews_corrcoef(golds, ids),
    }
    return {name: float(scorers[name]()) for name in canonical}


__all__ = ["CLASSIFICATION_METRICS", "METRIC_ALIASES", "REGRESSION_METRICS", "metric_name", "task_metrics"]
